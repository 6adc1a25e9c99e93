"""Caption-embedding cache: embed a dataset's captions once, read them memory-mapped.

A cache is a folder::

    manifest.json     encoder, dim, dtype, count, sha256 of captions, keys and data
    keys.json         the file names (keys), one per row, in dataset order
    embeddings.npy    (count, dim) array, float16 by default, read with np.memmap

While it is being built the folder holds ``embeddings.npy.partial`` (the full-size
array, filled chunk by chunk) and ``progress.json`` (how many rows are final). Each
chunk is written, flushed, and only then recorded as done (atomically), so a run that
is interrupted resumes at the first unrecorded row: no row is duplicated or missing,
and only the missing rows are embedded again. ``manifest.json`` appears last, after
the data file is complete; a folder without it is not a cache.

Opening a cache validates the manifest and the data file (and, if asked, against the
dataset and encoder it is meant for) and raises ``ValueError`` naming the path and
what differs, instead of ever returning wrong vectors. The array is opened lazily and
never pickled, so each DataLoader worker maps it on its own; rows are read only when
looked up.

The console command ``xclr-embed-captions`` (:func:`main`) builds a cache from any
caption source of :mod:`xclr_plugin.captions`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xclr_plugin.atomic import fsync_dir, write_json_atomic
from xclr_plugin.captions import (
    CaptionRecord,
    detect_format,
    read_captions,
    validate_records,
)
from xclr_plugin.text import SupportsEncode

__all__ = [
    "CaptionCache",
    "CaptionLookup",
    "CaptionTable",
    "build_caption_cache",
    "main",
    "strings_sha256",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "xclr-caption-cache"
CACHE_VERSION = 1
MANIFEST_FILE = "manifest.json"
KEYS_FILE = "keys.json"
DATA_FILE = "embeddings.npy"
PARTIAL_FILE = "embeddings.npy.partial"
PROGRESS_FILE = "progress.json"
DTYPES = ("float16", "float32")
DEFAULT_CHUNK_SIZE = 4096

_FINGERPRINT_KEYS = (
    "encoder",
    "dim",
    "dtype",
    "count",
    "captions_sha256",
    "keys_sha256",
)

Index: TypeAlias = int | slice | Sequence[int] | np.ndarray | torch.Tensor


@runtime_checkable
class CaptionLookup(Protocol):
    """Anything that maps image file names to caption embeddings.

    Implemented by :class:`CaptionCache` (on disk) and :class:`CaptionTable` (in
    memory); used by :class:`xclr_plugin.data.XCLRCollate`.
    """

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    def lookup(self, filenames: Sequence[str]) -> torch.Tensor:
        """Returns the ``(len(filenames), dim)`` float32 embeddings of the files."""
        ...


def strings_sha256(strings: Iterable[str]) -> str:
    """Hashes a sequence of strings unambiguously (length-prefixed UTF-8).

    Args:
        strings: The strings, in order.

    Returns:
        Hex sha256 digest.
    """
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _file_sha256(path: Path, block: int = 1 << 22) -> str:
    """Hashes a file in blocks (never reads it whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    """Reads a JSON file, turning any failure into a ValueError naming the path."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Corrupt {what} {path}: {err}") from err


def _open_array(path: Path, mode: str, count: int, dim: int, dtype: str) -> np.memmap:
    """Memory-maps a ``.npy`` file and checks its shape, dtype and exact size.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is truncated, extended, or not the expected array.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Caption cache data file is missing: {path}")
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)  # type: ignore[arg-type]
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"Caption cache data file {path} is truncated or corrupt: {err}"
        ) from err
    if not isinstance(array, np.memmap):
        raise ValueError(f"Caption cache data file {path} is not a single .npy array.")
    expected = (count, dim)
    if array.shape != expected or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"Caption cache data file {path} holds a {array.shape} {array.dtype} "
            f"array; the manifest expects {expected} {dtype}."
        )
    size = path.stat().st_size
    if size != array.offset + array.nbytes:
        raise ValueError(
            f"Caption cache data file {path} has {size} bytes; a {expected} {dtype} "
            f"array needs {array.offset + array.nbytes}: the file is truncated or corrupt."
        )
    return array


