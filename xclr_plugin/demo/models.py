"""The image encoder every method trains, and each method's objective.

All objectives take the two views' projections ``(z0, z1)`` and what the batch carries
besides the images (nothing, labels, frozen caption embeddings or caption tokens), so
the training loop is the same for every method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclr_plugin.demo.config import DemoConfig, MethodSpec
from xclr_plugin.registry import create_loss

__all__ = [
    "ClipObjective",
    "ImageModel",
    "SmallConvNet",
    "TwoViewObjective",
    "build_objective",
    "tokenize_captions",
]


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 convolution, batch norm, ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """A small CNN for tiny images: four conv stages, max-pooling between them.

    Widths ``w, 2w, 4w, 8w``; global average pooling gives ``8w`` features. Weights
    and inputs use the channels-last memory format, which makes these small
    convolutions about 30% cheaper on CPU (oneDNN).

    Attributes:
        feature_dim: Size of the pooled features.
    """

    def __init__(self, width: int = 16) -> None:
        """Builds the network with ``width`` channels in the first stage."""
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(3, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *_conv_block(4 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.feature_dim = 8 * w
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, feature_dim)`` of images ``(B, 3, H, W)``."""
        out: Tensor = self.features(x.contiguous(memory_format=torch.channels_last))
        return out


class ImageModel(nn.Module):
    """Backbone plus lightly's SimCLR projection head; identical for every method."""

    def __init__(self, width: int, proj_dim: int) -> None:
        """Builds backbone and head."""
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = SmallConvNet(width)
        dim = self.backbone.feature_dim
        self.projection_head = SimCLRProjectionHead(dim, dim, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projections (not normalised; the losses normalise)."""
        out: Tensor = self.projection_head(self.backbone(x))
        return out


class TwoViewObjective(nn.Module):
    """``loss(z0, z1[, targets])`` for lightly-style two-view losses."""

    def __init__(self, criterion: nn.Module, pass_targets: bool) -> None:
        """Wraps NTXentLoss, XCLRLoss or the SupCon form of XCLRLoss."""
        super().__init__()
        self.criterion = criterion
        self.pass_targets = pass_targets

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch."""
        if self.pass_targets:
            loss: Tensor = self.criterion(z0, z1, targets)
        else:
            loss = self.criterion(z0, z1)
        return loss

    def after_step(self) -> None:
        """Nothing to do after an optimizer step."""


class ClipObjective(nn.Module):
    """CLIP: image projections against a text tower, with open_clip's ``ClipLoss``.

    The text tower is either a trainable MLP head on frozen sentence embeddings
    (``targets`` are those embeddings) or open_clip's ``TextTransformer`` trained from
    scratch on the caption tokens (``targets`` are token ids), as the paper's CLIP
    baseline. Each image view is contrasted with the captions and the two losses are
    averaged, so the image side sees the same images as the two-view methods. The
    logit scale is learnable, starts at ``1 / 0.07`` and is clamped to at most 100
    after each step, as in open_clip.
    """

    def __init__(self, criterion: nn.Module, text_tower: nn.Module) -> None:
        """Wraps ``ClipLoss`` and the text tower."""
        super().__init__()
        self.criterion = criterion
        self.text_tower = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch; ``targets`` feed the text tower."""
        if targets is None:
            raise ValueError(
                "The CLIP objective needs the batch's captions as targets."
            )
        text = F.normalize(self.text_tower(targets), dim=-1)
        scale = self.logit_scale.exp()
        losses = [self.criterion(F.normalize(z, dim=-1), text, scale) for z in (z0, z1)]
        out: Tensor = (losses[0] + losses[1]) / 2
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamps the logit scale to ``[0, log 100]``, as open_clip's training loop."""
        self.logit_scale.clamp_(0, math.log(100))


#: The scratch text transformer: tiny, so it trains in the demo's budget.
TEXT_CONTEXT, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS = 16, 64, 2, 2


def tokenize_captions(captions: Sequence[str]) -> tuple[Tensor, int]:
    """open_clip's BPE tokens of the captions, with the vocabulary compacted.

    Only the tokens that occur keep an embedding row, renumbered in their original
    order, so padding stays 0 and end-of-text stays the largest id (open_clip's
    ``argmax`` pooling finds it); a 49,408-row table would dwarf the tiny tower.

    Returns:
        ``(tokens (N, TEXT_CONTEXT) int64, vocabulary size)``.
    """
    from open_clip.tokenizer import SimpleTokenizer

    raw = SimpleTokenizer(context_length=TEXT_CONTEXT)(list(captions))
    used = torch.unique(torch.cat([raw.flatten(), torch.zeros(1, dtype=raw.dtype)]))
    return torch.searchsorted(used, raw), len(used)


def build_objective(
    spec: MethodSpec, config: DemoConfig, text_dim: int, vocab_size: int = 0
) -> nn.Module:
    """Builds a method's objective; every loss comes from the registry."""
    from lightly.models.modules import SimCLRProjectionHead

    if spec.loss == "clip":
        tower: nn.Module
        if spec.targets == "tokens":
            from open_clip.transformer import TextTransformer

            tower = TextTransformer(
                context_length=TEXT_CONTEXT,
                vocab_size=vocab_size,
                width=TEXT_WIDTH,
                heads=TEXT_HEADS,
                layers=TEXT_LAYERS,
                output_dim=config.proj_dim,
            )
        else:
            tower = SimCLRProjectionHead(text_dim, 2 * config.proj_dim, config.proj_dim)
        return ClipObjective(create_loss("clip"), tower)
    kwargs: dict[str, Any] = {"temperature": config.temperature}
    if spec.loss == "xclr":
        kwargs["target_temperature"] = config.target_temperature
    elif spec.loss == "supcon":
        kwargs["target_temperature"] = config.supcon_target_temperature
    return TwoViewObjective(create_loss(spec.loss, **kwargs), spec.targets != "none")
