"""Atomic file writes: a file is either the old one or the complete new one.

Every writer of the package (caption cache, demo results, benchmarks) writes a
:func:`tempfile.mkstemp` file beside the target, syncs it, ``os.replace``-s it over the
target and syncs the folder. The file gets the mode any ``open(path, "w")`` gives
(``0o666`` minus the umask), not mkstemp's ``0600``, which would lock other users of a
shared cache out. A writer killed mid-write leaves its temporary file;
:func:`remove_temporaries` deletes such leftovers when no writer can be alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "fsync_dir",
    "remove_temporaries",
    "write_json_atomic",
    "write_text_atomic",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes renames inside ``path`` durable (no-op where unsupported)."""
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
    """Yields a temporary path beside ``path``; moves it into place if the block succeeds.

    If the block raises, the temporary file is removed and ``path`` is left untouched.

    Raises:
        IsADirectoryError: If ``path`` is an existing folder.
    """
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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def remove_temporaries(
    folder: str | os.PathLike[str], names: Iterable[str]
) -> list[Path]:
    """Deletes the temporary files interrupted writes of ``names`` left in ``folder``.

    Only call it when no writer of these files can be running (e.g. under a lock).

    Returns:
        The paths removed.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                with contextlib.suppress(OSError):  # gone, or not ours to delete
                    tmp.unlink()
                    removed.append(tmp)
    return removed
