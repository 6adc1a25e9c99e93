"""Caption-embedding cache: embed a dataset's captions once, read them memory-mapped.

A cache is a folder::

    manifest.json     encoder, dim, dtype, count, sha256 of captions, keys and data
    keys.json         the file names (keys), one per row, in dataset order
    embeddings.npy    (count, dim) array, float16 by default, read with np.memmap

    build.lock        an empty lock file (fcntl.flock) that builders hold exclusively

While it is being built the folder holds ``embeddings.npy.partial`` (the full-size
array, filled chunk by chunk) and ``progress.json`` (how many rows are final). Each
chunk is written, flushed, and only then recorded as done (atomically), so a run that
is interrupted resumes at the first unrecorded row: no row is duplicated or missing,
and only the missing rows are embedded again. Before publishing, every row is checked
to have been written (finite, non-zero); ``manifest.json`` appears last, after the
data file is complete; a folder without it is not a cache. A build holds an exclusive
``flock`` on ``build.lock`` (the kernel drops it when the process dies), so a second
builder of the same folder waits for the first and then finds its cache; a build
deletes the temporary files and progress record that killed builders left behind.

Opening a cache validates the manifest, the data file and the keys file (and, if
asked, the dataset and encoder it is meant for, the data checksum and that every row
is finite) and raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming
the path and what differs, instead of ever returning wrong vectors. The array is opened lazily and
never pickled, so each DataLoader worker maps it on its own; rows are read only when
looked up.

The console command ``xclr-embed-captions`` (:func:`main`) builds a cache from any
caption source of :mod:`xclr_plugin.captions`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol, TypeAlias, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xclr_plugin.atomic import fsync_dir, remove_temporaries, write_json_atomic
from xclr_plugin.captions import (
    DEFAULT_TEMPLATE,
    CaptionRecord,
    check_template,
    detect_format,
    read_captions,
    validate_records,
)
from xclr_plugin.text import SupportsEncode

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
LOCK_FILE = "build.lock"
DTYPES = ("float16", "float32")
DEFAULT_CHUNK_SIZE = 4096
_LOCK_POLL_S = 0.2
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

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
    if not path.exists():
        raise FileNotFoundError(f"Caption cache data file is missing: {path}")
    if not path.is_file():
        raise ValueError(f"Caption cache data file {path} is not a regular file.")
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)  # type: ignore[arg-type]
    except Exception as err:
        # A damaged header makes numpy's header parser raise almost anything
        # (ValueError, SyntaxError, tokenize.TokenError, UnicodeDecodeError, ...).
        raise ValueError(
            f"Caption cache data file {path} is truncated or corrupt: "
            f"{type(err).__name__}: {err}"
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


def _file_identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime."""
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _check_names(filenames: Any) -> None:
    """Refuses a single string where a sequence of file names is expected."""
    if isinstance(filenames, (str, bytes)):
        raise TypeError(
            f"filenames must be a sequence of file names, got the string {filenames!r} "
            "(wrap one name in a list)."
        )


