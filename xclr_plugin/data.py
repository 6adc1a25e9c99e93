"""Captioned image datasets and the collate that attaches X-CLR targets.

Items are :class:`lightly.data.LightlyDataset`'s ``(views, target, filename)``;
:class:`XCLRCollate` batches them as lightly's ``MultiViewCollate`` and puts the
caption embeddings (or labels, or None) in the target slot, so lightly's idiom
``loss = criterion(model(views[0]), model(views[1]), targets)`` keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightly.data import MultiViewCollate
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from xclr_plugin.cache import CaptionLookup
from xclr_plugin.captions import CaptionRecord, read_captions, validate_records

__all__ = [
    "NO_LABEL",
    "CaptionedImageDataset",
    "XCLRCollate",
    "check_mode",
    "load_rgb",
    "to_rgb",
]

#: Target of an item whose record has no label.
NO_LABEL = -1
#: Integer grey modes PIL's ``convert("RGB")`` clips at 255 (mid-grey 16-bit turns white).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_mode(image: Image.Image) -> None:
    """ValueError for a float image (PIL mode ``F``): it has no fixed range, and PIL's
    conversion clips it at 0..255, so a ``[0, 1]`` image would turn black."""
    if image.mode == "F":
        raise ValueError(
            "a 32-bit float image (PIL mode F) has no fixed range to scale to 8 bits "
            "(PIL's conversion would read [0, 1] values as black); save it as an 8- "
            "or 16-bit image"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")`` (what torchvision's and lightly's loaders do), except
    16- and 32-bit integer grey images, scaled to 8 bits from their full range:
    ``I;16*`` from 0..65535; ``I`` (32-bit, as PIL opens 16-bit PGM files) from
    0..65535 too unless a value exceeds it, then from 0..2**31-1 (negatives as 0).
    Float images are refused (:func:`check_mode`)."""
    check_mode(image)
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    top = 65535.0 if image.mode != "I" or values.max() <= 65535 else 2.0**31 - 1
    grey = np.rint(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Opens an image file as RGB with :func:`to_rgb`: the default loader of
    :class:`CaptionedImageDataset` and of ``xclr-train``'s ``LightlyDataset``."""
    with open(path, "rb") as handle, Image.open(handle) as image:
        return to_rgb(image)


class CaptionedImageDataset(Dataset[tuple[Any, int, str]]):
    """Images with one caption each, in lightly's ``(views, target, filename)`` form.

    Item ``i`` is ``records[i]`` (row ``i`` of a cache built from them); file names
    are relative to ``root`` (None: as written, like open_clip's ``CsvDataset``);
    ``transform`` gets the image ``loader`` loaded; ``target`` is the label or -1.

    Examples:
        >>> from lightly.transforms import SimCLRTransform
        >>> dataset = CaptionedImageDataset.from_source(
        ...     "train.tsv", transform=SimCLRTransform(input_size=64)
        ... )
        >>> views, target, filename = dataset[0]
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        root: str | os.PathLike[str] | None = None,
        transform: Callable[[Any], Any] | None = None,
        *,
        loader: Callable[[str], Any] = load_rgb,
        check_files: bool = True,
    ) -> None:
        """Builds the dataset (with ``check_files``, checking every image exists).

        Raises:
            ValueError: On empty captions or duplicate file names.
            FileNotFoundError: If ``check_files`` and an image is missing.
        """
        self.records = validate_records(records, source="CaptionedImageDataset records")
        self.root = None if root is None else os.fspath(root)
        self.transform = transform
        self.loader = loader
        if check_files:
            missing = [
                r.filename for r in self.records if not os.path.isfile(self.path_of(r))
            ]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) not found, e.g. {missing[0]!r} "
                    f"(looked for {self.path_of(missing[0])})."
                )

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike[str],
        fmt: str = "auto",
        *,
        root: str | os.PathLike[str] | None = None,
        transform: Callable[[Any], Any] | None = None,
        **reader_kwargs: Any,
    ) -> CaptionedImageDataset:
        """Reads a caption source with :func:`xclr_plugin.captions.read_captions`
        (``reader_kwargs`` go to the reader); ``root`` defaults to ``source`` for
        folder sources and to the paths as written for files."""
        records = read_captions(source, fmt, **reader_kwargs)
        if root is None and os.path.isdir(source):
            root = source
        return cls(records, root=root, transform=transform)

    def path_of(self, record: CaptionRecord | str) -> str:
        """Path of a record's (or file name's) image."""
        filename = record.filename if isinstance(record, CaptionRecord) else record
        return filename if self.root is None else os.path.join(self.root, filename)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int, str]:
        """Returns ``(transform(image), label or -1, filename)``.

        Raises:
            FileNotFoundError: If the image file has gone missing.
            OSError: If it cannot be decoded (naming the file).
        """
        record = self.records[index]
        path = self.path_of(record)
        try:
            image = self.loader(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Image not found: {path} (item {index}).") from err
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            # PIL's errors (UnidentifiedImageError, "Truncated File Read", ...) do
            # not always name the file.
            raise OSError(
                f"Cannot read image {path} (item {index}): {type(err).__name__}: {err}"
            ) from err
        if self.transform is not None:
            image = self.transform(image)
        label = NO_LABEL if record.label is None else record.label
        return image, label, record.filename

    def get_filenames(self) -> list[str]:
        """File names in dataset order, as ``LightlyDataset.get_filenames``."""
        return [r.filename for r in self.records]

    @property
    def captions(self) -> list[str]:
        """Captions in dataset order."""
        return [r.caption for r in self.records]


class XCLRCollate:
    """Batches lightly-style items into ``(views, targets, filenames)``.

    ``targets``: with ``captions``, the ``(B, Dt)`` float32 embeddings looked up by
    file name (a :class:`~xclr_plugin.cache.CaptionCache` maps its file in each
    DataLoader worker); with ``use_labels``, the ``(B,)`` int64 labels (SupCon-like
    graph); otherwise None (identity graph: X-CLR reduces to NT-Xent).

    Examples:
        >>> cache = CaptionCache.open("cache/", records=dataset.records)
        >>> loader = DataLoader(dataset, batch_size=64, collate_fn=XCLRCollate(cache))
        >>> views, targets, filenames = next(iter(loader))  # targets: (64, 384)
    """

    def __init__(
        self, captions: CaptionLookup | None = None, *, use_labels: bool = False
    ) -> None:
        """Chooses the targets: ``captions`` (a cache or table) or ``use_labels``.

        Raises:
            ValueError: If both are given.
            TypeError: If ``captions`` has no ``lookup``.
        """
        if captions is not None and use_labels:
            raise ValueError("Pass either captions or use_labels=True, not both.")
        if captions is not None and not callable(getattr(captions, "lookup", None)):
            raise TypeError(
                "captions must be a CaptionCache or CaptionTable (anything with "
                f".lookup(filenames)), got {type(captions).__name__}."
            )
        self.captions = captions
        self.use_labels = use_labels
        self._views = MultiViewCollate()

    def __repr__(self) -> str:
        """Returns a short description."""
        kind = type(self).__name__
        return f"{kind}(captions={self.captions!r}, use_labels={self.use_labels})"

    def __call__(
        self, batch: Sequence[tuple[Sequence[Tensor], int, str]]
    ) -> tuple[list[Tensor], Tensor | None, list[str]]:
        """Collates items ``(views, target, filename)`` into ``(views, targets,
        filenames)``: views a list of ``(B, C, H, W)``, targets ``(B, Dt)`` float32,
        ``(B,)`` int64 or None.

        Raises:
            TypeError: If an item's views are not a list/tuple of tensors.
            ValueError: If a label is missing (``-1``) with ``use_labels``, or an
                image has no caption embedding.
        """
        for views, _, filename in batch:
            if not isinstance(views, (list, tuple)):
                raise TypeError(
                    f"Item {filename!r}: expected a list of views from the transform "
                    f"(e.g. SimCLRTransform), got {type(views).__name__}."
                )
        views, labels, filenames = self._views(list(batch))  # type: ignore[arg-type]
        targets: Tensor | None = None
        if self.captions is not None:
            targets = self.captions.lookup(filenames)
        elif self.use_labels:
            if bool((labels < 0).any()):
                first = filenames[int(torch.nonzero(labels < 0)[0, 0])]
                raise ValueError(f"Image {first!r} has no label, but use_labels=True.")
            targets = labels
        return views, targets, filenames
