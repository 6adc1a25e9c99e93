"""A caption-cache builder run as a separate process by tests/test_cache_concurrency.py.

Usage: ``python _cache_builder.py OUT_DIR CONTROL_DIR MODE``. It builds a cache of
:data:`RECORDS` with :class:`HashEncoder` (deterministic, no model to load) through the
real :func:`xclr_plugin.cache.build_caption_cache`. ``MODE`` says how it misbehaves:

- ``pause``: in its first ``encode`` call, writes ``CONTROL_DIR/started`` and waits
  for ``CONTROL_DIR/go`` (so a second builder can start in the middle of its build);
- ``plain``: builds at once;
- ``kill-at-progress-replace:N``: SIGKILLs itself at its N-th atomic replacement of
  ``progress.json``, after the temporary file is written (a crash mid-write);
- ``kill-after-manifest``: SIGKILLs itself right after the manifest is published,
  before the progress file is removed;
- ``slow``: sleeps in every ``encode`` call (to be killed from outside).

It writes ``CONTROL_DIR/<MODE-name>.ready`` just before it calls the build and
``CONTROL_DIR/<MODE-name>.calls`` (captions it embedded) when it returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from xclr_plugin import atomic
from xclr_plugin.cache import MANIFEST_FILE, PROGRESS_FILE, build_caption_cache
from xclr_plugin.captions import CaptionRecord

DIM = 16
RECORDS = [CaptionRecord(f"img_{i:03d}.png", f"caption number {i}") for i in range(100)]
CHUNK = 10


def expected_rows(records: Sequence[CaptionRecord] = RECORDS) -> np.ndarray:
    """The float32 unit rows :class:`HashEncoder` gives ``records``."""
    return HashEncoder().encode([r.caption for r in records]).numpy()


class HashEncoder:
    """A deterministic stand-in for a sentence encoder: unit vectors seeded by text."""

    name, dim = "hash-encoder", DIM

    def __init__(self, control: Path | None = None, mode: str = "plain") -> None:
        self.control, self.mode = control, mode
        self.calls = 0
        self.embedded = 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        if self.mode == "pause" and self.calls == 1 and self.control is not None:
            (self.control / "started").write_text(str(os.getpid()))
            while not (self.control / "go").exists():
                time.sleep(0.05)
        if self.mode == "slow":
            time.sleep(0.3)
        self.embedded += len(texts)
        rows = [
            np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM)
            for t in texts
        ]
        values = torch.tensor(np.stack(rows), dtype=torch.float32)
        return torch.nn.functional.normalize(values, dim=1)


def _install_kill(mode: str) -> None:
    """Makes the process SIGKILL itself at the point ``mode`` names."""
    real_replace = os.replace
    replaced = {"progress": 0}

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        name = Path(dst).name
        if mode.startswith("kill-at-progress-replace:") and name == PROGRESS_FILE:
            replaced["progress"] += 1
            if replaced["progress"] == int(mode.split(":")[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if mode == "kill-after-manifest" and name == MANIFEST_FILE:
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.os.replace = replace  # type: ignore[assignment]


def main() -> None:
    out, control, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.INFO, format="builder: %(message)s")
    _install_kill(mode)
    encoder = HashEncoder(control, mode)
    tag = mode.split(":")[0]
    (control / f"{tag}.ready").write_text("")
    build_caption_cache(RECORDS, out, encoder, chunk_size=CHUNK, progress=False)
    (control / f"{tag}.calls").write_text(json.dumps(encoder.embedded))


if __name__ == "__main__":
    main()
