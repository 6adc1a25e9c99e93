"""The losses across processes: the same-batch-size check, descriptions gathered."""

from __future__ import annotations

import torch
from lightly.utils import dist
from torch import Tensor


def check_same_batch_size(batch_size: int, device: torch.device, what: str) -> None:
    """A ValueError on every process if their batch sizes differ (gloo would abort)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # no process group (a faked gather in tests): nothing to compare
    own = torch.full((1,), batch_size, dtype=torch.long, device=device)
    sizes = [torch.empty_like(own) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, own)
    found = [int(s) for s in sizes]
    if len(set(found)) > 1:
        raise ValueError(
            f"{what} needs the same batch size on every process, got {found} (by rank)."
            " Drop the last, smaller batch (DataLoader(..., drop_last=True))."
        )


def gather_without_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` (descriptions) from all processes, without gradient."""
    if dist.world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size())]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)
