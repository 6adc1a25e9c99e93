"""One training run: the same encoder, data, batches and optimizer for every method.

Every method starts from the same weights (the model is built right after seeding)
and sees the same augmented batches in the same order. A plain loop, not a Lightning
``Trainer``: at this size a Trainer per run adds start-up time and nothing else.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xclr_plugin.demo.config import DemoConfig, MethodSpec
from xclr_plugin.demo.data import TaskData, normalize, unit
from xclr_plugin.demo.models import ImageModel, build_objective, tokenize_captions
from xclr_plugin.errors import NonFiniteLossError


def seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class BatchSimCLRAugment:
    """SimCLR's augmentations (lightly's ``SimCLRTransform`` recipe) on a whole batch.

    Random resized crop (a crop larger than the image is clipped, where torchvision
    retries) and flip in one ``grid_sample``; colour jitter (no hue) with p=0.8;
    grayscale with p=0.2; no blur (it erases 28 px images). lightly's per-image
    transform took 0.33 s of CPU per batch of 128, 2.8x the training step.
    """

    def __init__(
        self, min_scale: float = 0.25, jitter: float = 0.4, aspect: float = 4 / 3
    ) -> None:
        self.min_scale, self.jitter = min_scale, jitter
        self.log_aspect = math.log(aspect)

    def __call__(self, pixels: Tensor) -> Tensor:
        """One augmented view of each ``(B, 3, S, S)`` image in ``[0, 1]``."""
        b, device = len(pixels), pixels.device

        def uniform(low: float, high: float) -> Tensor:
            return torch.empty(b, device=device).uniform_(low, high)

        area = uniform(self.min_scale, 1.0)
        ratio = uniform(-self.log_aspect, self.log_aspect).exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0)
        zero = torch.zeros(b, device=device)
        shift_x = (2 * torch.rand(b, device=device) - 1) * (1 - w)
        shift_y = (2 * torch.rand(b, device=device) - 1) * (1 - h)
        rows = [torch.stack([w * flip, zero, shift_x], 1), torch.stack([zero, h, shift_y], 1)]  # fmt: skip
        grid = F.affine_grid(torch.stack(rows, 1), list(pixels.shape), align_corners=False)  # fmt: skip
        x = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)  # fmt: skip
        weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)

        def gray(img: Tensor) -> Tensor:
            return (img * weights).sum(1, keepdim=True)

        def factor() -> Tensor:
            return uniform(1 - self.jitter, 1 + self.jitter).view(b, 1, 1, 1)

        jittered = (x * factor()).clamp(0, 1)
        mean = gray(jittered).mean((2, 3), keepdim=True)
        jittered = ((jittered - mean) * factor() + mean).clamp(0, 1)
        g = gray(jittered)
        jittered = ((jittered - g) * factor() + g).clamp(0, 1)
        apply = (torch.rand(b, device=device) < 0.8).view(b, 1, 1, 1)
        x = torch.where(apply, jittered, x)
        to_gray = (torch.rand(b, device=device) < 0.2).view(b, 1, 1, 1)
        x = torch.where(to_gray, gray(x).expand_as(x), x)
        return normalize(x)


@dataclass
class TrainedModel:
    """A trained encoder and how its training went."""

    model: ImageModel
    seconds: float
    cpu_seconds: float
    loss_per_epoch: list[float]


def train_method(
    spec: MethodSpec,
    data: TaskData,
    config: DemoConfig,
    *,
    progress: bool = True,
    desc: str = "",
) -> TrainedModel:
    """Trains the encoder on ``data``'s training images with one method.

    Raises:
        NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    from lightly.utils.scheduler import CosineWarmupScheduler

    device = torch.device(config.device)
    seed_everything(config.seed)
    model = ImageModel(config.width, config.proj_dim).to(device)
    # What the batch carries besides the images, one row per image.
    table = {"captions": data.caption_embeddings, "labels": data.labels}.get(
        spec.targets
    )
    vocab = 0
    if spec.targets == "tokens":
        table, vocab = tokenize_captions([r.caption for r in data.records])
    text_dim = data.caption_embeddings.shape[1]
    objective = build_objective(spec, config, text_dim, vocab).to(device)
    augment = BatchSimCLRAugment()
    # A tensor is a map-style dataset: the loader shuffles row indices, seeded.
    loader: DataLoader[Tensor] = DataLoader(
        data.train_idx,  # type: ignore[arg-type]
        batch_size=min(config.batch_size, len(data.train_idx)), shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    total = config.epochs * len(loader)
    # No weight decay on biases, norm weights and scalars, as open_clip.
    params = [p for m in (model, objective) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )  # fmt: skip
    scheduler = CosineWarmupScheduler(
        optimizer, warmup_epochs=min(len(loader), max(total // 10, 1)), max_epochs=total
    )
    model.train()
    objective.train()
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=total, desc=desc or spec.label, unit="step", disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        for epoch in range(config.epochs):
            epoch_loss = 0.0
            for rows in loader:
                pixels = unit(data.pixels[rows].to(device))
                views = torch.cat([augment(pixels), augment(pixels)])
                z0, z1 = model(views).chunk(2)
                targets = None if table is None else table[rows].to(device)
                loss = objective(z0, z1, targets)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{spec.label}: the loss became {loss.item()} at epoch "
                        f"{epoch + 1}; lower --lr."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                objective.after_step()  # type: ignore[operator]
                epoch_loss += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{loss.item():.3f}")  # fmt: skip
            losses.append(epoch_loss / len(loader))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return TrainedModel(model, seconds, cpu_seconds, losses)
