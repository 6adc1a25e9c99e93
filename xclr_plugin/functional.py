"""Functional X-CLR: tensors in, tensors out, no state and no process groups.

The two-view core (:func:`xclr_loss`) and the description similarity live in
:mod:`xclr_plugin.loss`, which must stay importable with torch and lightly alone (it is
the file proposed upstream to lightly); they are re-exported here so that every pure
function has one public home. The helpers below serve the image-text loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xclr_plugin.loss import similarity_from_targets, validate_temperature, xclr_loss

__all__ = [
    "similarity_from_targets",
    "soft_target_cross_entropy",
    "target_distribution",
    "validate_temperature",
    "xclr_loss",
]


def target_distribution(
    similarity: Tensor, target_temperature: float, mask: Tensor | None = None
) -> Tensor:
    """Row-wise ``softmax(S / tau_s)``: the soft target ``G``.

    Args:
        similarity: ``(n, m)`` description similarities ``S``.
        target_temperature: ``tau_s > 0``; as it goes to 0 the rows become uniform over
            their most similar columns (the SupCon limit for labels).
        mask: Optional bool ``(n, m)``; ``True`` entries get probability exactly 0.

    Returns:
        ``(n, m)``, rows summing to 1.
    """
    logits = similarity / target_temperature
    if mask is not None:
        logits = logits.masked_fill(mask, -math.inf)
    return torch.softmax(logits, dim=1)


def soft_target_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``-(1/n) sum_i sum_j G_ij log softmax_j(l_ij)``: mean soft-target cross-entropy.

    Entries with zero target probability contribute exactly 0, also where the logit is
    ``-inf`` (masked), so masking never creates ``0 * -inf = NaN``.

    Args:
        logits: ``(n, m)`` logits.
        target_probs: ``(n, m)`` target distribution, rows summing to 1.

    Returns:
        A scalar.
    """
    log_probs = torch.log_softmax(logits, dim=1)
    weighted = torch.where(target_probs > 0, target_probs * log_probs, 0.0)
    return -weighted.sum(dim=1).mean()
