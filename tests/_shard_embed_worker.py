"""``xclr-embed-captions`` with a stand-in encoder, run by tests/test_shard_cache.py (also under torchrun).

Usage: ``python _shard_embed_worker.py [ARGS...]``. The encoder is
:class:`_cache_builder.HashEncoder` (deterministic, nothing to load). With
``XCLR_TEST_KILL=RANK:N`` the process of that rank SIGKILLs itself while writing its
N-th shard file: the temporary file is written, not yet moved into place.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import numpy as np
from _cache_builder import HashEncoder

import xclr_plugin.text
from xclr_plugin.cli.embed_captions import main


class Encoder(HashEncoder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()


def _install_kill(rank: int, count: int) -> None:
    real, written = np.savez, [0]

    def savez(file: Any, *args: Any, **kwargs: Any) -> None:
        real(file, *args, **kwargs)
        written[0] += 1
        if int(os.environ.get("RANK", 0)) == rank and written[0] == count:
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    np.savez = savez  # type: ignore[assignment]


if __name__ == "__main__":
    xclr_plugin.text.TextEncoder = Encoder  # type: ignore[misc,assignment]
    if kill := os.environ.get("XCLR_TEST_KILL"):
        rank, count = kill.split(":")
        _install_kill(int(rank), int(count))
    sys.exit(main(sys.argv[1:]))
