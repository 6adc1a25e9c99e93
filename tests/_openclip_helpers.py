"""Shared pieces of the xclr-openclip-train tests: tiny model, drawn images, shards, probe."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import open_clip_train.main as ocm
import pytest
import torch
from PIL import Image, ImageDraw

TINY = "xclr-test-tiny"
TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]


def register_tiny(root: Path) -> None:
    """Registers the tiny config (so the tokenizer also uses context length 32)."""
    configs = root / "configs"
    configs.mkdir(exist_ok=True)
    (configs / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(configs)


def draw(shape: str, color: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (8, 8, size - 8, size - 8)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    elif shape == "triangle":
        pen.polygon([(size // 2, 6), (size - 6, size - 6), (6, size - 6)], fill=color)
    else:
        pen.rectangle((size // 2 - 5, 6, size // 2 + 5, size - 6), fill=color)
        pen.rectangle((6, size // 2 - 5, size - 6, size // 2 + 5), fill=color)
    return image


def samples(count: int) -> list[tuple[Image.Image, str]]:
    """``count`` drawn images with distinct captions (colour x shape x size word)."""
    out = []
    sizes = ["small", "big", "tiny", "huge"]
    for i in range(count):
        color = COLORS[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        size = sizes[(i // (len(COLORS) * len(SHAPES))) % len(sizes)]
        out.append((draw(shape, color), f"a {size} {color} {shape} on white, {i}"))
    return out


def write_shards(
    folder: Path, shards: int, per_shard: int, prefix: str = ""
) -> dict[str, str]:
    """img2dataset-style shards ``{prefix}0000{s}.tar``: KEY.jpg, KEY.txt, KEY.json.

    Returns:
        Caption of each ``__key__``.
    """
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    drawn = samples(shards * per_shard)
    for s in range(shards):
        with webdataset.TarWriter(str(folder / f"{prefix}{s:05d}.tar")) as sink:
            for i in range(per_shard):
                image, caption = drawn[s * per_shard + i]
                key = f"{prefix}{s:05d}{i:04d}"
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=95)
                meta = {"key": key, "caption": caption, "status": "success"}
                sink.write(
                    {
                        "__key__": key,
                        "jpg": jpg.getvalue(),
                        "txt": caption,
                        "json": json.dumps(meta).encode(),
                    }
                )
                captions[key] = caption
    return captions


def common_args(logs: Path, name: str, *extra: str) -> list[str]:
    return [
        "--model", TINY, "--batch-size", "4", "--epochs", "1",
        "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
        "--seed", "0", "--log-every-n-steps", "1", "--report-to", "",
        "--logs", str(logs), "--name", name, *extra,
    ]  # fmt: skip


def checkpoint(logs: Path, name: str) -> Path:
    return logs / name / "checkpoints" / "epoch_1.pt"


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]  # type: ignore[no-any-return]


def assert_loads_back(model: str, path: Path) -> Any:
    """The checkpoint loads with open_clip.create_model_and_transforms, weights intact."""
    loaded, _, _ = open_clip.create_model_and_transforms(model, pretrained=str(path))
    for key, value in state_dict(path).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    return loaded


@dataclass
class Probe:
    """Records every loss call of open_clip's training loop: inputs and output.

    ``inner`` also records the keyword arguments the wrapped loss receives (the
    ``targets`` that :class:`CaptionTargets` passes on).
    """

    on_call: Callable[[torch.nn.Module, dict[str, Any]], None] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    loss: torch.nn.Module | None = None


def install_probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    probe = Probe()
    original = ocm.train_one_epoch

    def train_one_epoch(
        model: torch.nn.Module, data: Any, loss: torch.nn.Module, *a: Any, **kw: Any
    ) -> Any:
        probe.loss = loss

        def tensors(kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {
                k: v.detach().clone()
                for k, v in kwargs.items()
                if isinstance(v, torch.Tensor)
            }

        def before(m: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if probe.on_call is not None:
                probe.on_call(model, kwargs)
            probe.calls.append(tensors(kwargs))

        def inner(m: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            probe.calls[-1]["inner"] = tensors(kwargs)

        def after(m: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            probe.calls[-1]["loss"] = out["contrastive_loss"].detach().clone()

        handles = [
            loss.register_forward_pre_hook(before, with_kwargs=True),
            loss.register_forward_hook(after, with_kwargs=True),
        ]
        wrapped = getattr(loss, "loss", None)
        if isinstance(wrapped, torch.nn.Module):
            handles.append(wrapped.register_forward_pre_hook(inner, with_kwargs=True))
        try:
            return original(model, data, loss, *a, **kw)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(ocm, "train_one_epoch", train_one_epoch)
    return probe


def rows_of(targets: torch.Tensor, table: torch.Tensor) -> list[int]:
    """The row of ``table`` each target equals bit for bit (each must equal exactly one)."""
    same = (targets[:, None, :] == table[None, :, :]).all(dim=-1)
    assert bool((same.sum(dim=1) == 1).all()), "a target equals no row (or several)"
    return same.float().argmax(dim=1).tolist()


def shard_table(cache_dir: str | Path, urls: str) -> tuple[list[str], torch.Tensor]:
    """Every sample's caption and its row as training gets it from a shard cache."""
    from xclr_plugin.cache.shards import ShardCache
    from xclr_plugin.captions.shards import expand_shard_urls, read_shard

    shards = list(dict.fromkeys(expand_shard_urls(urls)))
    cache = ShardCache.open(cache_dir, shards)
    captions, rows = [], []
    for url in shards:
        for key, caption in read_shard(url):
            captions.append(caption)
            rows.append(torch.from_numpy(cache.target(url, key, caption)))
    return captions, torch.stack(rows)
