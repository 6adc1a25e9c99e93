"""Caption-embedding caches: memory-mapped store, locked resumable build, one lookup."""

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
    strings_sha256,
)
from xclr_plugin.cache.table import CaptionLookup, CaptionTable

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
