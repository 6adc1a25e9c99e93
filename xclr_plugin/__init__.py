"""X-CLR (X-Sample Contrastive Loss) for lightly and open_clip."""

from typing import TYPE_CHECKING, Any

from xclr_plugin.loss import XCLRLoss
from xclr_plugin.registry import build_criterion, create_loss, list_losses, loss_info

if TYPE_CHECKING:
    from xclr_plugin.clip_loss import XCLRClipLoss

__all__ = [
    "XCLRClipLoss",
    "XCLRLoss",
    "build_criterion",
    "create_loss",
    "list_losses",
    "loss_info",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # XCLRClipLoss subclasses open_clip's ClipLoss: import open_clip only when asked.
    if name == "XCLRClipLoss":
        from xclr_plugin.clip_loss import XCLRClipLoss

        return XCLRClipLoss
    raise AttributeError(f"module 'xclr_plugin' has no attribute {name!r}")
