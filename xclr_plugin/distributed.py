"""Gathering across processes: the one place the losses talk to ``torch.distributed``.

Embeddings are gathered with gradient through lightly's ``GatherLayer`` (its backward
all-reduces and returns the local slice, so a DDP step applies the global gradient);
descriptions (caption embeddings, labels) are gathered without gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from lightly.utils import dist as lightly_dist
from torch import Tensor

__all__ = [
    "gather_with_grad",
    "gather_without_grad",
    "rank",
    "require_process_group",
    "world_size",
]

rank = lightly_dist.rank
world_size = lightly_dist.world_size


def require_process_group(owner: str) -> None:
    """Raises a clear error if ``torch.distributed`` cannot be used by ``owner``."""
    if not torch_dist.is_available():
        raise ValueError(
            f"{owner}: gather_distributed=True but torch.distributed is not available. "
            "Set gather_distributed=False or install a torch build with distributed support."
        )


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from all ranks along dim 0; gradients flow back to each rank."""
    if world_size() == 1:
        return tensor
    return torch.cat(lightly_dist.gather(tensor), dim=0)


def gather_without_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` from all ranks along dim 0, detached."""
    if world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)
