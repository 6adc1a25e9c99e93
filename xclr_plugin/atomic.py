"""Atomic file writes: a file is either the old one or the complete new one.

Every writer in the package (caption cache, demo results, benchmarks) goes through
:func:`atomic_path`: write to a temporary file beside the target, flush it to disk,
``os.replace`` it over the target, then sync the folder so the rename survives a crash.

The temporary file is created with mode ``0o666`` filtered by the process umask, like
any file ``open(path, "w")`` creates, so the published file has the permissions the
user expects (``tempfile.mkstemp`` would make it ``0600`` and lock other users of a
shared cache out). A writer killed mid-write (``SIGKILL``, power loss) cannot remove
its temporary file; :func:`remove_temporaries` deletes such leftovers, and callers run
it when they know no other writer of the folder is alive (the caption cache does, under
its build lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "fsync_dir",
    "remove_temporaries",
    "temporary_name_pattern",
    "write_json_atomic",
    "write_text_atomic",
]

_TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes renames inside ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temporary_name_pattern(name: str) -> str:
    """The glob pattern of the temporary files :func:`atomic_path` makes for ``name``."""
    return f".{name}.*{_TMP_SUFFIX}"


def _create_temporary(target: Path) -> Path:
    """Creates an empty, new temporary file beside ``target`` (mode 0o666 & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # pragma: no cover - 2**32 names
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(  # pragma: no cover
        f"Could not create a temporary file beside {target}."
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; moves it into place if the block succeeds.

    If the block raises, the temporary file is removed and ``path`` is left untouched.
    The file gets the permissions of a newly created file (``0o666`` minus the umask).

    Raises:
        IsADirectoryError: If ``path`` is an existing folder.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"Cannot write {target}: it is a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(target)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


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
    """Deletes the temporary files that interrupted writes of ``names`` left in ``folder``.

    Only call this when no writer of these files can be running (e.g. under a lock):
    a live writer's temporary file would be deleted under it.

    Args:
        folder: The folder the files are written to.
        names: Target file names (``"manifest.json"``, ...).

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    root = Path(folder)
    for name in names:
        for tmp in root.glob(temporary_name_pattern(name)):
            if tmp.is_file() and not tmp.is_symlink():
                # Gone already, or not ours to delete (a read-only folder): skip it.
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
    return removed
