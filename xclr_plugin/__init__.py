"""X-CLR (X-Sample Contrastive Loss) for lightly and open_clip."""

from xclr_plugin.loss import XCLRLoss

__all__ = ["XCLRLoss"]
__version__ = "0.1.0"
