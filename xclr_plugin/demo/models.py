"""The image encoder every method trains, and each method's objective.

Every objective is ``loss(z0, z1, targets)`` on the two views' projections and what the
batch carries besides the images, so the training loop is the same for every method.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclr_plugin.demo.config import DemoConfig, MethodSpec
from xclr_plugin.registry import create_loss


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU stages (``w, 2w, 4w, 8w``), max-pooling between them, global
    average pooling. Channels-last: these small convolutions get ~30% cheaper on CPU."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise([3, width, 2 * width, 4 * width, 8 * width]):
            if layers:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)]
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.feature_dim = 8 * width
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, feature_dim)`` of images ``(B, 3, H, W)``."""
        out: Tensor = self.features(x.contiguous(memory_format=torch.channels_last))
        return out


class ImageModel(nn.Module):
    """Backbone plus lightly's SimCLR projection head; identical for every method."""

    def __init__(self, width: int, proj_dim: int) -> None:
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
        super().__init__()
        self.criterion = criterion
        self.pass_targets = pass_targets

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch."""
        args = (z0, z1, targets) if self.pass_targets else (z0, z1)
        loss: Tensor = self.criterion(*args)
        return loss

    def after_step(self) -> None:
        """Nothing to do after an optimizer step."""


class ClipObjective(nn.Module):
    """CLIP: each image view against a text tower with open_clip's ``ClipLoss``, the
    two losses averaged; the logit scale starts at ``1 / 0.07``, as in open_clip.

    The tower is an MLP head on the frozen sentence embeddings or, as the paper's CLIP,
    open_clip's ``TextTransformer`` trained from scratch on the caption tokens.
    """

    def __init__(self, criterion: nn.Module, text_tower: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.text_tower = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch; ``targets`` feed the text tower."""
        assert targets is not None, "CLIP needs the batch's captions as targets"
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
    """open_clip's BPE tokens ``(N, TEXT_CONTEXT)`` and the compacted vocabulary size.

    Only the tokens that occur keep an embedding row, renumbered in their original
    order, so padding stays 0 and end-of-text the largest id (open_clip's ``argmax``
    pooling finds it); a 49,408-row table would dwarf the tiny tower.
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
                context_length=TEXT_CONTEXT, vocab_size=vocab_size, width=TEXT_WIDTH,
                heads=TEXT_HEADS, layers=TEXT_LAYERS, output_dim=config.proj_dim,
            )  # fmt: skip
        else:
            tower = SimCLRProjectionHead(text_dim, 2 * config.proj_dim, config.proj_dim)
        return ClipObjective(create_loss("clip"), tower)
    kwargs: dict[str, Any] = {"temperature": config.temperature}
    target_temperature = {"xclr": config.target_temperature,
                          "supcon": config.supcon_target_temperature}  # fmt: skip
    if spec.loss in target_temperature:
        kwargs["target_temperature"] = target_temperature[spec.loss]
    return TwoViewObjective(create_loss(spec.loss, **kwargs), spec.targets != "none")
