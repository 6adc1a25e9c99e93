"""The tiny data the docs' examples run on (tests/test_docs.py), in a folder per page."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

from _openclip_helpers import draw
from PIL import Image

# The open_clip model of the docs' commands (`--model "$MODEL"`): the tests' 32-pixel ViT
# (its config is _openclip_helpers.TINY_CFG).
TINY_MODEL = "xclr-docs-tiny"
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]

# Run in the fork server: checkpoints/epoch_32.pt, "your checkpoint" of $MODEL.
CHECKPOINT = """
import os, open_clip, torch
os.makedirs("checkpoints")
model = open_clip.create_model(os.environ["MODEL"])
torch.save({"epoch": 32, "state_dict": model.state_dict()}, "checkpoints/epoch_32.pt")
"""


def _samples() -> list[tuple[Image.Image, str, int]]:
    """16 drawn images with distinct captions and their shape as label."""
    return [
        (draw(shape, color, size=32), f"a {color} {shape} on white", k)
        for k, shape in enumerate(SHAPES)
        for color in COLORS
    ]


def _write_shard(path: Path, rows: list[tuple[str, Image.Image, str]]) -> None:
    """An img2dataset-style shard: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in rows:
            jpg = io.BytesIO()
            image.save(jpg, format="JPEG", quality=95)
            meta = json.dumps({"key": key, "caption": caption, "status": "success"})
            for ext, data in (("jpg", jpg.getvalue()), ("txt", caption.encode()),
                              ("json", meta.encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def write_tiny_data(folder: Path) -> None:
    """The files the docs' examples name, in ``folder``:

    - ``images/``: 16 PNGs (32 px drawn shapes) and a ``captions.csv`` sidecar
      (``filename,caption``);
    - ``train.tsv``: the same images as open_clip reads them (``filepath``, ``title``,
      and an integer ``label``: the shape); ``captions.jsonl`` (``filename``,
      ``caption``);
    - ``classes/<shape>/``: the images in one folder per class;
    - ``shards/00000.tar``, ``shards/00001.tar``: webdataset shards of 8 samples.
    """
    samples = _samples()
    (folder / "images").mkdir(parents=True)
    names = []
    for i, (image, _, label) in enumerate(samples):
        name = f"img{i:02d}.png"
        image.save(folder / "images" / name)
        (folder / "classes" / SHAPES[label]).mkdir(parents=True, exist_ok=True)
        image.save(folder / "classes" / SHAPES[label] / name)
        names.append(name)
    with open(folder / "images" / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "caption"])
        writer.writerows((n, c) for n, (_, c, _) in zip(names, samples, strict=True))
    rows = ["filepath\ttitle\tlabel"] + [
        f"images/{n}\t{c}\t{k}" for n, (_, c, k) in zip(names, samples, strict=True)
    ]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "captions.jsonl").write_text(
        "".join(
            json.dumps({"filename": f"images/{n}", "caption": c}) + "\n"
            for n, (_, c, _) in zip(names, samples, strict=True)
        )
    )
    (folder / "shards").mkdir()
    for s in range(2):
        part = samples[8 * s : 8 * s + 8]
        _write_shard(
            folder / "shards" / f"{s:05d}.tar",
            [(f"{s:05d}{i:04d}", image, c) for i, (image, c, _) in enumerate(part)],
        )