def _check_record_list(records: Any, name: str) -> Sequence[CaptionRecord]:
    """Refuses anything but an iterable of :class:`CaptionRecord` (not a string)."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        raise TypeError(
            f"{name} must be a sequence of CaptionRecord, got {type(records).__name__}."
        )
    # A generator is read once, here.
    items: Sequence[Any] = records if isinstance(records, Sequence) else list(records)
    for record in items:
        if not isinstance(record, CaptionRecord):
            raise TypeError(
                f"{name} must hold CaptionRecord items, got {type(record).__name__}."
            )
    return items


class _RowScan(NamedTuple):
    """Rows of a cache array that no finished build writes."""

    non_finite: int
    first_non_finite: int
    zero: int
    first_zero: int


def _scan_rows(array: np.ndarray, chunk_rows: int = 1 << 16) -> _RowScan:
    """Counts non-finite and all-zero rows, reading ``chunk_rows`` rows at a time."""
    non_finite = zero = 0
    first_non_finite = first_zero = -1
    for start in range(0, array.shape[0], chunk_rows):
        block = np.asarray(array[start : start + chunk_rows])
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        empty = np.flatnonzero(~block.any(axis=1))
        if bad.size and first_non_finite < 0:
            first_non_finite = start + int(bad[0])
        if empty.size and first_zero < 0:
            first_zero = start + int(empty[0])
        non_finite += int(bad.size)
        zero += int(empty.size)
    return _RowScan(non_finite, first_non_finite, zero, first_zero)


def _to_rows(index: Index, count: int) -> np.ndarray | slice | int:
    """Normalises an index for row lookup, checking bounds."""
    if isinstance(index, slice):
        return index
    if isinstance(index, (bool, np.bool_)):
        raise TypeError(f"Row index must be an integer, got {index!r}.")
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
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(
                f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}."
            )
        if embeddings.ndim != 2 or embeddings.shape[0] != len(filenames):
            raise ValueError(
                f"embeddings must have shape (len(filenames), dim) = ({len(filenames)}, "
                f"dim), got {tuple(embeddings.shape)}."
            )
        if not embeddings.is_floating_point():
            raise ValueError(
                f"embeddings must be a floating-point tensor, got {embeddings.dtype}."
            )
        finite = torch.isfinite(embeddings.detach()).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()
            raise ValueError(
                f"embeddings hold {bad.numel()} row(s) with NaN or infinite values, "
                f"the first at row {int(bad[0])} (key {filenames[int(bad[0])]!r})."
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
        """Rows by file name, shape ``(len(filenames), dim)``.

        Raises:
            TypeError: If ``filenames`` is a single string.
            ValueError: If a file has no caption embedding.
        """
        _check_names(filenames)
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
        # Identity of the data file validated by open(): a worker that maps it later
        # refuses a file replaced in between (a rebuild with --overwrite).
        self._data_identity: tuple[int, ...] | None = None

    # -- opening and validation ---------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        encoder: SupportsEncode | str | None = None,
        records: Sequence[CaptionRecord] | None = None,
        verify_checksum: bool = False,
        check_finite: bool = False,
    ) -> CaptionCache:
        """Opens and validates a cache.

        Always checked: the manifest (format, version, fields), that the data file
        is a ``(count, dim)`` array of the manifest's dtype with exactly the expected
        size, and that ``keys.json`` holds the ``count`` file names the manifest
        hashed: every file a lookup reads later. Optionally checked: the encoder, the
        records (captions and file names, in order), the sha256 of the data file
        (reads it once, in blocks), and that every row is finite and non-zero.

        Args:
            path: The cache folder.
            encoder: The encoder (or its ``name``) the cache must come from.
            records: The records the cache must hold, in order.
            verify_checksum: Also hash the data file and compare with the manifest.
            check_finite: Also read every row (in chunks) and refuse a cache holding
                NaN or infinite values (or an all-zero row, which no encoder writes);
                trainers pass True, since one such row makes every loss and gradient
                of its batches non-finite. Costs one read of the data file.

        Returns:
            The cache (array not mapped yet).

        Raises:
            FileNotFoundError: If the folder, manifest or data file is missing.
            ValueError: If anything does not match, naming the path and the difference.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"path must be a cache folder (str or os.PathLike), got "
                f"{type(path).__name__}."
            )
        if not isinstance(verify_checksum, bool) or not isinstance(check_finite, bool):
            raise TypeError("verify_checksum and check_finite must be bools.")
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            if path.exists() and not path.is_dir():
                raise FileNotFoundError(
                    f"No caption cache at {path}: it is a file, not a cache folder."
                )
            holder = _build_in_progress(path)
            if holder is not None:
                raise FileNotFoundError(
                    f"No caption cache at {path} yet: another process ({holder}) is "
                    "building it right now; open it when that build has finished."
                )
            raise FileNotFoundError(
                f"No caption cache at {path}: {MANIFEST_FILE} is missing (an unfinished "
                "build leaves none; run xclr-embed-captions again to resume)."
            )
        manifest = _read_json(manifest_path, "caption cache manifest")
        _validate_manifest(manifest, manifest_path)
        cache = cls(path, manifest)
        # Validates the header and size; the mapping is dropped again right away.
        _open_array(cache.data_path, "r", cache.count, cache.dim, cache.dtype)
        cache._data_identity = _file_identity(cache.data_path)
        # Lookups read the keys later (in each worker): refuse a missing or damaged
        # keys file now rather than inside the first epoch.
        cache._load_keys()
        if verify_checksum:
            actual = _file_sha256(cache.data_path)
            if actual != manifest["data_sha256"]:
                raise ValueError(
                    f"Caption cache data file {cache.data_path} is corrupt: its sha256 "
                    f"is {actual}, the manifest records {manifest['data_sha256']}."
                )
        cache.check(encoder=encoder, records=records)
        if check_finite:
            cache.check_finite()
        return cache

    def check_finite(self, chunk_rows: int = 1 << 16) -> None:
        """Reads every row and checks that it is finite and not all zeros.

        Args:
            chunk_rows: Rows read at a time (bounds the memory used).

        Raises:
            ValueError: Naming the cache folder, how many rows hold NaN or infinite
                values (or are all zeros: rows a build never wrote), and the first
                such row's key (file name).
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
            raise TypeError(f"chunk_rows must be an int, got {chunk_rows!r}.")
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}.")
        scan = _scan_rows(self.array, chunk_rows)
        if scan.non_finite:
            raise ValueError(
                f"The caption cache at {self.path} holds {scan.non_finite} row(s) "
                f"with NaN or infinite values, the first at row {scan.first_non_finite} "
                f"(key {self.filenames[scan.first_non_finite]!r}); rebuild it with "
                "xclr-embed-captions --overwrite."
            )
        if scan.zero:
            raise ValueError(
                f"The caption cache at {self.path} holds {scan.zero} all-zero row(s) "
                f"(never written), the first at row {scan.first_zero} "
                f"(key {self.filenames[scan.first_zero]!r}); rebuild it with "
                "xclr-embed-captions --overwrite."
            )

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
            elif isinstance(getattr(encoder, "name", None), str):
                expected["encoder"] = encoder.name
                expected["dim"] = encoder.dim
            else:
                raise TypeError(
                    "encoder must be an encoder (with .name and .dim), its name, or "
                    f"None, got {type(encoder).__name__}."
                )
        if records is not None:
            records = _check_record_list(records, "records")
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
            array = _open_array(self.data_path, "r", self.count, self.dim, self.dtype)
            if (
                self._data_identity is not None
                and _file_identity(self.data_path) != self._data_identity
            ):
                raise ValueError(
                    f"The caption cache data file {self.data_path} was replaced after "
                    "the cache was opened (rebuilt by another process?); open the "
                    "cache again."
                )
            self._array = array
        return self._array

    @property
    def filenames(self) -> list[str]:
        """The file name of each row (reads and checks ``keys.json``)."""
        return self._load_keys()

    def _load_keys(self) -> list[str]:
        """Reads ``keys.json`` and checks it against the manifest.

        Raises:
            FileNotFoundError: If it is missing.
            ValueError: If it is unreadable or holds other keys than the manifest says.
        """
        keys_path = self.path / KEYS_FILE
        if not keys_path.is_file():
            raise FileNotFoundError(
                f"Caption cache keys file is missing: {keys_path} (rebuild the cache "
                "with xclr-embed-captions)."
            )
        keys = _read_json(keys_path, "caption cache keys file")
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
            TypeError: If ``filenames`` is a single string.
            ValueError: If a file has no caption in this cache.
        """
        _check_names(filenames)
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


