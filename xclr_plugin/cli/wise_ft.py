"""``xclr-wise-ft ZERO_SHOT FINE_TUNED -o OUT --alpha A``: WiSE-FT weight interpolation
of two open_clip checkpoints of one model."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from xclr_plugin.errors import ArgumentParser, run_command
from xclr_plugin.integrations.open_clip_wise_ft import wise_ft

PROG = "xclr-wise-ft"


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="WiSE-FT: write (1 - alpha) * ZERO_SHOT + alpha * FINE_TUNED, "
        "entry by entry, for two checkpoints of one open_clip model (alpha 0 and 1 "
        "give them bit for bit; integer buffers such as BatchNorm counters are the "
        "fine-tuned one's). A local-dir: folder as ZERO_SHOT gives a folder "
        "(--model local-dir:OUT), a file gives a state-dict file (--pretrained OUT).",
    )
    add = parser.add_argument
    # fmt: off
    add("zero_shot", metavar="ZERO_SHOT",
        help="the model before fine-tuning: a local-dir: folder or a checkpoint file")
    add("fine_tuned", metavar="FINE_TUNED",
        help="the fine-tuned checkpoint (e.g. logs/NAME/checkpoints/epoch_5.pt)")
    add("-o", "--output", required=True, help="folder or file to write")
    add("--alpha", type=_alpha, default=0.5,
        help="weight of the fine-tuned checkpoint, in [0, 1] (default: 0.5)")
    add("--overwrite", action="store_true", help="replace an existing OUTPUT")
    # fmt: on
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the output is written; 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)

    def run() -> int:
        out = wise_ft(
            args.zero_shot, args.fine_tuned, args.output, args.alpha,
            overwrite=args.overwrite,
        )  # fmt: skip
        print(f"Wrote {out}: {1 - args.alpha:g} x {args.zero_shot} + {args.alpha:g} x {args.fine_tuned}.")  # fmt: skip
        return 0

    return run_command(PROG, run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
