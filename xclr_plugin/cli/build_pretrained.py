"""``xclr-build-pretrained OUT_DIR``: the EfficientNet-Lite0 + all-MiniLM-L6-v2 open_clip
model as a ``local-dir:`` folder, verified before it appears."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xclr_plugin.errors import ArgumentParser, run_command
from xclr_plugin.integrations.open_clip_pretrained import (
    DEFAULT_CONTEXT_LENGTH,
    WEIGHTS_FILE,
    PretrainedCheckError,
    build_pretrained_openclip,
)

PROG = "xclr-build-pretrained"


def _context_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 512:
        raise argparse.ArgumentTypeError(f"must be in 1..512, got {value}")
    return value


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Assemble an ImageNet-pretrained EfficientNet-Lite0 image tower and "
        "the all-MiniLM-L6-v2 sentence encoder (both from PyPI wheels, offline) into an "
        "open_clip model folder: train it with xclr-openclip-train --model "
        "local-dir:OUT_DIR. The folder is checked against the original models before "
        "it appears.",
    )
    parser.add_argument("output", metavar="OUT_DIR", help="folder to write")
    parser.add_argument(
        "--context-length", type=_context_length, default=DEFAULT_CONTEXT_LENGTH,
        help=f"tokens per caption (default: {DEFAULT_CONTEXT_LENGTH}; "
        "xclr-openclip-train --force-context-length overrides it)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUT_DIR"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the folder is written; 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)

    def build() -> int:
        report = build_pretrained_openclip(
            args.output, context_length=args.context_length, overwrite=args.overwrite
        )
        print(
            f"Built {report.path} in {report.seconds:.0f} s; checked: image logits "
            f"within {report.image_max_abs_diff:.1e} of the original EfficientNet-"
            f"Lite0's, text features within {report.text_max_abs_diff:.1e} of "
            f"SentenceTransformer's. Train it: xclr-openclip-train --model "
            f"local-dir:{args.output} ... (weights: {report.path / WEIGHTS_FILE})."
        )
        return 0

    errors = (ValueError, OSError, ImportError, PretrainedCheckError)
    return run_command(PROG, build, errors)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
