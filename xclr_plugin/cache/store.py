"""Caption embeddings on disk (:class:`CaptionCache`): ``manifest.json``, ``keys.json``, ``embeddings.npy`` (memory-mapped), ``build.lock``; every check names the path."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
import torch.nn.functional as F

from xclr_plugin.cache.table import Rows
from xclr_plugin.captions.records import CaptionRecord, validate_records
from xclr_plugin.text import SupportsEncode

CACHE_FORMAT, CACHE_VERSION = "xclr-caption-cache", 1
MANIFEST_FILE, KEYS_FILE, DATA_FILE = "manifest.json", "keys.json", "embeddings.npy"
PARTIAL_FILE, PROGRESS_FILE, LOCK_FILE = (
    f"{DATA_FILE}.partial",
    "progress.json",
    "build.lock",
)
DTYPES = ("float16", "float32")
_FIELDS = {"encoder": str, "dim": int, "dtype": str, "count": int, "data_file": str}
_FIELDS.update(dict.fromkeys(("captions_sha256", "keys_sha256", "data_sha256"), str))


class CacheMismatchError(ValueError):
    """A valid cache of other records or another encoder."""


def strings_sha256(strings: Iterable[str]) -> str:
    """Hex sha256 of a sequence of strings, unambiguous (length-prefixed UTF-8)."""
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def folder_argument(name: str, value: Any, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be {what} (str or os.PathLike), got {type(value).__name__}."
        )
    return Path(value)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return int(value)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a failure other than a missing file names the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Corrupt {what} {path}: {err}") from err


def open_array(path: Path, mode: str, count: int, dim: int, dtype: str) -> np.memmap:
    """Memory-maps a ``.npy`` file, checking shape, dtype and exact size."""
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
    if array.shape != (count, dim) or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"Caption cache data file {path} holds a {array.shape} {array.dtype} "
            f"array; the manifest expects {(count, dim)} {dtype}."
        )
    if (size := path.stat().st_size) != array.offset + array.nbytes:
        raise ValueError(
            f"Caption cache data file {path} has {size} bytes; a {(count, dim)} {dtype} "
            f"array needs {array.offset + array.nbytes}: the file is truncated or corrupt."
        )
    return array


def bad_rows(array: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the non-finite rows and of the all-zero rows (no build writes one)."""
    found: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for start in range(0, array.shape[0], chunk):
        block = np.asarray(array[start : start + chunk])
        found[0].append(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
        found[1].append(start + np.flatnonzero(~block.any(axis=1)))
    return np.concatenate(found[0]), np.concatenate(found[1])


def build_in_progress(folder: Path) -> str | None:
    """Who builds ``folder`` right now (as its progress record names it), or None."""
    if not (folder / LOCK_FILE).is_file():
        return None
    probe = filelock.FileLock(folder / LOCK_FILE)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        try:
            return str(read_json(folder / PROGRESS_FILE, "progress")["builder"])
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown process"
    except OSError:
        return None  # cannot tell (a read-only folder)
    probe.release()
    return None


def _identity(path: Path) -> tuple[int, ...]:
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class CaptionCache(Rows):
    """A built caption cache; rows come back float32, re-normalised."""

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest
        self.encoder: str = manifest["encoder"]
        self.dim: int = manifest["dim"]  # type: ignore[misc]
        self.dtype: str = manifest["dtype"]
        self.count: int = manifest["count"]
        self.data_path = self.path / manifest["data_file"]
        self._array: np.memmap | None = None
        self._keys: list[str] | None = None
        # The data file open() checked: a worker mapping it later refuses a file
        # replaced in between (a rebuild with --overwrite).
        self._data_identity: tuple[int, ...] | None = None
        self.rows_checked = False  # every row known finite and non-zero

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
        """Opens a cache, checking manifest, data and keys (optionally encoder/records, sha256, every row)."""
        path = folder_argument("path", path, "a cache folder")
        if not (path / MANIFEST_FILE).is_file():
            if path.exists() and not path.is_dir():
                raise FileNotFoundError(
                    f"No caption cache at {path}: it is a file, not a cache folder."
                )
            if (holder := build_in_progress(path)) is not None:
                raise FileNotFoundError(
                    f"No caption cache at {path} yet: another process ({holder}) is "
                    "building it right now; open it when that build has finished."
                )
            raise FileNotFoundError(
                f"No caption cache at {path}: {MANIFEST_FILE} is missing (an unfinished "
                "build leaves none; run xclr-embed-captions again to resume)."
            )
        manifest = read_json(path / MANIFEST_FILE, "caption cache manifest")
        _check_manifest(manifest, path / MANIFEST_FILE)
        cache = cls(path, manifest)
        open_array(cache.data_path, "r", cache.count, cache.dim, cache.dtype)
        cache._data_identity = _identity(cache.data_path)
        cache.filenames  # noqa: B018 - a damaged keys file is refused now, not in epoch 0
        if (
            verify_checksum
            and (sha := file_sha256(cache.data_path)) != manifest["data_sha256"]
        ):
            raise ValueError(
                f"Caption cache data file {cache.data_path} is corrupt: its sha256 is "
                f"{sha}, the manifest records {manifest['data_sha256']}."
            )
        cache.check(encoder=encoder, records=records)
        if check_finite:
            cache.check_finite()
        return cache

    def check_finite(self, chunk_rows: int = 1 << 16) -> None:
        """Reads every row once, refusing NaN/infinite or all-zero rows (naming the first key)."""
        positive_int("chunk_rows", chunk_rows)
        if self.rows_checked:
            return
        non_finite, zero = bad_rows(self.array, chunk_rows)
        for rows, what in (
            (non_finite, "row(s) with NaN or infinite values"),
            (zero, "all-zero row(s) (never written)"),
        ):
            if rows.size:
                raise ValueError(
                    f"The caption cache at {self.path} holds {rows.size} {what}, the "
                    f"first at row {rows[0]} (key {self.filenames[rows[0]]!r}); "
                    "rebuild it with xclr-embed-captions --overwrite."
                )
        self.rows_checked = True

    def check(
        self,
        *,
        encoder: SupportsEncode | str | None = None,
        records: Sequence[CaptionRecord] | None = None,
    ) -> None:
        """Checks that ``encoder`` built this cache from ``records`` (None: unchecked)."""
        expected: dict[str, Any] = {}
        if isinstance(encoder, str):
            expected["encoder"] = encoder
        elif encoder is not None:
            if not isinstance(getattr(encoder, "name", None), str):
                raise TypeError(
                    "encoder must be an encoder (with .name and .dim), its name, or "
                    f"None, got {type(encoder).__name__}."
                )
            expected.update(encoder=encoder.name, dim=encoder.dim)
        if records is not None:
            expected.update(fingerprint(validate_records(records, unique=False)))
        raise_on_difference(self.path, self.manifest, expected)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_index": None}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, encoder={self.encoder!r}, "
            f"count={self.count}, dim={self.dim}, dtype={self.dtype!r})"
        )

    def __len__(self) -> int:
        return self.count

    @property
    def array(self) -> np.memmap:
        """The read-only memory map, opened on first use in each process."""
        if self._array is None:
            array = open_array(self.data_path, "r", self.count, self.dim, self.dtype)
            if self._data_identity not in (None, _identity(self.data_path)):
                raise ValueError(
                    f"The caption cache data file {self.data_path} was replaced after "
                    "the cache was opened (rebuilt by another process?); open the "
                    "cache again."
                )
            self._array = array
        return self._array

    @property
    def filenames(self) -> list[str]:
        """The file name of each row (``keys.json``, checked against the manifest)."""
        if self._keys is None:
            path = self.path / KEYS_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"Caption cache keys file is missing: {path} (rebuild the cache "
                    "with xclr-embed-captions)."
                )
            keys = read_json(path, "caption cache keys file")
            if (
                not isinstance(keys, list)
                or len(keys) != self.count
                or not all(isinstance(k, str) for k in keys)
                or strings_sha256(keys) != self.manifest["keys_sha256"]
            ):
                raise ValueError(
                    f"Caption cache keys file {path} does not match the manifest "
                    f"({self.count} keys with sha256 {self.manifest['keys_sha256']})."
                )
            self._keys = keys
        return self._keys

    def _rows(self, rows: np.ndarray | slice | int) -> torch.Tensor:
        # float32 and re-normalised: undoes the float16 rounding of the norm.
        values = np.array(self.array[rows], dtype=np.float32, copy=True)
        return F.normalize(torch.from_numpy(values), dim=-1)


def fingerprint(records: Sequence[CaptionRecord]) -> dict[str, Any]:
    return {
        "count": len(records),
        "captions_sha256": strings_sha256(r.caption for r in records),
        "keys_sha256": strings_sha256(r.filename for r in records),
    }


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        what = "an xclr-plugin caption cache manifest"
        if (
            isinstance(manifest, dict)
            and manifest.get("format") == "xclr-shard-caption-cache"
        ):
            what += " (it is a per-shard cache of webdataset shards)"
        raise ValueError(f"{path} is not {what}.")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"{path}: unsupported caption cache version {manifest.get('version')!r} "
            f"(this xclr-plugin reads version {CACHE_VERSION}); rebuild the cache."
        )
    for key, kind in _FIELDS.items():
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


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{key}: cache has {actual.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if actual.get(key) != value
    ]


def raise_on_difference(
    path: Path, actual: dict[str, Any], expected: dict[str, Any]
) -> None:
    if diffs := differences(actual, expected):
        raise CacheMismatchError(
            f"The caption cache at {path} does not match: " + "; ".join(diffs) + "."
        )
