"""Caption-embedding caches: memory-mapped store, locked resumable build, one lookup.

:func:`caption_lookup` (:mod:`~xclr_plugin.cache.lookup`) is what trainers and the
demo call; :func:`build_caption_cache` and :class:`CaptionCache` are the parts.
"""

from typing import Any

from xclr_plugin.cache.build import DEFAULT_CHUNK_SIZE, build_caption_cache
from xclr_plugin.cache.lookup import caption_lookup
from xclr_plugin.cache.store import (
    DATA_FILE,
    DTYPES,
    KEYS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    CacheMismatchError,
    CaptionCache,
    CaptionLookup,
    CaptionTable,
    strings_sha256,
)

__all__ = [
    "DATA_FILE",
    "DEFAULT_CHUNK_SIZE",
    "DTYPES",
    "KEYS_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "PARTIAL_FILE",
    "PROGRESS_FILE",
    "CacheMismatchError",
    "CaptionCache",
    "CaptionLookup",
    "CaptionTable",
    "build_caption_cache",
    "caption_lookup",
    "strings_sha256",
]


def __getattr__(name: str) -> Any:
    # TEMPORARY (issue 17 move): `from xclr_plugin.cache import main` until its last
    # importer (tests/test_open_clip_webdataset.py) imports
    # xclr_plugin.cli.embed_captions.main. Delete then.
    if name == "main":
        from xclr_plugin.cli.embed_captions import main

        return main
    raise AttributeError(f"module 'xclr_plugin.cache' has no attribute {name!r}")
