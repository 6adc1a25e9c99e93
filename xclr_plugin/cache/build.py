"""Building a caption cache: chunked, resumable (``progress.json``), one builder at a time (:mod:`filelock`), manifest published last."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from tqdm.auto import tqdm

from xclr_plugin.atomic import fsync_dir, remove_temporaries, write_json_atomic
from xclr_plugin.cache.store import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DATA_FILE,
    DTYPES,
    KEYS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    CaptionCache,
    bad_rows,
    build_in_progress,
    differences,
    file_sha256,
    fingerprint,
    folder_argument,
    open_array,
    positive_int,
    raise_on_difference,
    read_json,
)
from xclr_plugin.captions.records import CaptionRecord, validate_records
from xclr_plugin.text import SupportsEncode

DEFAULT_CHUNK_SIZE = 4096

logger = logging.getLogger("xclr_plugin.cache")


class _LockUnavailable(Exception):
    """The lock file can be neither created nor locked (e.g. a read-only folder)."""


@contextlib.contextmanager
def _build_lock(out: Path, timeout: float | None) -> Iterator[None]:
    """Holds ``out``'s build lock (``flock``: freed if the holder dies); a second builder waits."""
    lock, start = filelock.FileLock(out / LOCK_FILE), time.monotonic()
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.warning(
                "Waiting for another process (%s) that is building the caption cache "
                "at %s; this build continues when it finishes or dies.",
                build_in_progress(out),
                out,
            )
            try:
                lock.acquire(
                    timeout=-1 if timeout is None else timeout, poll_interval=0.2
                )
            except filelock.Timeout:
                raise TimeoutError(
                    f"Another process ({build_in_progress(out)}) is still building the "
                    f"caption cache at {out} after {time.monotonic() - start:.0f} s of "
                    f"waiting (lock file {out / LOCK_FILE})."
                ) from None
    except OSError as err:
        if isinstance(err, TimeoutError):
            raise
        raise _LockUnavailable(str(err)) from err
    try:
        yield
    finally:
        lock.release()


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _open_built(out: Path, content: dict[str, Any], verify: bool) -> CaptionCache:
    cache = CaptionCache.open(out, verify_checksum=verify, check_finite=verify)
    raise_on_difference(out, cache.manifest, content)
    return cache


def _resume_point(out: Path, content: dict[str, Any]) -> int:
    """Rows an interrupted build of the same content finished, else 0."""
    try:
        progress = read_json(out / PROGRESS_FILE, "caption cache progress file")
    except (FileNotFoundError, ValueError):
        return 0
    if not isinstance(progress, dict) or progress.get("fingerprint") != content:
        return 0
    rows = progress.get("rows_done")
    if type(rows) is not int or not 0 <= rows <= content["count"]:
        return 0
    partial, data = out / PARTIAL_FILE, out / DATA_FILE
    if not partial.exists() and data.exists() and rows == content["count"]:
        os.replace(data, partial)  # interrupted between publishing data and manifest
    try:
        shape = content["count"], content["dim"], content["dtype"]
        array = open_array(partial, "r", *shape)
    except (FileNotFoundError, ValueError):
        return 0
    # Rows recorded as done were flushed before the record; check them all the same
    # (a file changed by hand or by an older, unlocked builder).
    if any(r.size for r in bad_rows(array[:rows])):
        logger.warning(
            "The unfinished caption cache at %s has unwritten rows among those "
            "recorded as done; starting again.",
            out,
        )
        return 0
    return rows


def _reserve_disk_space(path: Path) -> None:
    """Allocates the data file now: a memory-mapped write to a full disk is SIGBUS, late."""
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


def embed_rows(
    encoder: SupportsEncode, captions: Sequence[str], start: int, stop: int, dtype: str
) -> np.ndarray:
    """The rows ``start:stop`` to store, refusing encoder output that is no embedding."""
    out, name, n = encoder.encode(captions[start:stop]), encoder.name, stop - start
    if not isinstance(out, (torch.Tensor, np.ndarray)):
        raise ValueError(
            f"The encoder {name!r} returned a {type(out).__name__}; expected a tensor."
        )
    values = torch.as_tensor(out).detach().cpu().float().numpy()
    if values.shape != (n, encoder.dim):
        raise ValueError(
            f"The encoder {name!r} returned shape {values.shape} for {n} captions; "
            f"expected ({n}, {encoder.dim})."
        )
    if not np.isfinite(values).all():
        raise ValueError(
            f"The encoder {name!r} returned non-finite values for rows {start}-{stop - 1}."
        )
    stored = values.astype(dtype)
    unusable = np.flatnonzero(~np.isfinite(stored).all(axis=1) | ~stored.any(axis=1))
    if unusable.size:
        row = start + int(unusable[0])
        raise ValueError(
            f"The encoder {name!r} returned an embedding that is zero or overflows "
            f"{dtype} for row {row} (caption {captions[row]!r}); cosine similarity "
            "needs a non-zero vector."
        )
    return stored


