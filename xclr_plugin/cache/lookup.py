"""Caption records + an optional cache folder + an encoder -> one lookup for training.

The one way the trainers and the demo get caption embeddings::

    caption_lookup(
        records,             # Sequence[CaptionRecord]
        cache_dir=None,      # str | os.PathLike | None
        encoder=None,        # SupportsEncode | Callable[[], SupportsEncode] | None
        *,
        encoder_name=None,   # the encoder a cache must come from (None: any)
        build=True,          # build/resume a missing or unfinished cache
        dtype="float16",     # storage dtype of a cache built here
        distinct=False,      # without a cache: embed each distinct caption once
        progress=True,       # progress bars while embedding
    ) -> CaptionTable | CaptionCache

- No ``cache_dir``: the captions are embedded now (:class:`CaptionTable`; a
  non-finite row is refused, naming its file). File names may repeat here (an
  open_clip CSV with several captions per image): such rows are read by index.
- A finished cache of exactly ``records`` (by ``encoder_name``, or ``encoder.name``
  for an encoder object) is opened *without* loading the encoder (a factory is not
  called); its rows are checked finite once (:meth:`CaptionCache.check_finite`).
- Otherwise ``build=True`` loads the encoder and builds, resumes or repairs the cache
  (:func:`build_caption_cache`, which refuses a different cache, never replaces it);
  ``build=False`` raises for the caller to add its hint ("Build it ... first: ...").
- Webdataset shards have their own, per-shard cache (:mod:`xclr_plugin.cache.shards`).

Errors are plain ``FileNotFoundError`` (no finished cache, ``build=False``) and
``ValueError`` (damaged, non-finite, or :class:`CacheMismatchError`: another
dataset's or encoder's cache), naming the folder; what the encoder factory raises
passes through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from xclr_plugin.cache.build import build_caption_cache
from xclr_plugin.cache.store import CaptionCache
from xclr_plugin.cache.table import CaptionTable
from xclr_plugin.captions.records import CaptionRecord, validate_records
from xclr_plugin.text import SupportsEncode

#: An encoder, a zero-argument function that loads one, or None for the default.
EncoderSource = SupportsEncode | Callable[[], SupportsEncode] | None


def _load(encoder: EncoderSource, progress: bool) -> SupportsEncode:
    if encoder is None:
        from xclr_plugin import text  # looked up now, so tests can stand in for it

        return text.TextEncoder(show_progress=progress)
    if callable(getattr(encoder, "encode", None)):
        return encoder  # type: ignore[return-value]
    if callable(encoder):
        return encoder()
    raise TypeError(
        "encoder must be a text encoder, a function returning one, or None, got "
        f"{type(encoder).__name__}."
    )


def caption_lookup(
    records: Sequence[CaptionRecord],
    cache_dir: str | os.PathLike[str] | None = None,
    encoder: EncoderSource = None,
    *,
    encoder_name: str | None = None,
    build: bool = True,
    dtype: str = "float16",
    distinct: bool = False,
    progress: bool = True,
) -> CaptionTable | CaptionCache:
    """The caption embeddings of ``records``: a checked cache, or embedded now (module docstring)."""
    records = validate_records(records, unique=cache_dir is not None)
    if cache_dir is None:
        return CaptionTable.from_records(
            records, _load(encoder, progress), distinct=distinct
        )
    expected = encoder_name
    if expected is None and callable(getattr(encoder, "encode", None)):
        expected = encoder.name  # type: ignore[union-attr]
    try:
        cache = CaptionCache.open(cache_dir, encoder=expected, records=records)
    except (FileNotFoundError, ValueError):
        if not build:
            raise
        cache = build_caption_cache(
            records, cache_dir, _load(encoder, progress), dtype=dtype, progress=progress
        )
    # One NaN row makes every loss and gradient of its batches NaN (and, gathered,
    # every process's); a cache this call built was checked before it was published.
    cache.check_finite()
    return cache