def _to_rows(index: Index, count: int) -> np.ndarray | slice | int:
    """Normalises an index for row lookup, checking bounds."""
    if isinstance(index, slice):
        return index
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    if isinstance(index, (int, np.integer)):
        row = int(index)
        if not -count <= row < count:
            raise IndexError(f"Row {row} is out of range for {count} captions.")
        return row % count
    rows = np.asarray(index)
    if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
        if rows.size == 0:
            rows = rows.astype(np.int64)
        else:
            raise TypeError(f"Row indices must be integers, got dtype {rows.dtype}.")
    if rows.size and (rows.min() < -count or rows.max() >= count):
        raise IndexError(f"Row indices out of range for {count} captions.")
    return rows % count


def _as_float_rows(values: np.ndarray) -> torch.Tensor:
    """Converts stored rows to float32 and re-normalises them (undoes fp16 rounding)."""
    tensor = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    return F.normalize(tensor, dim=-1)


class CaptionTable:
    """In-memory caption embeddings, for datasets small enough to embed at start-up.

    Same lookups as :class:`CaptionCache`; picklable (workers get a copy).

    Attributes:
        embeddings: ``(N, dim)`` float32 tensor, rows L2-normalised.
        filenames: File name of each row.

    Examples:
        >>> table = CaptionTable.from_records(records, TextEncoder())
        >>> targets = table.lookup(["cat/0.png", "dog/3.png"])  # (2, 384)
    """

    def __init__(self, embeddings: torch.Tensor, filenames: Sequence[str]) -> None:
        """Wraps precomputed embeddings.

        Args:
            embeddings: ``(N, dim)`` tensor.
            filenames: ``N`` unique file names, one per row.

        Raises:
            ValueError: If the shapes disagree or a file name repeats.
        """
        if embeddings.ndim != 2 or embeddings.shape[0] != len(filenames):
            raise ValueError(
                f"embeddings must have shape (len(filenames), dim) = ({len(filenames)}, "
                f"dim), got {tuple(embeddings.shape)}."
            )
        self.embeddings = F.normalize(embeddings.detach().float().cpu(), dim=-1)
        self.filenames = list(filenames)
        self._index = {name: i for i, name in enumerate(self.filenames)}
        if len(self._index) != len(self.filenames):
            raise ValueError("filenames must be unique.")

    @classmethod
    def from_records(
        cls, records: Sequence[CaptionRecord], encoder: SupportsEncode
    ) -> CaptionTable:
        """Embeds the records' captions now.

        Args:
            records: Caption records (e.g. ``dataset.records``).
            encoder: The text encoder.

        Returns:
            The table.
        """
        embeddings = encoder.encode([r.caption for r in records])
        return cls(embeddings, [r.filename for r in records])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.filenames)

    def __getitem__(self, index: Index) -> torch.Tensor:
        """Rows by dataset index (int, slice, sequence or tensor of ints)."""
        rows = _to_rows(index, len(self))
        if isinstance(rows, np.ndarray):
            return self.embeddings[torch.from_numpy(rows.astype(np.int64))]
        return self.embeddings[rows]

    def index_of(self, filename: str) -> int:
        """Row of a file name.

        Raises:
            ValueError: If the file has no caption embedding.
        """
        try:
            return self._index[filename]
        except KeyError:
            raise ValueError(f"No caption embedding for image {filename!r}.") from None

    def lookup(self, filenames: Sequence[str]) -> torch.Tensor:
        """Rows by file name, shape ``(len(filenames), dim)``."""
        return self[[self.index_of(name) for name in filenames]]


