"""``xclr-wise-ft ZERO_SHOT FINETUNED --alpha A -o OUT``: WiSE-FT weight interpolation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from xclr_plugin.errors import ArgumentParser, run_command

PROG = "xclr-wise-ft"


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="WiSE-FT: write (1 - alpha) * ZERO_SHOT + alpha * FINETUNED for "
        "every floating tensor (the rest from FINETUNED). Each input is a plain state "
        "dict (e.g. a local-dir: folder's open_clip_pytorch_model.bin) or an "
        "open_clip_train checkpoint (logs/NAME/checkpoints/epoch_N.pt).",
    )
    parser.add_argument("zero_shot", metavar="ZERO_SHOT", type=Path)
    parser.add_argument("finetuned", metavar="FINETUNED", type=Path)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="0: ZERO_SHOT, 1: FINETUNED (default: 0.5)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="state dict file to write"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the file is written; 2 after a one-line error on stderr."""
    args = _parser().parse_args(argv)

    def run() -> int:
        from xclr_plugin.integrations.open_clip_train.wise_ft import interpolate

        out = interpolate(args.zero_shot, args.finetuned, args.alpha, args.output)
        print(f"{PROG}: wrote {out} (alpha {args.alpha})")
        return 0

    return int(run_command(PROG, run))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
