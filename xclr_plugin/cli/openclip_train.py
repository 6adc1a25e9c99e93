"""``xclr-openclip-train`` (under torchrun: ``-m xclr_plugin.cli.openclip_train``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from xclr_plugin.errors import UsageError, run_command
from xclr_plugin.integrations.open_clip_train.options import PROG, parse
from xclr_plugin.integrations.open_clip_train.patch import patch_open_clip_train


def main(argv: Sequence[str] | None = None) -> int | None:
    """open_clip's result; 2 after a one-line input error, 1 after a non-finite loss."""
    options, rest = parse(sys.argv[1:] if argv is None else argv)

    def train() -> int | None:
        with patch_open_clip_train(options) as open_clip_main:
            result = open_clip_main(rest)
        if (
            result == -1
        ):  # open_clip printed why (e.g. a run of that --name started meanwhile)
            raise UsageError(
                "open_clip_train stopped with the error it printed above (for "
                "'Experiment already exists': another run with this --name started "
                "meanwhile; give another --name)."
            )
        return result  # type: ignore[no-any-return]

    return run_command(PROG, train, errors=(UsageError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