class CaptionCache:
    """A built caption-embedding cache, memory-mapped lazily.

    Use :meth:`open` (validates) or :func:`build_caption_cache` (builds or resumes,
    then opens). Lookups return float32 tensors with rows re-normalised to unit
    length, equal to the encoder output up to the storage precision.

    Attributes:
        path: The cache folder.
        manifest: The parsed ``manifest.json``.

    Examples:
        >>> cache = CaptionCache.open("cache/", encoder=encoder, records=records)
        >>> cache[[0, 5]].shape          # by dataset index
        torch.Size([2, 384])
        >>> cache.lookup(["img0.png"])   # by file name
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        """Wraps a validated cache; use :meth:`open` instead."""
        self.path = Path(path)
        self.manifest = manifest
        self._array: np.memmap | None = None
        self._index: dict[str, int] | None = None

    # -- opening and validation ---------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        encoder: SupportsEncode | str | None = None,
        records: Sequence[CaptionRecord] | None = None,
        verify_checksum: bool = False,
    ) -> CaptionCache:
        """Opens and validates a cache.

        Always checked: the manifest (format, version, fields), and that the data file
        is a ``(count, dim)`` array of the manifest's dtype with exactly the expected
        size. Optionally checked: the encoder, the records (captions and file names,
        in order), and the sha256 of the data file (reads it once, in blocks).

        Args:
            path: The cache folder.
            encoder: The encoder (or its ``name``) the cache must come from.
            records: The records the cache must hold, in order.
            verify_checksum: Also hash the data file and compare with the manifest.

        Returns:
            The cache (array not mapped yet).

        Raises:
            FileNotFoundError: If the folder, manifest or data file is missing.
            ValueError: If anything does not match, naming the path and the difference.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No caption cache at {path}: {MANIFEST_FILE} is missing (an unfinished "
                "build leaves none; run xclr-embed-captions again to resume)."
            )
        manifest = _read_json(manifest_path, "caption cache manifest")
        _validate_manifest(manifest, manifest_path)
        cache = cls(path, manifest)
        # Validates the header and size; the mapping is dropped again right away.
        _open_array(cache.data_path, "r", cache.count, cache.dim, cache.dtype)
        if verify_checksum:
            actual = _file_sha256(cache.data_path)
            if actual != manifest["data_sha256"]:
                raise ValueError(
                    f"Caption cache data file {cache.data_path} is corrupt: its sha256 "
                    f"is {actual}, the manifest records {manifest['data_sha256']}."
                )
        cache.check(encoder=encoder, records=records)
        return cache

    def check(
        self,
        *,
        encoder: SupportsEncode | str | None = None,
        records: Sequence[CaptionRecord] | None = None,
    ) -> None:
        """Checks that this cache was built by ``encoder`` from ``records``.

        Args:
            encoder: Encoder or encoder name; None skips the check.
            records: Records in dataset order; None skips the check.

        Raises:
            ValueError: Naming the cache path and each field that differs.
        """
        expected: dict[str, Any] = {}
        if encoder is not None:
            if isinstance(encoder, str):
                expected["encoder"] = encoder
            else:
                expected["encoder"] = encoder.name
                expected["dim"] = encoder.dim
        if records is not None:
            expected["count"] = len(records)
            expected["captions_sha256"] = strings_sha256(r.caption for r in records)
            expected["keys_sha256"] = strings_sha256(r.filename for r in records)
        _raise_on_difference(self.path, self.manifest, expected)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the open memmap and the key index (rebuilt lazily)."""
        state = self.__dict__.copy()
        state["_array"] = None
        state["_index"] = None
        return state

    def __repr__(self) -> str:
        """Returns a short description."""
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, encoder={self.encoder!r}, "
            f"count={self.count}, dim={self.dim}, dtype={self.dtype!r})"
        )

    # -- properties ---------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        """The ``.npy`` data file."""
        return self.path / str(self.manifest["data_file"])

    @property
    def encoder(self) -> str:
        """Name of the encoder that built the cache."""
        return str(self.manifest["encoder"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        """Storage dtype (``float16`` or ``float32``)."""
        return str(self.manifest["dtype"])

    @property
    def count(self) -> int:
        """Number of rows."""
        return int(self.manifest["count"])

    def __len__(self) -> int:
        """Number of rows."""
        return self.count

    @property
    def array(self) -> np.memmap:
        """The read-only memory map, opened on first use in each process."""
        if self._array is None:
            self._array = _open_array(
                self.data_path, "r", self.count, self.dim, self.dtype
            )
        return self._array

    @property
    def filenames(self) -> list[str]:
        """The file name of each row (reads and checks ``keys.json``)."""
        keys = _read_json(self.path / KEYS_FILE, "caption cache keys file")
        if (
            not isinstance(keys, list)
            or len(keys) != self.count
            or not all(isinstance(k, str) for k in keys)
            or strings_sha256(keys) != self.manifest["keys_sha256"]
        ):
            raise ValueError(
                f"Caption cache keys file {self.path / KEYS_FILE} does not match the "
                f"manifest ({self.count} keys with sha256 {self.manifest['keys_sha256']})."
            )
        return keys

    # -- lookups ------------------------------------------------------------------

    def __getitem__(self, index: Index) -> torch.Tensor:
        """Rows by dataset index: an int gives ``(dim,)``, others ``(B, dim)``.

        Returns:
            float32 tensor, rows L2-normalised.
        """
        return _as_float_rows(self.array[_to_rows(index, self.count)])

    def index_of(self, filename: str) -> int:
        """Row of a file name (the key index is built on first use per process).

        Raises:
            ValueError: If the file has no caption in this cache.
        """
        if self._index is None:
            self._index = {name: i for i, name in enumerate(self.filenames)}
        try:
            return self._index[filename]
        except KeyError:
            raise ValueError(
                f"No caption embedding for image {filename!r} in the cache {self.path}."
            ) from None

    def lookup(self, filenames: Sequence[str]) -> torch.Tensor:
        """Rows by file name.

        Args:
            filenames: File names as the dataset returns them.

        Returns:
            ``(len(filenames), dim)`` float32 tensor, rows L2-normalised.

        Raises:
            ValueError: If a file has no caption in this cache.
        """
        return self[[self.index_of(name) for name in filenames]]


def _validate_manifest(manifest: Any, path: Path) -> None:
    """Checks a manifest's structure.

    Raises:
        ValueError: Naming the manifest path and the problem.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an xclr-plugin caption cache manifest.")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"{path}: unsupported caption cache version {manifest.get('version')!r} "
            f"(this xclr-plugin reads version {CACHE_VERSION}); rebuild the cache."
        )
    required = {
        "encoder": str,
        "dim": int,
        "dtype": str,
        "count": int,
        "captions_sha256": str,
        "keys_sha256": str,
        "data_sha256": str,
        "data_file": str,
    }
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise ValueError(
                f"{path}: field {key!r} is missing or not a {kind.__name__}."
            )
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path}: unsupported dtype {manifest['dtype']!r}.")
    if manifest["dim"] <= 0 or manifest["count"] <= 0:
        raise ValueError(f"{path}: dim and count must be positive.")
    if Path(manifest["data_file"]).name != manifest["data_file"]:
        raise ValueError(f"{path}: data_file must be a plain file name.")


