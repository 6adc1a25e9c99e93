"""Helpers for the image-text X-CLR tests: data, a dense oracle and the gloo worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from xclr_plugin.clip_loss import XCLRClipLoss

#: (local_loss, gather_with_grad) layouts of open_clip's distributed ClipLoss.
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]
TARGET_TEMPERATURE = 0.2


def clip_batch(
    batch_size: int, seed: int = 0, dim: int = 8, text_dim: int = 5, bias: bool = True
) -> dict[str, Tensor]:
    """A float64 image-text batch as open_clip's models return it, plus captions."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "image_features": F.normalize(
            torch.randn(batch_size, dim, generator=gen, dtype=torch.float64), dim=1
        ),
        "text_features": F.normalize(
            torch.randn(batch_size, dim, generator=gen, dtype=torch.float64), dim=1
        ),
        "logit_scale": torch.tensor(7.5, dtype=torch.float64),
        "captions": torch.randn(
            batch_size, text_dim, generator=gen, dtype=torch.float64
        ),
    }
    if bias:
        batch["logit_bias"] = torch.tensor(-2.0, dtype=torch.float64)
    return batch


def dense_xclr_clip(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    descriptions: Tensor,
    target_temperature: float,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """XCLR_SPEC.md section 2, transcribed line by line (single process, global batch)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    logits_per_text = logits_per_image.T
    c = F.normalize(descriptions.detach().double(), dim=1)
    target = torch.softmax(c @ c.T / target_temperature, dim=1)
    ce_image = -(target * torch.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    ce_text = -(target * torch.log_softmax(logits_per_text, dim=1)).sum(1).mean()
    return (ce_image + ce_text) / 2


def loss_and_grads(
    loss_fn: Callable[..., Tensor], batch: dict[str, Tensor], **kwargs: Any
) -> dict[str, Tensor]:
    """Loss value and gradients w.r.t. every input of ``batch`` that the loss uses."""
    inputs = {
        k: v.clone().requires_grad_(True)
        for k, v in batch.items()
        if k in ("image_features", "text_features", "logit_scale", "logit_bias")
    }
    loss = loss_fn(**inputs, **kwargs)
    loss.backward()
    out = {"loss": loss.detach()}
    for k, v in inputs.items():
        out[k] = v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
    return out


def distributed_worker(
    rank: int, world_size: int, batch_size: int
) -> dict[tuple[str, bool, bool], Any]:
    """Per-rank losses and gradients of ClipLoss and XCLRClipLoss in every layout.

    Every rank builds the same global batch and keeps its slice, as a DDP data loader
    would; the test compares the results with a single-process reference.
    """
    batch = clip_batch(batch_size * world_size)
    local = {
        k: v[rank * batch_size : (rank + 1) * batch_size] if v.ndim else v
        for k, v in batch.items()
    }
    results: dict[tuple[str, bool, bool], Any] = {}
    for local_loss, gather_with_grad in LAYOUTS:
        opts: dict[str, Any] = {
            "local_loss": local_loss,
            "gather_with_grad": gather_with_grad,
            "rank": rank,
            "world_size": world_size,
        }
        key = (local_loss, gather_with_grad)
        results[("clip", *key)] = loss_and_grads(ClipLoss(**opts), local)
        results[("identity", *key)] = loss_and_grads(XCLRClipLoss(**opts), local)
        results[("captions", *key)] = loss_and_grads(
            XCLRClipLoss(**opts, target_temperature=TARGET_TEMPERATURE),
            local,
            targets=local["captions"],
        )
        results[("clip-text", *key)] = loss_and_grads(
            XCLRClipLoss(
                **opts, target_temperature=TARGET_TEMPERATURE, target_mode="clip-text"
            ),
            local,
        )
        # chunk_size=2 splits the local (3) and global (6) rows unevenly.
        results[("identity-chunked", *key)] = loss_and_grads(
            XCLRClipLoss(**opts, chunk_size=2), local
        )
        results[("captions-chunked", *key)] = loss_and_grads(
            XCLRClipLoss(**opts, target_temperature=TARGET_TEMPERATURE, chunk_size=2),
            local,
            targets=local["captions"],
        )
        results[("clip-text-chunked", *key)] = loss_and_grads(
            XCLRClipLoss(
                **opts,
                target_temperature=TARGET_TEMPERATURE,
                target_mode="clip-text",
                chunk_size=2,
            ),
            local,
        )
    # Issue 21: the last rank's batch is smaller (on d50eea5 gloo aborted).
    n = batch_size - (rank == world_size - 1)
    short = {k: v[:n] if v.ndim else v for k, v in local.items() if k != "captions"}
    try:
        XCLRClipLoss(rank=rank, world_size=world_size)(**short)
    except ValueError as err:
        results[("uneven", False, False)] = {"error": str(err)}
    return results
