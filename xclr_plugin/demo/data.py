"""Each task's images in memory, descriptions embedded, split fixed.

Every image is decoded before any training, so an unreadable file stops the run,
named, before minutes are spent. The images are kept as ``uint8``, ``3 * S * S`` bytes
each (2,352 at 28 px), and a hash of them and of the records keys the saved runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from xclr_plugin.cache.lookup import caption_lookup
from xclr_plugin.captions import CaptionRecord, read_captions
from xclr_plugin.demo.animals import ANIMAL_CLASSES, ANIMALS_CREDIT, load_animal_mnist
from xclr_plugin.demo.config import TASKS, DemoConfig
from xclr_plugin.demo.twemoji import TWEMOJI_CREDIT, load_twemoji, open_rgb_on_white
from xclr_plugin.text import SupportsEncode

#: Above this many bytes of images (about 900,000 at 28 px) the demo warns.
MEMORY_WARNING_BYTES = 2 * 2**30


@dataclass
class TaskData:
    """One task, ready to train and evaluate on; per-image fields in dataset order.

    ``pixels`` are ``(N, 3, S, S)`` ``uint8`` (:func:`unit` makes them ``[0, 1]``);
    ``test_idx`` are the scored images (validation ones under ``eval_split="val"``);
    ``digest`` hashes the records and pixels (a saved run of other data is not reused).
    """

    name: str
    regime: str  # "class names" or "one caption per image"
    records: list[CaptionRecord]
    class_names: list[str]
    pixels: Tensor
    labels: Tensor
    train_idx: Tensor
    test_idx: Tensor
    caption_embeddings: Tensor
    text_encoder: str
    dropped_classes: dict[str, int]  # left out for having too few images
    credit: str | None  # attribution the data requires
    seconds: dict[str, float]
    digest: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the data and split."""
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return {
            "name": self.name,
            "regime": self.regime,
            "images": len(self.records),
            "train_images": len(self.train_idx),
            "test_images": len(self.test_idx),
            "classes": self.class_names,
            "images_per_class": dict(zip(self.class_names, counts, strict=True)),
            "dropped_classes": self.dropped_classes,
            "distinct_captions": len({r.caption for r in self.records}),
            "text_encoder": self.text_encoder,
            "credit": self.credit,
        }


def dense_labels(
    records: Sequence[CaptionRecord], names: Sequence[str] | None = None
) -> tuple[list[CaptionRecord], list[str]]:
    """Maps the labels present (any integers) to ``0..K-1`` in numeric order; returns
    the records and their class names (``names[label]``, else ``str(label)``)."""
    present = sorted({int(r.label) for r in records if r.label is not None})
    index = {label: i for i, label in enumerate(present)}
    class_names = [names[k] if names is not None else str(k) for k in present]
    dense = [
        dataclasses.replace(r, label=index[int(r.label)])
        for r in records
        if r.label is not None
    ]
    return dense, class_names


def _animals(config: DemoConfig) -> tuple[list[CaptionRecord], list[Image.Image]]:
    """Animal-MNIST records (captioned from the class name) and their images."""
    images, labels = load_animal_mnist()
    keep = np.arange(len(labels))
    if config.animals_images < len(labels):
        keep, _ = _stratified(
            keep, labels.tolist(), config.split_seed, train_size=config.animals_images
        )
    template, picks = config.caption_template, keep.tolist()
    records = [CaptionRecord(f"animal_mnist/{i:05d}", template.format(ANIMAL_CLASSES[labels[i]]),
                             int(labels[i])) for i in picks]  # fmt: skip
    return records, [Image.fromarray(images[i]).convert("RGB") for i in picks]


def _user_source(
    config: DemoConfig,
) -> tuple[list[CaptionRecord], str | None, list[str] | None]:
    """A captions file or folder: records, the root of their paths, class names."""
    path = config.data
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data must be {' or '.join(map(repr, TASKS))} (comma-separated), a "
            f"captions CSV/TSV/JSONL file or an image folder; {path!r} does not exist."
        )
    names: list[str] | None = None
    root: str | None = None
    if os.path.isdir(path):
        from torchvision.datasets.folder import find_classes

        has_csv = os.path.isfile(os.path.join(path, "captions.csv"))
        template = {} if has_csv else {"template": config.caption_template}
        records, root = read_captions(path, **template), path
        with contextlib.suppress(FileNotFoundError):  # no class subfolders
            names = list(find_classes(path)[0])
    elif path.lower().endswith((".jsonl", ".json")):
        records = read_captions(path, "jsonl", label_key=config.csv_label_key)
    else:
        sep = config.csv_separator
        if sep is None:
            sep = "," if path.lower().endswith(".csv") else "\t"
        records = read_captions(
            path, "csv", sep="\t" if sep in ("\\t", "tab") else sep,
            img_key=config.csv_img_key, caption_key=config.csv_caption_key,
            label_key=config.csv_label_key,
        )  # fmt: skip
    if root is None and records:
        first = records[0].filename
        if not os.path.isabs(first) and not os.path.exists(first):
            # open_clip reads paths relative to the working directory; also accept
            # paths relative to the captions file.
            root = os.path.dirname(os.path.abspath(path))
    if not records or any(r.label is None for r in records):
        raise ValueError(
            f"{path}: the demo scores the encoders by classifying held-out images, so "
            "every image needs a class label. Use a folder with one subfolder per class, "
            "or a CSV/TSV/JSONL with an integer label column (--csv-label-key, default "
            "'label')."
        )
    return records, root, names