def _differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Lists ``field: cache has X, expected Y`` for each differing field."""
    return [
        f"{key}: cache has {actual.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if actual.get(key) != value
    ]


def _raise_on_difference(
    path: Path, actual: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Raises a ValueError listing the differences, if any."""
    diffs = _differences(actual, expected)
    if diffs:
        raise ValueError(
            f"The caption cache at {path} does not match: " + "; ".join(diffs) + "."
        )


# -- building -------------------------------------------------------------------------


def _fingerprint(
    records: Sequence[CaptionRecord], encoder: SupportsEncode, dtype: str
) -> dict[str, Any]:
    """What identifies a cache's content."""
    return {
        "encoder": encoder.name,
        "dim": int(encoder.dim),
        "dtype": dtype,
        "count": len(records),
        "captions_sha256": strings_sha256(r.caption for r in records),
        "keys_sha256": strings_sha256(r.filename for r in records),
    }


def _resume_point(out: Path, fingerprint: dict[str, Any]) -> int:
    """Rows already embedded by an interrupted build with the same fingerprint, else 0."""
    progress_path, partial = out / PROGRESS_FILE, out / PARTIAL_FILE
    try:
        progress = _read_json(progress_path, "caption cache progress file")
    except (FileNotFoundError, ValueError):
        return 0
    if not isinstance(progress, dict) or progress.get("fingerprint") != fingerprint:
        return 0
    rows_done = progress.get("rows_done")
    if not isinstance(rows_done, int) or not 0 <= rows_done <= fingerprint["count"]:
        return 0
    data = out / DATA_FILE
    if not partial.exists() and data.exists() and rows_done == fingerprint["count"]:
        # Interrupted between moving the data file in place and writing the manifest.
        os.replace(data, partial)
    try:
        _open_array(
            partial, "r", fingerprint["count"], fingerprint["dim"], fingerprint["dtype"]
        )
    except (FileNotFoundError, ValueError):
        return 0
    return rows_done


