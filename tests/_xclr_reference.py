"""Dense, line-by-line transcriptions of XCLR_SPEC.md: the oracles the fast paths must match."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def description_similarity(targets: Tensor) -> Tensor:
    """``S_ij = cos(c_i, c_j)`` or ``1[y_i == y_j]``, with ``S_ii = 1``."""
    if targets.is_floating_point():
        c = F.normalize(targets.double(), dim=1)
        sim = c @ c.T
    else:
        sim = (targets[:, None] == targets[None, :]).double()
    sim.fill_diagonal_(1.0)
    return sim


def dense_target(
    targets: Tensor | None, batch_size: int, target_temperature: float
) -> Tensor:
    """The ``2B x 2B`` target ``G`` of section 1 (one-hot on the other view for None)."""
    n2 = 2 * batch_size
    self_mask = torch.eye(n2, dtype=torch.bool)
    if targets is None:
        idx = torch.arange(n2)
        return F.one_hot((idx + batch_size) % n2, n2).double()
    sim = description_similarity(targets).repeat(2, 2)
    return torch.softmax(
        (sim / target_temperature).masked_fill(self_mask, -math.inf), dim=1
    )


def dense_log_probs(out0: Tensor, out1: Tensor, temperature: float) -> Tensor:
    """``log softmax_{b != a}(<z_a, z_b> / tau)`` with self entries at ``-inf``."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(
        torch.eye(len(z), dtype=torch.bool), -math.inf
    )
    return torch.log_softmax(logits, dim=1)


def xclr_rows(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor | None,
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """Per-row loss ``-sum_{b != a} G_ab log P_ab`` (2B values)."""
    target = dense_target(targets, out0.shape[0], target_temperature).to(out0.dtype)
    log_probs = dense_log_probs(out0, out1, temperature)
    return -torch.where(target > 0, target * log_probs, 0.0).sum(dim=1)


def xclr(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor | None = None,
    temperature: float = 0.1,
    target_temperature: float = 0.1,
) -> Tensor:
    """``L = -(1/2B) sum_a sum_{b != a} G_ab log P_ab``."""
    return xclr_rows(out0, out1, targets, temperature, target_temperature).mean()


def supcon(out0: Tensor, out1: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Soft-label SupCon (lightly PR #1877 form, without rescale): uniform target over
    the other view and every same-label sample, self excluded."""
    n2 = 2 * out0.shape[0]
    same = (labels.repeat(2)[:, None] == labels.repeat(2)[None, :]).double()
    same.fill_diagonal_(0.0)
    target = same / same.sum(dim=1, keepdim=True)
    log_probs = dense_log_probs(out0, out1, temperature)
    eye = torch.eye(n2, dtype=torch.bool)
    return -(target * log_probs.masked_fill(eye, 0.0)).sum(dim=1).mean()
