"""``xclr-openclip-train``: ``open_clip_train.main`` with ``--loss NAME`` and X-CLR.

Under torchrun: ``torchrun ... -m xclr_plugin.cli.openclip_train ARGS``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from xclr_plugin.errors import UsageError, run_command
from xclr_plugin.integrations.open_clip_train.options import PROG, parse, parser
from xclr_plugin.integrations.open_clip_train.patch import patch_open_clip_train


def main(argv: Sequence[str] | None = None) -> int | None:
    """Runs ``open_clip_train.main(argv)`` with ``--loss`` and the X-CLR flags.

    Returns:
        open_clip's result; after a one-line error 2 (bad input, nothing written) or
        1 (a non-finite loss stopped training before its update).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser().print_help()
        print("\nopen_clip_train.main arguments:\n")  # open_clip's parser prints them
    options, rest = parse(argv)

    def train() -> int | None:
        with patch_open_clip_train(options):
            import open_clip_train.main as ocm

            return ocm.main(rest)  # type: ignore[no-any-return]

    return run_command(PROG, train, errors=(UsageError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