def _open_built(out: Path, fingerprint: dict[str, Any]) -> CaptionCache:
    """Opens a cache and checks that it holds exactly ``fingerprint``'s content."""
    cache = CaptionCache.open(out)
    _raise_on_difference(out, cache.manifest, fingerprint)
    return cache


def _remove(*paths: Path) -> None:
    """Deletes files that exist."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def build_caption_cache(
    records: Sequence[CaptionRecord],
    out_dir: str | os.PathLike[str],
    encoder: SupportsEncode,
    *,
    dtype: str = "float16",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> CaptionCache:
    """Embeds the records' captions into a cache folder, resuming an interrupted run.

    If ``out_dir`` already holds a valid cache of the same records, encoder and dtype,
    it is returned without embedding anything. If it holds an unfinished build of the
    same content, only the rows not yet recorded as done are embedded.

    Args:
        records: Caption records in dataset order (row ``i`` is ``records[i]``).
        out_dir: The cache folder (created if needed).
        encoder: Text encoder, e.g. :class:`xclr_plugin.text.TextEncoder`.
        dtype: Storage dtype, ``"float16"`` (default) or ``"float32"``.
        chunk_size: Rows embedded and committed per step (the resume granularity).
        overwrite: Replace a different cache found in ``out_dir``.
        progress: Show a tqdm progress bar.
        on_chunk: Called as ``on_chunk(rows_done, count)`` after each committed chunk.

    Returns:
        The opened cache.

    Raises:
        ValueError: On bad arguments, records (empty captions, duplicates), encoder
            output of the wrong shape or non-finite, or a different cache in
            ``out_dir`` without ``overwrite``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    records = validate_records(records, source="build_caption_cache records")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(records, encoder, dtype)
    count, dim = fingerprint["count"], fingerprint["dim"]
    manifest_path = out / MANIFEST_FILE

    if manifest_path.exists():
        try:
            manifest = _read_json(manifest_path, "caption cache manifest")
        except ValueError:
            manifest = None
        if isinstance(manifest, dict) and not _differences(manifest, fingerprint):
            try:
                return _open_built(out, fingerprint)
            except (FileNotFoundError, ValueError) as err:
                logger.warning(
                    "Rebuilding the damaged caption cache at %s: %s", out, err
                )
        elif not overwrite:
            diffs = (
                _differences(manifest, fingerprint)
                if isinstance(manifest, dict)
                else ["unreadable manifest"]
            )
            raise ValueError(
                f"{out} already holds a different caption cache ("
                + "; ".join(diffs)
                + "). Pass overwrite=True (--overwrite) or choose another folder."
            )
        # The manifest goes first: a folder without one is never read as a cache.
        _remove(manifest_path)
        fsync_dir(out)
        _remove(out / DATA_FILE, out / KEYS_FILE)

    partial_path, progress_path = out / PARTIAL_FILE, out / PROGRESS_FILE
    rows_done = _resume_point(out, fingerprint)
    if rows_done == 0:
        _remove(progress_path, partial_path)
        array = np.lib.format.open_memmap(
            partial_path, mode="w+", dtype=dtype, shape=(count, dim)
        )
        array.flush()
        write_json_atomic(progress_path, {"fingerprint": fingerprint, "rows_done": 0})
    else:
        logger.info(
            "Resuming the caption cache at %s from row %d of %d.", out, rows_done, count
        )
        array = _open_array(partial_path, "r+", count, dim, dtype)

    captions = [r.caption for r in records]
    with tqdm(
        total=count,
        initial=rows_done,
        unit="caption",
        desc="Embedding captions",
        disable=not progress,
    ) as bar:
        while rows_done < count:
            stop = min(rows_done + chunk_size, count)
            embeddings = encoder.encode(captions[rows_done:stop])
            values = np.asarray(embeddings.detach().cpu().float().numpy())
            if values.shape != (stop - rows_done, dim):
                raise ValueError(
                    f"The encoder {encoder.name!r} returned shape {values.shape} for "
                    f"{stop - rows_done} captions; expected ({stop - rows_done}, {dim})."
                )
            if not np.isfinite(values).all():
                raise ValueError(
                    f"The encoder {encoder.name!r} returned non-finite values for rows "
                    f"{rows_done}-{stop - 1}."
                )
            array[rows_done:stop] = values
            array.flush()
            # The rows are on disk before the marker says so.
            write_json_atomic(
                progress_path, {"fingerprint": fingerprint, "rows_done": stop}
            )
            bar.update(stop - rows_done)
            rows_done = stop
            if on_chunk is not None:
                on_chunk(rows_done, count)
    del array

    with open(partial_path, "rb+") as handle:
        os.fsync(handle.fileno())
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        **fingerprint,
        "normalized": True,
        "data_file": DATA_FILE,
        "keys_file": KEYS_FILE,
        "data_sha256": _file_sha256(partial_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out / KEYS_FILE, [r.filename for r in records])
    os.replace(partial_path, out / DATA_FILE)
    fsync_dir(out)
    write_json_atomic(manifest_path, manifest)
    _remove(progress_path)
    return _open_built(out, fingerprint)