def _lock_holder(fd: int) -> str:
    """What the lock file says about its holder (written by :func:`_build_lock`)."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
    return "unknown process"


def _build_in_progress(path: Path) -> str | None:
    """The holder of ``path``'s build lock if a build is running, else None."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _lock_holder(fd)
        return None
    finally:
        os.close(fd)  # also releases the shared lock


class _LockUnavailable(Exception):
    """The lock file can be neither created nor opened (e.g. a read-only folder)."""


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """Opens (creating it if needed) the lock file; returns ``(fd, writable)``.

    Raises:
        _LockUnavailable: If it cannot be opened at all.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o666), True
    except OSError:
        pass
    try:
        # Another user's lock file (0644 under a 022 umask): a read-only descriptor
        # takes the same lock on local file systems.
        return os.open(path, os.O_RDONLY | _O_CLOEXEC), False
    except OSError as err:
        raise _LockUnavailable(str(err)) from err


@contextlib.contextmanager
def _build_lock(out: Path, timeout: float | None) -> Iterator[None]:
    """Holds the exclusive build lock of a cache folder.

    ``fcntl.flock`` on ``out/build.lock``: the kernel releases it when the holder
    exits or is killed, so a crashed builder never leaves the folder locked. A second
    builder waits (logging once who holds the lock) until the first one finishes,
    then sees its finished cache; with ``timeout`` it gives up after that many
    seconds. The lock file stays (empty or naming the last holder); deleting it
    while others wait on it would let two builders in.

    Raises:
        TimeoutError: If ``timeout`` passes before the lock is free.
        _LockUnavailable: If the lock file cannot be created or opened.
    """
    path = out / LOCK_FILE
    fd, writable = _open_lock_file(path)
    try:
        if fcntl is None:  # pragma: no cover - Windows: no exclusion
            logger.warning(
                "No file locking on this platform: do not build %s twice.", out
            )
            yield
            return
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(
                        f"Another process ({_lock_holder(fd)}) is still building the "
                        f"caption cache at {out} after {waited:.0f} s of waiting "
                        f"(lock file {path})."
                    ) from None
                if not announced:
                    logger.warning(
                        "Waiting for another process (%s) that is building the caption "
                        "cache at %s; this build continues when it finishes or dies.",
                        _lock_holder(fd),
                        out,
                    )
                    announced = True
                time.sleep(_LOCK_POLL_S)
        if writable:
            with contextlib.suppress(OSError):
                note = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, note, 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
    if (
        isinstance(rows_done, bool)
        or not isinstance(rows_done, int)
        or not 0 <= rows_done <= fingerprint["count"]
    ):
        return 0
    data = out / DATA_FILE
    if not partial.exists() and data.exists() and rows_done == fingerprint["count"]:
        # Interrupted between moving the data file in place and writing the manifest.
        os.replace(data, partial)
    try:
        array = _open_array(
            partial, "r", fingerprint["count"], fingerprint["dim"], fingerprint["dtype"]
        )
    except (FileNotFoundError, ValueError):
        return 0
    # Rows recorded as done were flushed before the record; check it all the same
    # (a file changed by hand or by an older, unlocked builder).
    scan = _scan_rows(array[:rows_done])
    del array
    if scan.non_finite or scan.zero:
        logger.warning(
            "The unfinished caption cache at %s has unwritten rows among those "
            "recorded as done; starting again.",
            out,
        )
        return 0
    return rows_done


def _open_built(
    out: Path, fingerprint: dict[str, Any], verify: bool = False
) -> CaptionCache:
    """Opens a cache and checks that it holds exactly ``fingerprint``'s content."""
    cache = CaptionCache.open(out, verify_checksum=verify, check_finite=verify)
    _raise_on_difference(out, cache.manifest, fingerprint)
    return cache


