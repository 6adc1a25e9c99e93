"""Captions of webdataset shards, read as open_clip's ``--dataset-type webdataset`` does.

img2dataset (and most CC3M/CC12M/LAION copies) store one sample per key in tar shards:
``KEY.jpg``, ``KEY.txt``, ``KEY.json``. open_clip groups the members of a shard by
``__key__`` (the member name up to its first dot in the base name, webdataset's
``base_plus_ext``), lower-cases the extension and trains on the decoded ``txt``. This
module reads exactly those keys and captions, and nothing else:

- :func:`expand_shard_urls` expands ``--train-data`` as open_clip does (``::``-joined
  lists, brace notation, ``WDS_`` environment variables).
- :func:`read_webdataset_captions` returns one :class:`~xclr_plugin.captions.CaptionRecord`
  per sample (``filename`` = ``__key__``), the input of ``xclr-embed-captions --format
  webdataset`` and of the check ``xclr-openclip-train`` runs before training.

Local shards are read with seeks over the image members: only the tar headers and the
caption members are read, so reading is far faster than embedding (see
``benchmarks/results/shard_captions.md``). Other URLs (``pipe:``, ``http:``) are streamed
through :func:`webdataset.gopen`, which reads every byte.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any

from xclr_plugin.captions import CaptionRecord

__all__ = [
    "expand_shard_urls",
    "iter_webdataset_captions",
    "read_webdataset_captions",
]

# webdataset's tar_file_iterator skips these members (metadata such as __index__).
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_META_AFFIX = "__"


def expand_shard_urls(urls: str) -> list[str]:
    """The shard list of ``urls``, expanded as ``open_clip_train --train-data`` does.

    Args:
        urls: Shards as open_clip accepts them, e.g. ``"data/{00000..00009}.tar"`` or
            ``"a/{0..3}.tar::b/{0..1}.tar"``.

    Returns:
        The shard URLs, in order.

    Raises:
        ValueError: If ``urls`` is not a non-empty string or expands to nothing.
    """
    if not isinstance(urls, str) or not urls.strip():
        raise ValueError(
            f"urls must be a non-empty string of shards (brace notation and '::' lists "
            f"as open_clip accepts), got {urls!r}."
        )
    try:
        from webdataset.shardlists import expand_urls
    except ImportError as err:  # pragma: no cover - webdataset comes with open_clip
        raise ImportError(
            "Reading webdataset shards needs webdataset (pip install "
            '"xclr-plugin[openclip]").'
        ) from err
    expanded = [u for u in expand_urls(urls) if u]
    if not expanded:
        raise ValueError(f"urls {urls!r} expand to no shard.")
    return [str(u) for u in expanded]


def _split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, as webdataset's ``base_plus_ext``."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def _skipped(name: str) -> bool:
    """Members webdataset's ``tar_file_iterator`` never yields."""
    if "/" not in name and name.startswith(_META_AFFIX) and name.endswith(_META_AFFIX):
        return True
    return _SKIP_META.match(name) is not None


def _open_shard(url: str) -> tuple[IO[bytes], bool]:
    """The shard's byte stream, and whether it is a local (seekable) file."""
    local = url[5:] if url.startswith("file:") else url
    if ":" not in local.split("/", 1)[0] or os.path.exists(local):
        try:
            return open(local, "rb"), True
        except OSError as err:
            raise ValueError(f"Cannot read shard {url!r}: {err}") from None
    import webdataset

    return webdataset.gopen(url, "rb"), False


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGTYPE, AREGTYPE, CONTTYPE


def _octal(field: bytes, where: str) -> int:
    """A tar header number: NUL/space-terminated octal, or GNU base-256."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"{where}: corrupt tar header (size {text!r}).") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """Key-value records of a pax extended header (``"LEN key=value\\n"`` each)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _local_members(stream: IO[bytes], url: str) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular member of a seekable tar file.

    The same headers :mod:`tarfile` reads (ustar, pax ``x`` headers, GNU long names),
    parsed without building ``TarInfo`` objects and seeking over the data: about ten
    times faster than ``tarfile``, which would otherwise bound reading a shard's
    captions (``benchmarks/results/shard_captions.md``).
    """
    offset = 0
    pending: dict[str, str] = {}
    while True:
        stream.seek(offset)
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            return  # end of archive (two zero blocks, or a truncated tail as tarfile)
        stored = _octal(header[148:156], url)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ValueError(
                f"Shard {url!r} is not a readable tar file: bad header checksum at "
                f"byte {offset}."
            )
        size = _octal(header[124:136], url)
        kind = header[156:157]
        data_offset = offset + _BLOCK
        offset = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"x":
            pending.update(_pax_records(stream.read(size)))
            continue
        if kind == b"L":
            pending["path"] = stream.read(size).split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind == b"g":
            continue  # global pax header: tarfile ignores its path too
        name = pending.pop("path", None)
        if "size" in pending:
            size = int(pending.pop("size"))
            offset = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        pending.clear()
        if kind not in _REGULAR:
            continue
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        yield name, data_offset, size


def _stream_members(stream: IO[bytes], url: str) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data or None)`` of each regular member of a non-seekable tar stream."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if info.isreg():
                    member = tar.extractfile(info)
                    yield info.name, (member.read() if member is not None else b"")
                tar.members = []  # type: ignore[attr-defined]
    except (tarfile.TarError, EOFError) as err:
        raise ValueError(f"Shard {url!r} is not a readable tar file: {err}") from None


def _shard_captions(url: str, caption_key: str) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of the caption members of one shard."""
    stream, seekable = _open_shard(url)
    try:
        if seekable:
            for name, data_offset, size in _local_members(stream, url):
                if _is_caption(name, caption_key):
                    stream.seek(data_offset)
                    data = stream.read(size)
                    if len(data) != size:
                        raise ValueError(
                            f"Shard {url!r} is not a readable tar file: member "
                            f"{name!r} is truncated."
                        )
                    yield name, data
        else:
            for name, payload in _stream_members(stream, url):
                if payload is not None and _is_caption(name, caption_key):
                    yield name, payload
    finally:
        stream.close()


