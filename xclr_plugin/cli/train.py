"""Temporary shim (being replaced): ``xclr-train``."""

from xclr_plugin.integrations.lightly_train import main

__all__ = ["main"]
