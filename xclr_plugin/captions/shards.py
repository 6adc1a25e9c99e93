"""Captions of webdataset shards, keyed as open_clip's ``--dataset-type webdataset`` does (:mod:`tarfile` and webdataset's key splitting; local shards read by random access)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from xclr_plugin.captions.records import CaptionRecord

# webdataset's tar_file_iterator skips members matching this (its skip_meta default).
_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError as err:  # pragma: no cover - webdataset comes with open_clip
        raise ImportError(
            "Reading webdataset shards needs webdataset (pip install "
            '"xclr-plugin[openclip]").'
        ) from err
    return webdataset


def expand_shard_urls(urls: str) -> list[str]:
    """The shards of ``urls`` as ``open_clip_train --train-data`` expands them."""
    if not isinstance(urls, str) or not urls.strip():
        raise ValueError(
            f"urls must be a non-empty string of shards (brace notation and '::' lists "
            f"as open_clip accepts), got {urls!r}."
        )
    expanded = [str(u) for u in _webdataset().shardlists.expand_urls(urls) if u]
    if not expanded:
        raise ValueError(f"urls {urls!r} expand to no shard.")
    return expanded


def _caption_key(name: str, caption_key: str) -> str | None:
    """The sample key of a caption member's name, None for any other member."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return None
    key, ext = base_plus_ext(name)
    if key is None or ext.lower() != caption_key or _SKIP_META.match(name):
        return None
    return str(key)


def _read_shard(url: str, caption_key: str) -> list[tuple[str, str]]:
    """``(key, caption)`` of every caption member of one shard, in member order."""
    local = url.removeprefix("file:")
    seekable = ":" not in local.split("/", 1)[0] or os.path.exists(local)
    try:
        stream = open(local, "rb") if seekable else _webdataset().gopen(url, "rb")  # noqa: SIM115
    except OSError as err:
        raise ValueError(f"Cannot read shard {url!r}: {err}") from None
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    suffix = "." + caption_key
    try:
        with (
            stream,
            tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar,
        ):
            for info in tar:
                tar.members = []  # type: ignore[attr-defined]  # one shard's headers need not stay in memory
                # (A cheap test first: most members are images.)
                if not info.isreg() or not info.name.lower().endswith(suffix):
                    continue
                if (key := _caption_key(info.name, caption_key)) is None:
                    continue
                if key in seen:
                    raise ValueError(
                        f"Duplicate key {key!r} in shard {url!r}: two {caption_key!r} "
                        "members (open_clip would train on both as separate samples)."
                    )
                seen.add(key)
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                try:
                    out.append((key, data.decode("utf-8")))
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"Shard {url!r}, key {key!r}: the {caption_key!r} member is "
                        f"not UTF-8 text ({err})."
                    ) from None
            if seekable:
                # tarfile ends quietly at a damaged header after the first: refuse
                # a shard whose rest is neither end-of-archive zeros nor a short tail.
                stream.seek(tar.offset)
                block = stream.read(tarfile.BLOCKSIZE)
                if len(block) == tarfile.BLOCKSIZE and block.count(0) != len(block):
                    raise tarfile.ReadError(f"bad tar header at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"Shard {url!r} is not a readable tar file: {err}") from None
    return out


def _iter_captions(
    shards: list[str], caption_key: str, workers: int | None = None
) -> Iterator[tuple[str, str, int]]:
    """``(key, caption, shard index)``, shard by shard, read by ``workers`` processes."""
    caption_key = caption_key.lower().lstrip(".")
    workers = 1 if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}.")
    with contextlib.ExitStack() as stack:
        per_shard: Iterator[list[tuple[str, str]]]
        if workers == 1:
            per_shard = (_read_shard(url, caption_key) for url in shards)
        else:
            # Results in shard order. A fork server that imported this module forks
            # cheap workers (spawn would import torch again; fork is unsafe with threads).
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            per_shard = pool.map(_read_shard, shards, itertools.repeat(caption_key))
        for index, pairs in enumerate(per_shard):
            for key, caption in pairs:
                yield key, caption, index


def iter_webdataset_captions(
    urls: str, *, caption_key: str = "txt"
) -> Iterator[tuple[str, str, str]]:
    """Yields ``(key, caption, shard URL)`` for each sample with a caption."""
    shards = expand_shard_urls(urls)
    for key, caption, index in _iter_captions(shards, caption_key):
        yield key, caption, shards[index]


def read_webdataset_captions(
    urls: str,
    *,
    caption_key: str = "txt",
    progress: bool = False,
    workers: int | None = None,
) -> list[CaptionRecord]:
    """One record per sample (``filename`` = ``__key__``, unique across shards), in shard then member order; ``workers`` processes read shards in parallel."""
    shards = expand_shard_urls(urls)
    first_shard: dict[str, int] = {}
    records: list[CaptionRecord] = []
    from tqdm.auto import tqdm

    with tqdm(
        total=len(shards), unit="shard", desc="reading shards", disable=not progress
    ) as bar:
        done = 0
        for key, caption, index in _iter_captions(shards, caption_key, workers):
            bar.update(index - done)
            done = index
            other = first_shard.setdefault(key, index)
            if other != index:
                raise ValueError(
                    f"Duplicate key {key!r}: in shard {shards[other]!r} and in shard "
                    f"{shards[index]!r}. Sample keys must be unique across shards to "
                    "look up captions."
                )
            if not caption.strip():
                raise ValueError(
                    f"Shard {shards[index]!r}, key {key!r}: empty caption."
                )
            records.append(CaptionRecord(key, caption))
        bar.update(len(shards) - done)
    if not records:
        raise ValueError(
            f"No {caption_key!r} caption member in the shards {urls!r} "
            f"({len(shards)} shard(s))."
        )
    return records
