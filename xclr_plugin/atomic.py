"""Atomic writes (mkstemp beside the target, fsync, ``os.replace``), with ``open()``'s mode, not mkstemp's 0600.

Files: :func:`atomic_path`; folders: :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    # Python has no getter: set and restore (briefly, to a mask that exposes nothing).
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; moves it into place if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"Cannot write {target}: it is a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    tmp = Path(name)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; moves it into place if the block succeeds.

    Readers see no folder or a complete one. A folder already at ``path`` is replaced
    (moved aside, then deleted: the one moment between the two renames, ``path`` is
    missing); refusing it is the caller's decision. A failed block leaves ``path`` as it was.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot write the folder {target}: it is a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    )
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.is_dir() and any(target.iterdir()):
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{target.name}.", suffix=".old", dir=target.parent
                )
            )
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the old folder back
                raise
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def remove_temporaries(
    folder: str | os.PathLike[str], names: Iterable[str]
) -> list[Path]:
    """Deletes what interrupted writes of ``names`` left in ``folder`` (call with no writer alive)."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                with contextlib.suppress(OSError):  # gone, or not ours to delete
                    tmp.unlink()
                    removed.append(tmp)
    return removed