# -- console command ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """Arguments of ``xclr-embed-captions``."""
    parser = argparse.ArgumentParser(
        prog="xclr-embed-captions",
        description=(
            "Embed a dataset's captions once with a frozen sentence encoder and store "
            "them as a memory-mapped X-CLR caption cache (resumes if interrupted)."
        ),
    )
    parser.add_argument(
        "source",
        help="captions source: open_clip CSV/TSV, JSONL, an image folder with a "
        "captions.csv sidecar, or a labelled folder (one subfolder per class)",
    )
    parser.add_argument("-o", "--output", required=True, help="cache folder to write")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "jsonl", "folder", "classes"],
        help="how to read SOURCE (default: from the path)",
    )
    parser.add_argument(
        "--captions-file", help="sidecar filename,caption CSV for --format folder"
    )
    parser.add_argument(
        "--csv-separator",
        default=None,
        help="CSV separator (default: tab; ',' for a sidecar)",
    )
    parser.add_argument(
        "--csv-img-key",
        default=None,
        help="image column (default: filepath; filename for JSONL/sidecar)",
    )
    parser.add_argument(
        "--csv-caption-key",
        default=None,
        help="caption column (default: title; caption for JSONL/sidecar)",
    )
    parser.add_argument(
        "--template",
        default="a photo of a {}",
        help="caption template for --format classes",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="sentence-transformers name or local folder (default: packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--device", default="cpu", help="encoder device (default: cpu)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="encoder batch size"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="rows committed per step",
    )
    parser.add_argument(
        "--dtype", default="float16", choices=DTYPES, help="storage dtype"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different cache in OUTPUT"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    return parser


def _reader_kwargs(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """Maps CLI flags to the chosen reader's keyword arguments."""
    if fmt == "classes":
        return {"template": args.template}
    kwargs: dict[str, Any] = {}
    if fmt == "folder" and args.captions_file:
        kwargs["captions_file"] = args.captions_file
    if args.csv_separator is not None and fmt in ("csv", "folder"):
        kwargs["sep"] = args.csv_separator
    if args.csv_img_key is not None:
        kwargs["img_key"] = args.csv_img_key
    if args.csv_caption_key is not None:
        kwargs["caption_key"] = args.csv_caption_key
    return kwargs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xclr-embed-captions``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 1 on a data or cache error (message on stderr).
    """
    args = _parser().parse_args(argv)
    try:
        fmt = (
            detect_format(args.source, captions_file=args.captions_file)
            if args.format == "auto"
            else args.format
        )
        records = read_captions(args.source, fmt, **_reader_kwargs(args, fmt))
        from xclr_plugin.text import TextEncoder

        encoder = TextEncoder(
            args.encoder,
            device=args.device,
            batch_size=args.batch_size,
            show_progress=False,
        )
        start = time.perf_counter()
        cache = build_caption_cache(
            records,
            args.output,
            encoder,
            dtype=args.dtype,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"xclr-embed-captions: error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(
        f"Caption cache ready: {cache.count} embeddings ({cache.dim}-d {cache.dtype}, encoder "
        f"{cache.encoder}) in {cache.path} after {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
