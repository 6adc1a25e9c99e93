"""Captions of webdataset shards, keyed as open_clip's ``--dataset-type webdataset`` does (:mod:`tarfile` and webdataset's key splitting; local shards read by random access)."""

from __future__ import annotations

import functools
import os
import re
import tarfile
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
    return list(_expand(urls))


@functools.lru_cache(maxsize=4)  # start-up expands --train-data more than once
def _expand(urls: str) -> tuple[str, ...]:
    expanded = tuple(str(u) for u in _webdataset().shardlists.expand_urls(urls) if u)
    if not expanded:
        raise ValueError(f"urls {urls!r} expand to no shard.")
    return expanded


def local_path(url: str) -> str | None:
    """The file of a local shard URL, None for ``pipe:``, ``http:``, ... shards."""
    head = url.split("/", 1)[0]
    if url.startswith("file:") or ":" not in head or len(head) == 2:  # C: drives
        return url.removeprefix("file:")
    return None


def _caption_key(name: str, caption_key: str) -> str | None:
    """The sample key of a caption member's name, None for any other member."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return None
    key, ext = base_plus_ext(name)
    if key is None or ext.lower() != caption_key or _SKIP_META.match(name):
        return None
    return str(key)


def read_shard(url: str, caption_key: str = "txt") -> list[tuple[str, str]]:
    """``(key, caption)`` of every caption member of one shard, in member order.

    Refuses what open_clip would read only in part: a shard truncated or damaged
    after its first member, a key given twice, a caption that is not UTF-8.
    """
    caption_key = caption_key.lower().lstrip(".")
    local = local_path(url) or (url if os.path.exists(url) else None)
    seekable = local is not None
    try:
        stream = open(local, "rb") if local else _webdataset().gopen(url, "rb")  # noqa: SIM115
    except OSError as err:
        raise ValueError(f"Cannot read shard {url!r}: {err}") from None
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    suffix, dotted = "." + caption_key, None
    try:
        with (
            stream,
            tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar,
        ):
            for info in tar:
                tar.members = []  # type: ignore[attr-defined]  # one shard's headers need not stay in memory
                # (A cheap test first: most members are images.)
                if not info.isreg() or not info.name.lower().endswith(suffix):
                    continue
                if (key := _caption_key(info.name, caption_key)) is None:
                    dotted = dotted or info.name
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
            if seekable and tar.fileobj is stream:  # an uncompressed shard
                # tarfile ends quietly at a damaged header or at the end of a cut file
                # (seeking over the images never reads them): a whole shard ends in
                # end-of-archive zeros.
                stream.seek(tar.offset)
                block = stream.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(
                        f"it ends at byte {tar.offset} without the end-of-archive "
                        "marker (a truncated file?)"
                    )
                if block.count(0) != len(block):
                    raise tarfile.ReadError(f"bad tar header at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"Shard {url!r} is not a readable tar file: {err}") from None
    if not out and dotted is not None:
        raise ValueError(
            f"Shard {url!r} has no {caption_key!r} caption member that webdataset "
            f"reads as one: in {dotted!r} webdataset's key ends at the first dot of "
            f"the file name, so its extension is not {caption_key!r}. Rename the "
            "samples' keys without dots."
        )
    return out


def read_webdataset_captions(
    urls: str, *, caption_key: str = "txt"
) -> list[CaptionRecord]:
    """One record per sample (``filename`` = ``__key__``, unique across shards), in shard then member order.

    A shard listed twice (upsampling, ``a.tar::a.tar``) is read once.
    """
    shards = list(dict.fromkeys(expand_shard_urls(urls)))
    first_shard: dict[str, str] = {}
    records: list[CaptionRecord] = []
    for url in shards:
        for key, caption in read_shard(url, caption_key):
            other = first_shard.setdefault(key, url)
            if other != url:
                raise ValueError(
                    f"Duplicate key {key!r}: in shard {other!r} and in shard {url!r}. "
                    "Sample keys must be unique across shards to look up captions."
                )
            if not caption.strip():
                raise ValueError(f"Shard {url!r}, key {key!r}: empty caption.")
            records.append(CaptionRecord(key, caption))
    if not records:
        raise ValueError(
            f"No {caption_key!r} caption member in the shards {urls!r} "
            f"({len(shards)} shard(s))."
        )
    return records
