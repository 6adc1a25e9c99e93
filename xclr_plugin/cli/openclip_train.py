"""Temporary shim (being replaced): ``xclr-openclip-train``."""

from xclr_plugin.integrations.open_clip_train import main

__all__ = ["main"]