def _is_caption(name: str, caption_key: str) -> bool:
    if _skipped(name):
        return False
    parts = _split_key(name)
    return parts is not None and parts[1] == caption_key


def iter_webdataset_captions(
    urls: str,
    *,
    caption_key: str = "txt",
    on_shard: Callable[[str], Any] | None = None,
) -> Iterator[tuple[str, str, str]]:
    """Yields ``(key, caption, shard)`` for each sample with a caption, shard by shard.

    Args:
        urls: Shards as for :func:`expand_shard_urls`.
        caption_key: Extension of the caption member (lower case, as open_clip matches).
        on_shard: Called with each shard URL when it has been read (progress).

    Raises:
        ValueError: For an unreadable shard, a caption that is not UTF-8, or a key with
            two caption members in one shard.
    """
    shards = expand_shard_urls(urls)
    for key, caption, index in _iter_captions(
        shards, caption_key=caption_key, on_shard=on_shard
    ):
        yield key, caption, shards[index]


def _read_shard(url: str, caption_key: str) -> list[tuple[str, str]]:
    """``(key, caption)`` of every caption member of one shard, in member order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for name, data in _shard_captions(url, caption_key):
        key = _split_key(name)[0]  # type: ignore[index]  # a caption name splits
        if key in seen:
            raise ValueError(
                f"Duplicate key {key!r} in shard {url!r}: two {caption_key!r} "
                "members (open_clip would train on both as separate samples)."
            )
        seen.add(key)
        try:
            caption = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"Shard {url!r}, key {key!r}: the {caption_key!r} member is not "
                f"UTF-8 text ({err})."
            ) from None
        out.append((key, caption))
    return out


def _iter_captions(
    shards: list[str],
    *,
    caption_key: str,
    on_shard: Callable[[str], Any] | None,
    workers: int | None = None,
) -> Iterator[tuple[str, str, int]]:
    """``(key, caption, shard index)``; see :func:`iter_webdataset_captions`."""
    caption_key = caption_key.lower().lstrip(".")
    workers = 1 if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}.")
    with contextlib.ExitStack() as stack:
        per_shard: Iterator[list[tuple[str, str]]]
        if workers == 1:
            per_shard = (_read_shard(url, caption_key) for url in shards)
        else:
            # One shard per task, results in shard order (so records are ordered).
            # A fork server that has imported this module once forks cheap workers
            # (spawn would import torch again in each; fork is unsafe with threads).
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            per_shard = pool.map(
                _read_shard, shards, itertools.repeat(caption_key), chunksize=1
            )
        for index, (url, pairs) in enumerate(zip(shards, per_shard, strict=True)):
            for key, caption in pairs:
                yield key, caption, index
            if on_shard is not None:
                on_shard(url)


def read_webdataset_captions(
    urls: str,
    *,
    caption_key: str = "txt",
    progress: bool = False,
    workers: int | None = None,
) -> list[CaptionRecord]:
    """One record per sample of the shards: ``filename`` is the sample's ``__key__``.

    Keys must be unique across all shards: open_clip's ``__key__`` is what a caption
    cache is looked up by, whatever order a shuffled or resampled pipeline uses.

    Args:
        urls: Shards as ``open_clip_train --train-data`` takes them (brace notation,
            ``::``-joined lists).
        caption_key: Extension of the caption member (default ``txt``, as open_clip).
        progress: Show a tqdm bar over the shards.
        workers: Processes reading shards in parallel (None or 1: this process).
            Worth it for hundreds of shards; each worker reads whole shards, and the
            calling script needs the ``if __name__ == "__main__":`` guard.

    Returns:
        Records in shard order, then member order.

    Raises:
        ValueError: For an unreadable shard, a duplicate key (naming both shards), an
            empty caption (naming shard and key), or shards without any caption.
    """
    first_shard: dict[str, int] = {}
    records: list[CaptionRecord] = []
    shards = expand_shard_urls(urls)
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shards), unit="shard", desc="reading shards")
    try:
        for key, caption, index in _iter_captions(
            shards,
            caption_key=caption_key,
            on_shard=None if bar is None else (lambda _: bar.update(1)),
            workers=workers,
        ):
            url = shards[index]
            other = first_shard.setdefault(key, index)
            if other != index:
                raise ValueError(
                    f"Duplicate key {key!r}: in shard {shards[other]!r} and in shard "
                    f"{url!r}. "
                    "Sample keys must be unique across shards to look up captions."
                )
            if not caption.strip():
                raise ValueError(f"Shard {url!r}, key {key!r}: empty caption.")
            records.append(CaptionRecord(key, caption))
    finally:
        if bar is not None:
            bar.close()
    if not records:
        raise ValueError(
            f"No {caption_key!r} caption member in the shards {urls!r} "
            f"({len(shards)} shard(s))."
        )
    return records