def _remove(*paths: Path) -> None:
    """Deletes files that exist."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_leftovers(out: Path) -> None:
    """Deletes what dead builders left: temporary files, progress, partial data.

    Only called under the build lock, when no other builder can be writing them.
    """
    removed = remove_temporaries(out, (MANIFEST_FILE, KEYS_FILE, PROGRESS_FILE))
    if removed:
        logger.info(
            "Removed %d temporary file(s) of an interrupted build in %s.",
            len(removed),
            out,
        )


def _check_encoder(encoder: Any) -> SupportsEncode:
    """Checks that ``encoder`` has a string ``name``, a positive int ``dim``, ``encode``."""
    name, dim = getattr(encoder, "name", None), getattr(encoder, "dim", None)
    if (
        not isinstance(name, str)
        or isinstance(dim, bool)
        or not isinstance(dim, (int, np.integer))
        or dim <= 0
        or not callable(getattr(encoder, "encode", None))
    ):
        raise TypeError(
            "encoder must have a str .name, a positive int .dim and .encode(texts) "
            f"(e.g. xclr_plugin.text.TextEncoder), got {type(encoder).__name__}."
        )
    return encoder  # type: ignore[no-any-return]


def _check_dtype(dtype: Any) -> str:
    """The storage dtype as a name (``np.float16`` and ``"float16"`` alike)."""
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    return str(name)


def _reserve_disk_space(path: Path) -> None:
    """Allocates a new (sparse) data file's blocks now.

    Writing through a memory map into a sparse file on a full disk kills the process
    with SIGBUS, at some chunk far into the build; allocating first turns that into
    an ``OSError`` before anything is embedded.

    Raises:
        OSError: If the disk has no room for the file (ENOSPC), naming it and its size.
    """
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # pragma: no cover - macOS, Windows
        return
    size = path.stat().st_size
    with open(path, "rb+") as handle:
        try:
            allocate(handle.fileno(), 0, size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(
                    err.errno,
                    f"Not enough disk space for the caption cache data file {path} "
                    f"({size / 2**20:.1f} MiB)",
                ) from err
            # EOPNOTSUPP, EINVAL: a file system without fallocate; writes will tell.


def _check_rows_written(path: Path, count: int, dim: int, dtype: str) -> None:
    """Refuses to publish a data file with rows no encoder wrote.

    Every row a build writes is finite and non-zero (the encoder output is checked),
    and the file starts as zeros: an all-zero or non-finite row was never written.

    Raises:
        ValueError: Naming the file, the number of such rows and the first.
    """
    array = _open_array(path, "r", count, dim, dtype)
    scan = _scan_rows(array)
    del array
    if scan.non_finite or scan.zero:
        first = min(r for r in (scan.first_non_finite, scan.first_zero) if r >= 0)
        raise ValueError(
            f"Refusing to publish the caption cache data {path}: "
            f"{scan.zero + scan.non_finite} row(s) were not written by this build "
            f"(first: row {first}). Was the folder changed by another program? Run "
            "the build again."
        )


def build_caption_cache(
    records: Sequence[CaptionRecord],
    out_dir: str | os.PathLike[str],
    encoder: SupportsEncode,
    *,
    dtype: str | np.dtype[Any] | type[np.floating[Any]] = "float16",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    verify: bool = False,
    lock_timeout: float | None = None,
) -> CaptionCache:
    """Embeds the records' captions into a cache folder, resuming an interrupted run.

    If ``out_dir`` already holds a valid cache of the same records, encoder and dtype,
    it is returned without embedding anything. If it holds an unfinished build of the
    same content, only the rows not yet recorded as done are embedded. A damaged
    cache of the same content (corrupt header, missing keys file, wrong size, and with
    ``verify`` also a wrong checksum or unwritten rows) is rebuilt.

    Builders of one folder exclude each other: the build holds an exclusive
    ``fcntl.flock`` on ``out_dir/build.lock`` (released by the kernel when the
    process ends, also on a crash). A second builder waits for the first, then finds
    its finished cache and returns it (or refuses it, if it holds other content).
    Before the data file is published, every row is checked to have been written.

    Args:
        records: Caption records in dataset order (row ``i`` is ``records[i]``).
        out_dir: The cache folder (created if needed).
        encoder: Text encoder, e.g. :class:`xclr_plugin.text.TextEncoder`.
        dtype: Storage dtype, ``"float16"`` (default) or ``"float32"``.
        chunk_size: Rows embedded and committed per step (the resume granularity).
        overwrite: Replace a different cache found in ``out_dir``.
        progress: Show a tqdm progress bar.
        on_chunk: Called as ``on_chunk(rows_done, count)`` after each committed chunk.
        verify: When a finished cache is found, also hash its data file and read
            every row (one read of the file) before returning it.
        lock_timeout: Seconds to wait for another builder of ``out_dir``; None
            waits as long as it runs.

    Returns:
        The opened cache.

    Raises:
        TypeError: If ``records`` or ``encoder`` are not what they should be.
        ValueError: On bad arguments, records (empty captions, duplicates), encoder
            output of the wrong shape, non-finite or all-zero, ``out_dir`` being a
            file, or a different cache in ``out_dir`` without ``overwrite``.
        TimeoutError: If another builder holds ``out_dir`` longer than
            ``lock_timeout``.
    """
    dtype = _check_dtype(dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be an int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    chunk_size = int(chunk_size)
    if lock_timeout is not None and not lock_timeout >= 0:
        raise ValueError(f"lock_timeout must be None or >= 0, got {lock_timeout!r}.")
    encoder = _check_encoder(encoder)
    records = validate_records(
        _check_record_list(records, "records"), source="build_caption_cache records"
    )
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(
            f"out_dir must be a folder path (str or os.PathLike), got "
            f"{type(out_dir).__name__}."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The caption cache folder {out} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(records, encoder, dtype)
    try:
        with _build_lock(out, lock_timeout):
            _remove_leftovers(out)
            return _build_locked(
                records,
                out,
                encoder,
                fingerprint,
                chunk_size=chunk_size,
                overwrite=overwrite,
                progress=progress,
                on_chunk=on_chunk,
                verify=verify,
            )
    except _LockUnavailable as err:
        # Raised only on entering the lock: a folder this process cannot write to (a
        # shared, read-only cache). A finished cache of the same content is used as
        # it is; nothing is built.
        try:
            return _open_built(out, fingerprint, verify)
        except (FileNotFoundError, ValueError) as open_err:
            raise ValueError(
                f"Cannot build the caption cache in {out} (the lock file cannot be "
                f"created: {err}), and it holds no usable cache: {open_err}"
            ) from open_err


def _build_locked(
    records: Sequence[CaptionRecord],
    out: Path,
    encoder: SupportsEncode,
    fingerprint: dict[str, Any],
    *,
    chunk_size: int,
    overwrite: bool,
    progress: bool,
    on_chunk: Callable[[int, int], None] | None,
    verify: bool,
) -> CaptionCache:
    """:func:`build_caption_cache` once the build lock is held."""
    count, dim, dtype = fingerprint["count"], fingerprint["dim"], fingerprint["dtype"]
    manifest_path = out / MANIFEST_FILE
    partial_path, progress_path = out / PARTIAL_FILE, out / PROGRESS_FILE

    if manifest_path.exists():
        try:
            manifest = _read_json(manifest_path, "caption cache manifest")
        except ValueError:
            manifest = None
        if isinstance(manifest, dict) and not _differences(manifest, fingerprint):
            try:
                cache = _open_built(out, fingerprint, verify)
            except (FileNotFoundError, ValueError) as err:
                logger.warning(
                    "Rebuilding the damaged caption cache at %s: %s", out, err
                )
            else:
                # A build killed after publishing leaves these behind.
                _remove(progress_path, partial_path)
                return cache
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

    rows_done = _resume_point(out, fingerprint)
    if rows_done == 0:
        _remove(progress_path, partial_path)
        array = np.lib.format.open_memmap(
            partial_path, mode="w+", dtype=dtype, shape=(count, dim)
        )
        array.flush()
        _reserve_disk_space(partial_path)
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
            if not isinstance(embeddings, (torch.Tensor, np.ndarray)):
                raise ValueError(
                    f"The encoder {encoder.name!r} returned a "
                    f"{type(embeddings).__name__}; expected a tensor."
                )
            values = np.asarray(
                torch.as_tensor(embeddings).detach().cpu().float().numpy()
            )
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
            stored = values.astype(dtype)
            unusable = ~np.isfinite(stored).all(axis=1) | ~stored.any(axis=1)
            if unusable.any():
                row = rows_done + int(np.flatnonzero(unusable)[0])
                raise ValueError(
                    f"The encoder {encoder.name!r} returned an embedding that is zero "
                    f"or overflows {dtype} for row {row} (caption "
                    f"{captions[row]!r}); cosine similarity needs a non-zero vector."
                )
            array[rows_done:stop] = stored
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
    try:
        _check_rows_written(partial_path, count, dim, dtype)
    except ValueError:
        _remove(progress_path)  # the next run starts afresh
        raise
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
    fsync_dir(out)
    return _open_built(out, fingerprint)


# -- console command ----------------------------------------------------------------

_PROG = "xclr-embed-captions"
_FORMATS = ("auto", "csv", "jsonl", "folder", "classes", "webdataset")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, ``prog: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Prints the one-line error and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    """Arguments of ``xclr-embed-captions``."""
    parser = _OneLineParser(
        prog=_PROG,
        description=(
            "Embed a dataset's captions once with a frozen sentence encoder and store "
            "them as a memory-mapped X-CLR caption cache (resumes if interrupted; a "
            "second build of the same folder waits for the first)."
        ),
    )
    parser.add_argument(
        "source",
        help="captions source: open_clip CSV/TSV, JSONL, an image folder with a "
        "captions.csv sidecar, a labelled folder (one subfolder per class), or "
        "webdataset shards ('shards/{00000..00009}.tar', '::'-joined lists)",
    )
    parser.add_argument("-o", "--output", required=True, help="cache folder to write")
    parser.add_argument(
        "--format",
        default="auto",
        choices=_FORMATS,
        help="how to read SOURCE (default: from the path; '.tar' shards are webdataset)",
    )
    parser.add_argument(
        "--captions-file", help="sidecar filename,caption CSV for --format folder"
    )
    parser.add_argument(
        "--csv-separator",
        default=None,
        help="CSV separator as open_clip passes it to pandas.read_csv (default: tab; "
        "',' for a sidecar); longer than one character it is a regular expression, "
        "so a literal '\\t' is a tab and ';;' two semicolons",
    )
    parser.add_argument(
        "--csv-img-key",
        default=None,
        help="image column (default: filepath; filename for JSONL/sidecar)",
    )
    parser.add_argument(
        "--csv-caption-key",
        default=None,
        help="caption column (default: title; caption for JSONL/sidecar; the "
        "caption member's extension for webdataset, default txt)",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="caption template with one {} for --format classes (default: "
        "'a photo of a {}')",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="sentence-transformers name or local folder (default: packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--device", default="cpu", help="encoder device (default: cpu)")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=256, help="encoder batch size"
    )
    parser.add_argument(
        "--chunk-size",
        type=_positive_int,
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
        "--lock-timeout",
        type=_seconds,
        default=None,
        help="seconds to wait for another build of OUTPUT before giving up "
        "(default: wait until it finishes)",
    )
    parser.add_argument(
        "--allow-multiline-captions",
        action="store_true",
        help="accept CSV captions that span lines containing the separator (refused "
        "by default: the sign of an unbalanced quote)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    return parser


def _reader_kwargs(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """Maps CLI flags to the chosen reader's keyword arguments.

    Raises:
        ValueError: For a flag that does not apply to ``fmt``, or a bad value.
    """
    given = {
        "--captions-file": args.captions_file,
        "--csv-separator": args.csv_separator,
        "--csv-img-key": args.csv_img_key,
        "--csv-caption-key": args.csv_caption_key,
        "--template": args.template,
    }
    applies = {
        "csv": {"--csv-separator", "--csv-img-key", "--csv-caption-key"},
        "folder": {
            "--captions-file",
            "--csv-separator",
            "--csv-img-key",
            "--csv-caption-key",
        },
        "jsonl": {"--csv-img-key", "--csv-caption-key"},
        "classes": {"--template"},
        "webdataset": {"--csv-caption-key"},
    }[fmt]
    wrong = [
        flag
        for flag, value in given.items()
        if value is not None and flag not in applies
    ]
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)} does not apply to --format {fmt} (it takes "
            f"{', '.join(sorted(applies)) or 'none of the reader options'})."
        )
    if args.allow_multiline_captions and fmt not in ("csv", "folder"):
        raise ValueError(
            f"--allow-multiline-captions does not apply to --format {fmt}."
        )
    if fmt == "classes":
        return {"template": check_template(args.template or DEFAULT_TEMPLATE)}
    if fmt == "webdataset":
        return (
            {}
            if args.csv_caption_key is None
            else {"caption_key": args.csv_caption_key}
        )
    kwargs: dict[str, Any] = {}
    if args.captions_file is not None:
        kwargs["captions_file"] = args.captions_file
    if args.csv_separator is not None:
        if not args.csv_separator:
            raise ValueError("--csv-separator must not be empty.")
        kwargs["sep"] = args.csv_separator
    if args.csv_img_key is not None:
        kwargs["img_key"] = args.csv_img_key
    if args.csv_caption_key is not None:
        kwargs["caption_key"] = args.csv_caption_key
    if args.allow_multiline_captions:
        kwargs["allow_multiline"] = True
    return kwargs


def _check_output(output: str) -> None:
    """Checks that ``output`` can become a cache folder, before any long work.

    Raises:
        ValueError: If it is a file, or the folder cannot be created or written.
    """
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"-o/--output {output} is a file; give a folder for the cache."
        )
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"-o/--output {output}: cannot create a folder inside {existing}, which is "
            "a file."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"-o/--output {output}: {existing} is not writable.")


def _fail(err: BaseException) -> int:
    """Prints the one-line error of the command; returns its exit status (2)."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xclr-embed-captions``.

    Every error (bad flags, unreadable or malformed captions, a cache of other
    content in the output folder, a build lock not freed within ``--lock-timeout``)
    prints one line ``xclr-embed-captions: error: ...`` and returns 2; the flags and
    the output folder are checked before the captions are read and the encoder is
    loaded.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 on an error (message on stderr).
    """
    args = _parser().parse_args(argv)
    try:
        fmt = (
            detect_format(args.source, captions_file=args.captions_file)
            if args.format == "auto"
            else args.format
        )
        reader_kwargs = _reader_kwargs(args, fmt)
        _check_output(args.output)
    except (ValueError, OSError) as err:
        return _fail(err)

    # The build's notes (waiting for another builder, resuming, repairing) reach the
    # user as "xclr-embed-captions: ..." lines on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        records = read_captions(args.source, fmt, **reader_kwargs)
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
            verify=True,
            lock_timeout=args.lock_timeout,
        )
    except (ValueError, TypeError, OSError, ImportError) as err:
        # OSError covers FileNotFoundError, TimeoutError and a full or read-only disk.
        return _fail(err)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    elapsed = time.perf_counter() - start
    print(
        f"Caption cache ready: {cache.count} embeddings ({cache.dim}-d {cache.dtype}, encoder "
        f"{cache.encoder}) in {cache.path} after {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
