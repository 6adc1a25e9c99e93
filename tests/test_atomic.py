"""Atomic writes: the target is the old file or the complete new one, never a mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xclr_plugin.atomic import atomic_path, write_json_atomic, write_text_atomic


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
