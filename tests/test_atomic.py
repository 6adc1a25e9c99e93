"""Atomic writes: the target is the old file or the complete new one, never a mix."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from xclr_plugin.atomic import (
    atomic_dir,
    atomic_path,
    remove_temporaries,
    write_json_atomic,
    write_text_atomic,
)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json_atomic(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_text('{"accuracy": 0.')
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "table.md"
    write_text_atomic(target, "| x |\n")
    assert target.read_text() == "| x |\n"


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]
)
def test_written_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Issue 12: files were always 0600 (tempfile.mkstemp), locking other users out."""
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
        write_text_atomic(tmp_path / "results.txt", "x")
        with atomic_path(tmp_path / "results.png") as tmp:
            tmp.write_bytes(b"\x89PNG")
        plain = tmp_path / "plain.txt"
        plain.write_text("reference: a file open() creates")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    for name in ("results.json", "results.txt", "results.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_remove_temporaries_deletes_only_leftovers_of_the_named_files(
    tmp_path: Path,
) -> None:
    target = tmp_path / "manifest.json"
    leftover = tmp_path / ".manifest.json.1a2b3c4d.tmp"
    leftover.write_text("{")
    other = tmp_path / ".results.json.1a2b3c4d.tmp"
    other.write_text("{")
    keep = tmp_path / "manifest.json.tmp"
    keep.write_text("a user's file")
    assert remove_temporaries(tmp_path, [target.name]) == [leftover]
    assert not leftover.exists() and other.exists() and keep.exists()


def test_a_directory_target_is_refused_before_writing(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_text_atomic(tmp_path / "out", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "a.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask_now()
    with pytest.raises(RuntimeError, match="interrupted"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries


def test_atomic_dir_replaces_an_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError), atomic_dir(tmp_path / "file"):
        pass


def _umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
