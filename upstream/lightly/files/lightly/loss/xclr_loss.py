"""X-Sample Contrastive Loss (X-CLR)"""

# Copyright (c) 2020. Lightly AG and its affiliates.
# All Rights Reserved

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as torch_dist

from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist


class XCLRLoss(nn.Module):
    """Implementation of the X-Sample Contrastive Loss (X-CLR).

    X-CLR[0] replaces the one-hot target of NT-Xent[1] with a soft target
    distribution built from how similar the samples' descriptions are: caption
    embeddings of a frozen text encoder, or class labels. Without targets the loss
    equals NTXentLoss. With a memory bank the loss behaves like MoCo[2] and the
    bank stores each entry's description next to its embedding.

    - [0] X-CLR, 2025, https://arxiv.org/abs/2407.18134
    - [1] SimCLR, 2020, https://arxiv.org/abs/2002.05709
    - [2] MoCo, 2020, https://arxiv.org/abs/1911.05722

    Attributes:
        temperature:
            Scale logits by the inverse of the temperature.
        target_temperature:
            Scale the description similarities by the inverse of this temperature
            before the softmax that gives the target distribution.
        memory_bank_size:
            Size of the memory bank as (num_features, dim) tuple. If num_features
            is 0, the memory bank is disabled.
        gather_distributed:
            If True then negatives and targets from all GPUs are gathered before the
            loss calculation.

    Raises:
        ValueError: If temperature or target_temperature is not positive.

    Examples:
        >>> loss_fn = XCLRLoss(temperature=0.1, target_temperature=0.1)
        >>>
        >>> # generate two random transforms of images
        >>> t0 = transforms(images)
        >>> t1 = transforms(images)
        >>>
        >>> # feed through the model
        >>> out0, out1 = model(t0), model(t1)
        >>>
        >>> # caption embeddings (batch_size, text_dim) or labels (batch_size,)
        >>> loss = loss_fn(out0, out1, text_encoder(captions))
        >>> loss = loss_fn(out0, out1, labels)
        >>> loss = loss_fn(out0, out1)  # equals NTXentLoss
    """

    def __init__(
        self,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("temperature", temperature),
            ("target_temperature", target_temperature),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Illegal {name}: {value}, must be positive.")
        if gather_distributed and not torch_dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch version with "
                "distributed support."
            )
        self.temperature = temperature
        self.target_temperature = target_temperature
        self.gather_distributed = gather_distributed
        self.memory_bank = MemoryBankModule(
            size=memory_bank_size, gather_distributed=gather_distributed
        )
        self.bank_targets: Optional[Tensor] = None
        self.bank_valid: Optional[Tensor] = None

    def forward(
        self, out0: Tensor, out1: Tensor, targets: Optional[Tensor] = None
    ) -> Tensor:
        """Computes the X-CLR loss.

        Args:
            out0:
                Output projections of the first set of transformed images.
                Shape: (batch_size, embedding_size)
            out1:
                Output projections of the second set of transformed images.
                Shape: (batch_size, embedding_size)
            targets:
                Caption embeddings, shape (batch_size, text_dim), or integer class
                labels, shape (batch_size,). None gives the NTXentLoss.

        Returns:
            X-CLR loss value.
        """
        batch_size = out0.shape[0]
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        if targets is not None:
            targets = targets.detach()
            if targets.is_floating_point():
                targets = F.normalize(targets.to(out0.dtype), dim=1)
        if self.memory_bank.size[0] > 0:
            return self._forward_memory_bank(out0, out1, targets)

        if self.gather_distributed and dist.world_size() > 1:
            out0_large = torch.cat(dist.gather(out0), 0)
            out1_large = torch.cat(dist.gather(out1), 0)
            targets_large = targets
            if targets is not None:
                targets_large = torch.cat(dist.gather(targets), 0)
            offset = dist.rank() * batch_size
        else:
            out0_large, out1_large, targets_large = out0, out1, targets
            offset = 0

        # Rows: local views, columns: all views. The own column is excluded.
        m = out0_large.shape[0]
        own = torch.arange(batch_size, device=out0.device) + offset
        own = torch.cat([own, own + m])
        is_self = F.one_hot(own, 2 * m).bool()
        is_other = F.one_hot((own + m) % (2 * m), 2 * m).bool()
        rows = torch.cat([out0, out1])
        logits = rows @ torch.cat([out0_large, out1_large]).T / self.temperature
        log_probs = torch.log_softmax(logits.masked_fill(is_self, -math.inf), dim=1)
        if targets is None or targets_large is None:
            target_probs = is_other.to(log_probs.dtype)
        else:
            sim = _similarity(targets, targets_large).to(log_probs.dtype)
            sim = sim.repeat(2, 2).masked_fill(is_other, 1.0)
            sim = (sim / self.target_temperature).masked_fill(is_self, -math.inf)
            target_probs = torch.softmax(sim, dim=1)
        loss = -(target_probs * log_probs.masked_fill(is_self, 0.0)).sum(dim=1)
        return loss.mean()

    def _forward_memory_bank(
        self, out0: Tensor, out1: Tensor, targets: Optional[Tensor]
    ) -> Tensor:
        update = out0.requires_grad
        # A bank without feature dimension is initialized in its first forward pass.
        ptr = int(self.memory_bank.bank_ptr) if self.memory_bank.bank.ndim > 1 else 0
        out1, negatives = self.memory_bank.forward(out1, update=update)
        negatives = negatives.to(device=out0.device, dtype=out0.dtype)
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature
        if targets is None:
            labels = torch.zeros(logits.shape[0], device=out0.device, dtype=torch.long)
            return F.cross_entropy(logits, labels)

        size = self.memory_bank.size[0]
        if self.bank_targets is None or self.bank_valid is None:
            self.bank_targets = targets.new_zeros((size,) + tuple(targets.shape[1:]))
            self.bank_valid = torch.zeros(size, dtype=torch.bool, device=out0.device)
        bank_targets = self.bank_targets.to(targets.device)
        bank_valid = self.bank_valid.to(targets.device)
        sim = torch.cat(
            [torch.ones_like(sim_pos), _similarity(targets, bank_targets).to(logits)],
            dim=1,
        )
        # Bank entries without a description are unrelated to everything.
        invalid = torch.cat([bank_valid.new_zeros(1), ~bank_valid])
        sim = (sim / self.target_temperature).masked_fill(invalid, -math.inf)
        target_probs = torch.softmax(sim, dim=1)
        log_probs = torch.log_softmax(logits, dim=1)
        loss = -(target_probs * log_probs.masked_fill(target_probs == 0, 0.0))
        if update:
            if self.gather_distributed and dist.world_size() > 1:
                targets = torch.cat(dist.gather(targets), 0)
            end = min(size, ptr + targets.shape[0])
            self.bank_targets = bank_targets.clone()
            self.bank_targets[ptr:end] = targets[: end - ptr]
            self.bank_valid = bank_valid.clone()
            self.bank_valid[ptr:end] = True
        return loss.sum(dim=1).mean()


def _similarity(rows: Tensor, cols: Tensor) -> Tensor:
    """Cosine similarity of normalized embeddings, or 1[y_i == y_j] for labels."""
    if rows.is_floating_point():
        return rows @ cols.T
    return (rows[:, None] == cols[None, :]).float()
