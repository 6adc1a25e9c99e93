"""``python -m xclr_plugin.demo``: the same as ``xclr-demo``."""

import sys

from xclr_plugin.demo.cli import main

sys.exit(main())