def _check_arguments(
    records: Any, encoder: Any, dtype: Any, chunk_size: Any, lock_timeout: Any
) -> tuple[list[CaptionRecord], str]:
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    positive_int("chunk_size", chunk_size)
    if lock_timeout is not None and not lock_timeout >= 0:
        raise ValueError(f"lock_timeout must be None or >= 0, got {lock_timeout!r}.")
    dim = getattr(encoder, "dim", None)
    if (
        not isinstance(getattr(encoder, "name", None), str)
        or isinstance(dim, bool)
        or not isinstance(dim, (int, np.integer))
        or dim <= 0
        or not callable(getattr(encoder, "encode", None))
    ):
        raise TypeError(
            "encoder must have a str .name, a positive int .dim and .encode(texts) "
            f"(e.g. xclr_plugin.text.TextEncoder), got {type(encoder).__name__}."
        )
    return validate_records(records), str(name)


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
    """Embeds the records' captions into ``out_dir``, reusing a finished cache, resuming an unfinished one, replacing a different one only with ``overwrite``."""
    records, dtype = _check_arguments(records, encoder, dtype, chunk_size, lock_timeout)
    out = folder_argument("out_dir", out_dir, "a folder path")
    if out.exists() and not out.is_dir():
        raise ValueError(f"The caption cache folder {out} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    content = {"encoder": encoder.name, "dim": int(encoder.dim), "dtype": dtype}
    content.update(fingerprint(records))
    try:
        with _build_lock(out, lock_timeout):
            if removed := remove_temporaries(
                out, (MANIFEST_FILE, KEYS_FILE, PROGRESS_FILE)
            ):
                logger.info(
                    "Removed %d temporary file(s) of an interrupted build in %s.",
                    len(removed),
                    out,
                )
            cache = _finished(out, content, overwrite, verify)
            return cache or _build(
                records, out, encoder, content, int(chunk_size), progress, on_chunk
            )
    except _LockUnavailable as err:
        # A folder this process cannot write to (a shared, read-only cache).
        try:
            return _open_built(out, content, verify)
        except (FileNotFoundError, ValueError) as open_err:
            raise ValueError(
                f"Cannot build the caption cache in {out} (the lock file cannot be "
                f"created: {err}), and it holds no usable cache: {open_err}"
            ) from open_err


def _finished(
    out: Path, content: dict[str, Any], overwrite: bool, verify: bool
) -> CaptionCache | None:
    """The folder's finished cache of ``content``, else None after clearing a damaged or (``overwrite``) different one."""
    if not (out / MANIFEST_FILE).exists():
        ours = {PROGRESS_FILE, PARTIAL_FILE}  # an unfinished build of ours
        names = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if names and not overwrite and not ours & set(names):
            raise ValueError(
                f"{out} holds files this builder did not write ("
                + ", ".join(names[:3])
                + (", ..." if len(names) > 3 else "")
                + "). Pass overwrite=True (--overwrite) or choose another folder."
            )
        return None
    try:
        manifest = read_json(out / MANIFEST_FILE, "caption cache manifest")
    except ValueError:
        manifest = None
    diffs = differences(manifest, content) if isinstance(manifest, dict) else None
    if diffs == []:
        try:
            cache = _open_built(out, content, verify)
        except (FileNotFoundError, ValueError) as err:
            logger.warning("Rebuilding the damaged caption cache at %s: %s", out, err)
        else:
            _remove(out / PROGRESS_FILE, out / PARTIAL_FILE)  # killed after publishing
            return cache
    elif not overwrite:
        raise ValueError(
            f"{out} already holds a different caption cache ("
            + "; ".join(diffs or ["unreadable manifest"])
            + "). Pass overwrite=True (--overwrite) or choose another folder."
        )
    # The manifest goes first: a folder without one is never read as a cache.
    _remove(out / MANIFEST_FILE)
    fsync_dir(out)
    _remove(out / DATA_FILE, out / KEYS_FILE)
    return None


def _build(
    records: Sequence[CaptionRecord],
    out: Path,
    encoder: SupportsEncode,
    content: dict[str, Any],
    chunk_size: int,
    progress: bool,
    on_chunk: Callable[[int, int], None] | None,
) -> CaptionCache:
    """Embeds the rows not done yet and publishes the cache (under the build lock)."""
    count, dim, dtype = content["count"], content["dim"], content["dtype"]
    partial, progress_path = out / PARTIAL_FILE, out / PROGRESS_FILE

    def record(rows_done: int) -> None:
        builder = f"pid {os.getpid()} on {socket.gethostname()}"  # for waiting builders
        note = {"fingerprint": content, "rows_done": rows_done, "builder": builder}
        write_json_atomic(progress_path, note)

    rows_done = _resume_point(out, content)
    if rows_done == 0:
        _remove(progress_path, partial)
        array = np.lib.format.open_memmap(
            partial, "w+", dtype=dtype, shape=(count, dim)
        )
        array.flush()
        _reserve_disk_space(partial)
        record(0)
    else:
        logger.info(
            "Resuming the caption cache at %s from row %d of %d.", out, rows_done, count
        )
        array = open_array(partial, "r+", count, dim, dtype)
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
            array[rows_done:stop] = embed_rows(
                encoder, captions, rows_done, stop, dtype
            )
            array.flush()
            record(stop)  # the rows are on disk before the record says so
            bar.update(stop - rows_done)
            rows_done = stop
            if on_chunk is not None:
                on_chunk(rows_done, count)
    del array

    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    # Every row a build writes is finite and non-zero and the file starts as zeros:
    # such a row was never written (the folder was changed by another program).
    never = np.concatenate(bad_rows(open_array(partial, "r", count, dim, dtype)))
    if never.size:
        _remove(progress_path)  # the next run starts afresh
        raise ValueError(
            f"Refusing to publish the caption cache data {partial}: {never.size} "
            f"row(s) were not written by this build (first: row {never.min()}). Was "
            "the folder changed by another program? Run the build again."
        )
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **content}
    manifest.update(normalized=True, data_file=DATA_FILE, keys_file=KEYS_FILE)
    manifest.update(
        data_sha256=file_sha256(partial), created=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    write_json_atomic(out / KEYS_FILE, [r.filename for r in records])
    os.replace(partial, out / DATA_FILE)
    fsync_dir(out)
    write_json_atomic(out / MANIFEST_FILE, manifest)
    _remove(progress_path)
    fsync_dir(out)
    cache = _open_built(out, content, verify=False)
    cache.rows_checked = True  # just checked above
    return cache
