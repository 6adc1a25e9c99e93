"""``xclr-build-pretrained OUTPUT``: the EfficientNet-Lite0 + all-MiniLM-L6-v2 open_clip
model as a ``local-dir:`` folder, checked against the original models before it appears."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from xclr_plugin.errors import ArgumentParser, run_command

PROG = "xclr-build-pretrained"


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Assemble an ImageNet-pretrained EfficientNet-Lite0 image tower and "
        "the all-MiniLM-L6-v2 sentence encoder (both from PyPI wheels, offline) into an "
        "open_clip model folder; train it with xclr-openclip-train --model "
        "local-dir:OUTPUT.",
    )
    parser.add_argument("output", metavar="OUTPUT", type=Path, help="folder to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUTPUT"
    )
    return parser


def _quiet_transformers() -> None:
    """No weight-loading bars or load reports (MiniLM's unused pooler) in the output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the build names the missing extra
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the folder is written; 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)

    def build() -> int:
        from xclr_plugin.integrations.open_clip_train import pretrained

        _quiet_transformers()
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        pretrained.logger.addHandler(handler)
        pretrained.logger.setLevel(logging.INFO)
        pretrained.logger.propagate = False
        try:
            folder = pretrained.build_pretrained(args.output, overwrite=args.overwrite)
        finally:
            pretrained.logger.removeHandler(handler)
        print(f"{PROG}: wrote {folder}; train it: --model local-dir:{args.output}")
        return 0

    return int(run_command(PROG, build))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
