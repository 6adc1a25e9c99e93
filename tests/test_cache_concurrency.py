"""Caption-cache builds in real, separate processes: concurrent builders and crashes.

Each builder is ``tests/_cache_builder.py`` run with ``python`` (the real
``build_caption_cache``, a deterministic hash encoder, no model to load). The oracle is
the encoder's own output for every row: a published cache must equal it exactly (up
to float16 storage), pass ``verify_checksum`` and ``check_finite``, and leave no
temporary or progress file behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xclr_plugin.cache import (
    DATA_FILE,
    KEYS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    CaptionCache,
    build_caption_cache,
)

sys.path.insert(0, str(Path(__file__).parent))
from _cache_builder import RECORDS, HashEncoder, expected_rows

pytestmark = pytest.mark.distributed  # spawns processes

SCRIPT = Path(__file__).parent / "_cache_builder.py"
PUBLISHED = sorted([DATA_FILE, KEYS_FILE, LOCK_FILE, MANIFEST_FILE])
FP16_ATOL = 2e-3


def _start(out: Path, control: Path, mode: str) -> subprocess.Popen[str]:
    path = os.pathsep.join(
        filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")])
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(control), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(
                f"builder exited early ({process.returncode}):\n{output}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _assert_complete(out: Path) -> None:
    """The published cache holds every row the encoder gives, and nothing else."""
    assert sorted(p.name for p in out.iterdir()) == PUBLISHED
    cache = CaptionCache.open(
        out, records=RECORDS, verify_checksum=True, check_finite=True
    )
    np.testing.assert_allclose(
        cache[:].numpy(), expected_rows(), atol=FP16_ATOL, rtol=0
    )


def test_second_builder_waits_for_the_first(tmp_path: Path) -> None:
    """Issue 12, wrong #2: two builders of one folder published a half-filled array."""
    out, control = tmp_path / "cache", tmp_path / "control"
    control.mkdir()
    first = _start(out, control, "pause")
    try:
        _wait_for(control / "started", first)  # holds the lock, inside its first chunk
        second = _start(out, control, "plain")
        try:
            _wait_for(control / "plain.ready", second)
            time.sleep(1.0)  # the second builder has reached the lock
            assert second.poll() is None, second.stdout.read() if second.stdout else ""
            assert not (out / MANIFEST_FILE).exists()
            (control / "go").write_text("")
            out_first, _ = first.communicate(timeout=120)
            out_second, _ = second.communicate(timeout=120)
        finally:
            second.kill()
    finally:
        first.kill()
    assert first.returncode == 0, out_first
    assert second.returncode == 0, out_second
    assert "Waiting for another process (pid" in out_second
    assert json.loads((control / "pause.calls").read_text()) == len(RECORDS)
    # The second builder found the finished cache and embedded nothing.
    assert json.loads((control / "plain.calls").read_text()) == 0
    _assert_complete(out)


def test_killed_builder_frees_the_lock_and_resume_cleans_up(tmp_path: Path) -> None:
    """Issue 12, wrong #6: a crash mid-write left ``*.tmp`` and progress.json forever."""
    out, control = tmp_path / "cache", tmp_path / "control"
    control.mkdir()
    # Killed after writing the 4th progress record to its temporary file, before the
    # rename: rows 0-29 are on disk, progress.json says 20.
    crashed = _start(out, control, "kill-at-progress-replace:4")
    output, _ = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL, output
    leftovers = sorted(p.name for p in out.iterdir())
    assert PARTIAL_FILE in leftovers and PROGRESS_FILE in leftovers
    assert any(name.startswith(".progress.json.") for name in leftovers)
    assert json.loads((out / PROGRESS_FILE).read_text())["rows_done"] == 20

    # (That the kernel released the dead builder's lock is checked below, with a
    # lock timeout.)
    encoder = HashEncoder()
    build_caption_cache(RECORDS, out, encoder, chunk_size=10, progress=False)
    assert encoder.embedded == len(RECORDS) - 20  # resumed, nothing embedded twice
    _assert_complete(out)


def test_kill_after_publishing_leaves_no_progress_file(tmp_path: Path) -> None:
    out, control = tmp_path / "cache", tmp_path / "control"
    control.mkdir()
    crashed = _start(out, control, "kill-after-manifest")
    output, _ = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL, output
    assert (out / PROGRESS_FILE).exists() and (out / MANIFEST_FILE).exists()
    encoder = HashEncoder()
    build_caption_cache(RECORDS, out, encoder, chunk_size=10, progress=False)
    assert encoder.embedded == 0  # the published cache is complete
    _assert_complete(out)


def test_builder_killed_from_outside_mid_build(tmp_path: Path) -> None:
    out, control = tmp_path / "cache", tmp_path / "control"
    control.mkdir()
    slow = _start(out, control, "slow")
    deadline = time.monotonic() + 120
    while True:  # let it commit a few chunks, then kill it wherever it is
        try:
            done = json.loads((out / PROGRESS_FILE).read_text())["rows_done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = 0
        if done >= 30:
            break
        assert slow.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=60)
    # The kernel released the dead builder's lock: no waiting (TimeoutError if not).
    encoder = HashEncoder()
    build_caption_cache(
        RECORDS, out, encoder, chunk_size=10, progress=False, lock_timeout=5
    )
    assert 0 < encoder.embedded <= len(RECORDS) - 30
    _assert_complete(out)
