"""The model, the Lightning module whose loss gets targets, the non-finite-loss stop."""

from __future__ import annotations

import torch
from lightly.cli._cli_simclr import _SimCLR
from lightly.embedding import SelfSupervisedEmbedding
from lightly.models import ResNetGenerator
from lightly.models.batchnorm import get_norm_layer
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from xclr_plugin.errors import NonFiniteLossError
from xclr_plugin.integrations.lightly_train.config import ModelConfig

__all__ = ["StopOnNonFiniteLoss", "TargetEmbedding", "build_model"]


def build_model(model: ModelConfig) -> nn.Module:
    """lightly-ssl-train's model: ``ResNetGenerator`` backbone and ``_SimCLR`` head."""
    resnet = ResNetGenerator(model.name, model.width)
    features = nn.Sequential(
        get_norm_layer(3, 0),
        *list(resnet.children())[:-1],
        nn.Conv2d(list(resnet.children())[-1].in_features, model.num_ftrs, 1),
        nn.AdaptiveAvgPool2d(1),
    )
    return _SimCLR(features, num_ftrs=model.num_ftrs, out_dim=model.out_dim)  # type: ignore[no-any-return]


class TargetEmbedding(SelfSupervisedEmbedding):  # type: ignore[misc]
    """lightly's ``SelfSupervisedEmbedding`` whose loss also gets the batch's targets:
    ``criterion(out0, out1, targets)``, the ``(B, Dt)`` caption embeddings or ``(B,)``
    labels that :class:`xclr_plugin.data.XCLRCollate` put in the batch."""

    def training_step(
        self, batch: tuple[list[Tensor], Tensor | None, list[str]], batch_idx: int
    ) -> Tensor:
        """The loss of a batch, logged as ``loss``."""
        (x0, x1), targets, _ = batch
        y0, y1 = self(x0, x1)
        loss: Tensor = self.criterion(y0, y1, targets)
        # Each process's loss covers its own anchors; their mean is the global batch's.
        self.log("loss", loss, sync_dist=True)
        return loss


class StopOnNonFiniteLoss(Callback):  # type: ignore[misc]
    """Stops training on a NaN or infinite loss before its gradients reach the weights.

    Checked before the backward pass, so earlier checkpoints stay finite; under DDP the
    decision is reduced over the processes, so all stop instead of the others hanging.
    """

    def __init__(self, loss_name: str) -> None:
        self.loss_name = loss_name

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        """Raises :class:`NonFiniteLossError` if ``loss`` is not finite on any process."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = str(loss.detach().float().flatten()[0].item())
            raise NonFiniteLossError(
                f"the {self.loss_name} loss is "
                f"{'non-finite on another process' if finite else value} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; training stopped "
                "before this step's update (checkpoints of earlier epochs are kept). "
                "Usual causes: a too high optimizer.lr, a too low "
                "criterion.temperature, or non-finite caption embeddings."
            )
