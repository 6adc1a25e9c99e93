"""Temporary shim (being replaced): ``xclr-embed-captions``."""

from xclr_plugin.cache import main

__all__ = ["main"]