def _stratified(
    idx: np.ndarray, labels: Sequence[int], seed: int, **size: Any
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's stratified ``train_test_split`` of ``idx``, both parts sorted."""
    from sklearn.model_selection import train_test_split

    a, b = train_test_split(
        idx, stratify=[labels[i] for i in idx], random_state=seed, **size
    )
    return np.sort(a), np.sort(b)


def _select(
    records: list[CaptionRecord], class_names: list[str], config: DemoConfig
) -> tuple[list[CaptionRecord], list[str], dict[str, int]]:
    """Drops classes under ``min_class_size``, relabels densely, applies ``limit``."""
    counts = Counter(int(r.label) for r in records if r.label is not None)
    sizes = {class_names[k]: n for k, n in sorted(counts.items())}
    keep = {k for k, n in counts.items() if n >= config.min_class_size}
    dropped = {name: n for name, n in sizes.items() if n < config.min_class_size}
    if len(keep) < 2:
        raise ValueError(
            f"{config.data}: only {len(keep)} class(es) have at least --min-class-size="
            f"{config.min_class_size} images; the probe needs at least 2 (sizes: "
            f"{sizes})."
        )
    records, class_names = dense_labels(
        [r for r in records if r.label is not None and int(r.label) in keep],
        class_names,
    )
    if config.limit is not None and config.limit < len(records):
        if config.limit < 4 * len(class_names):
            raise ValueError(
                f"--limit must be at least 4 images per class ({4 * len(class_names)} for "
                f"{len(class_names)} classes), got {config.limit}."
            )
        labels = [int(r.label or 0) for r in records]
        subset, _ = _stratified(
            np.arange(len(labels)), labels, config.split_seed, train_size=config.limit
        )
        records = [records[i] for i in subset.tolist()]
    return records, class_names, dropped


def split(labels: Sequence[int], config: DemoConfig) -> tuple[Tensor, Tensor]:
    """The fixed stratified split: ``(train, test)``, or under ``eval_split="val"``
    ``(train, val)`` from the training part, so choices never see the test images."""
    size, seed = config.test_fraction, config.split_seed
    train, test = _stratified(np.arange(len(labels)), labels, seed, test_size=size)
    if config.eval_split == "val":
        train, test = _stratified(train, labels, seed, test_size=size)
    return torch.from_numpy(train), torch.from_numpy(test)


def _read_image(path: str, size: int) -> Image.Image:
    """Decodes an image as RGB on white, center-cropped to ``size``; errors name it."""
    try:
        image = open_rgb_on_white(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot read image {path}: {err}") from None
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def unit(pixels: Tensor) -> Tensor:
    """``uint8`` images as float32 in ``[0, 1]``."""
    return pixels.float().div_(255)


def normalize(pixels: Tensor) -> Tensor:
    """ImageNet normalisation of ``[0, 1]`` images, as lightly's transforms do."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    mean, std = (torch.tensor(IMAGENET_NORMALIZE[k]).view(1, 3, 1, 1) for k in ("mean", "std"))  # fmt: skip
    return (pixels - mean) / std


def load_task(
    name: str, config: DemoConfig, encoder: SupportsEncode, *, progress: bool = True
) -> TaskData:
    """Reads a task (``"animals"``, ``"twemoji"`` or a path), fixes the split, decodes
    every image and embeds the descriptions.

    Raises:
        FileNotFoundError, ValueError, ImportError: Naming the source or image.
    """
    start = time.perf_counter()
    credit: str | None = None
    animals: dict[str, Image.Image] = {}
    root: str | None = None
    names: list[str] | None
    if name == "animals":
        records, images = _animals(config)
        animals = {r.filename: image for r, image in zip(records, images, strict=True)}
        names, credit = list(ANIMAL_CLASSES), ANIMALS_CREDIT
    elif name == "twemoji":
        twemoji = load_twemoji()
        records, names = twemoji.records, twemoji.class_names
        root, credit = os.fspath(twemoji.root), TWEMOJI_CREDIT
    else:
        records, root, names = _user_source(config)
    if names is None:
        records, names = dense_labels(records)
    records, class_names, dropped = _select(records, names, config)
    labels = [int(r.label or 0) for r in records]
    train_idx, test_idx = split(labels, config)

    size = config.image_size
    if (need := len(records) * 3 * size * size) > MEMORY_WARNING_BYTES:
        warnings.warn(
            f"{name}: the demo holds every image in memory: {len(records)} images of "
            f"{size} px take {need / 2**30:.1f} GiB (3 * S * S bytes each; a run on "
            "100,000 tiny images held 385 MiB in all), besides the caption "
            "embeddings. --limit N trains on a stratified subset of N images.",
            stacklevel=2,
        )
    pixels = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
    for i, record in enumerate(tqdm(records, desc=f"Reading {name}", unit="img", disable=not progress)):  # fmt: skip
        image = animals.get(record.filename)
        if image is None:
            image = _read_image(os.path.join(root or "", record.filename), size)
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    digest = hashlib.blake2b(
        json.dumps([dataclasses.astuple(r) for r in records]).encode()
    )
    digest.update(pixels.numpy().tobytes())
    loaded = time.perf_counter()
    table = caption_lookup(records, encoder=encoder, distinct=True, progress=False)
    distinct = len({r.caption for r in records})
    regime = "class names" if distinct <= len(class_names) else "one caption per image"
    regime = TASKS.get(name, regime)
    return TaskData(
        name=name,
        regime=regime,
        records=records,
        class_names=class_names,
        pixels=pixels,
        labels=torch.tensor(labels, dtype=torch.long),
        train_idx=train_idx,
        test_idx=test_idx,
        caption_embeddings=table[:],
        text_encoder=encoder.name,
        dropped_classes=dropped,
        credit=credit,
        seconds={"load_images": loaded - start, "embed": time.perf_counter() - loaded},
        digest=digest.hexdigest(),
    )
