"""The chosen loss, checked by name, and its targets: caption embeddings, labels, none."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lightly.data import LightlyDataset, MultiViewCollate
from omegaconf import DictConfig

from xclr_plugin import text
from xclr_plugin.cache import CaptionLookup, caption_lookup
from xclr_plugin.captions import (
    DEFAULT_SIDECAR,
    CaptionRecord,
    detect_format,
    read_captions,
)
from xclr_plugin.data import XCLRCollate
from xclr_plugin.integrations.lightly_train.config import (
    CaptionsConfig,
    CriterionConfig,
    TrainConfig,
    parse_config,
)
from xclr_plugin.integrations.lightly_train.images import list_images
from xclr_plugin.registry import LossSpec, loss_info, parameter_names

__all__ = ["check_loss", "make_targets", "prepare_targets"]


def check_loss(criterion: CriterionConfig) -> LossSpec:
    """The two-view loss ``criterion.name``; ValueError for an unknown or image-text
    loss, TypeError naming exactly the ``criterion.*`` keys it does not take."""
    spec = loss_info(criterion.name)
    if spec.inputs != "two-view":
        raise ValueError(
            f"criterion.name={spec.name} is an image-text loss (forward(image_features, "
            "text_features, logit_scale, ...)); xclr-train trains lightly's two-view "
            "SimCLR model and needs a two-view loss such as ntxent, xclr or supcon. "
            "Train image-text losses with the open_clip integration "
            "(xclr-openclip-train)."
        )
    accepted = parameter_names(spec.load())  # None: it takes **kwargs
    given = criterion.loss_kwargs()
    rejected = [] if accepted is None else [k for k in given if k not in accepted]
    if rejected:
        raise TypeError(
            f"criterion.name={spec.name} ({spec.value}) does not take "
            f"{', '.join('criterion.' + k for k in rejected)}. It accepts: "
            f"{', '.join('criterion.' + k for k in accepted or []) or 'no arguments'}."
        )
    return spec


def _is_sidecar(path: str) -> bool:
    """Whether a file is a comma-separated ``filename,caption`` sidecar."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = {h.strip() for h in next(csv.reader(handle), [])}
    except (OSError, UnicodeDecodeError):
        return False  # the reader names the problem
    return {"filename", "caption"} <= header


def _read_records(captions: CaptionsConfig, input_dir: str) -> list[CaptionRecord]:
    """The caption records ``captions.*`` names for the images of ``input_dir``."""
    source, fmt = captions.source, captions.format
    if fmt == "auto" and source is None:
        sidecar = os.path.join(input_dir, DEFAULT_SIDECAR)
        if not os.path.isfile(sidecar):
            raise ValueError(
                "This loss needs a caption for every image, but no captions source is "
                f"set and {sidecar} does not exist. Set captions.source=<file> "
                "(open_clip CSV/TSV, JSONL, or a filename,caption CSV), put a "
                f"filename,caption {DEFAULT_SIDECAR} into input_dir, or use "
                "captions.format=classes to caption class folders from their names."
            )
        fmt = "folder"
    elif fmt == "auto":
        assert source is not None
        fmt = detect_format(source)
        fmt = "folder" if fmt == "csv" and _is_sidecar(source) else fmt
    if fmt == "classes":
        if source is not None and os.path.abspath(source) != os.path.abspath(input_dir):
            raise ValueError(
                "captions.format=classes captions the class folders of input_dir; "
                f"captions.source must be empty or input_dir, got {source!r}."
            )
        return read_captions(input_dir, "classes", template=captions.template)
    keys = ["img_key", "caption_key", *(["sep"] if fmt != "jsonl" else [])]
    kwargs = {k: getattr(captions, k) for k in keys if getattr(captions, k) is not None}
    if fmt == "folder":
        if source is not None and os.path.isdir(source):
            source = os.path.join(source, DEFAULT_SIDECAR)
        return read_captions(input_dir, "folder", captions_file=source, **kwargs)
    if source is None:
        raise ValueError(f"captions.format={fmt} needs captions.source=<file>.")
    return read_captions(source, fmt, **kwargs)


def _align(
    records: Sequence[CaptionRecord], filenames: Sequence[str], input_dir: str
) -> list[CaptionRecord]:
    """The records in the order of the images, named as ``LightlyDataset`` names them.

    A record path that is an image name of ``input_dir`` is taken as is; any other is
    read as open_clip reads it (absolute, or relative to the working directory).
    """
    known = {Path(name).as_posix() for name in filenames}
    by_name: dict[str, CaptionRecord] = {}
    for record in records:
        name = Path(record.filename).as_posix()
        if os.path.isabs(record.filename) or name not in known:
            name = Path(
                os.path.relpath(os.path.abspath(record.filename), input_dir)
            ).as_posix()
        by_name.setdefault(name, record)
    aligned, missing = [], []
    for name in filenames:
        found = by_name.pop(Path(name).as_posix(), None)
        if found is None:
            missing.append(name)
        else:
            aligned.append(CaptionRecord(name, found.caption, found.label))
    if missing:
        unmatched = (
            f" The captions name e.g. {next(iter(by_name))!r}, which is not an image "
            "of input_dir."
            if by_name
            else ""
        )
        raise ValueError(
            f"The captions do not cover the images: {len(missing)} of {len(filenames)} "
            f"image(s) in {input_dir} have no caption, e.g. {missing[0]!r}.{unmatched} "
            "File names in the captions must be relative to input_dir (or absolute)."
        )
    return aligned


def _embeddings(
    records: list[CaptionRecord], captions: CaptionsConfig
) -> CaptionLookup:
    """A finished cache of the records, opened without the encoder, else embedded."""
    name, cache_dir = captions.encoder, captions.cache_dir
    expected = os.path.abspath(name) if name and os.path.isdir(name) else name
    try:
        return caption_lookup(
            records,
            cache_dir,
            partial(
                text.TextEncoder,
                name,
                device=captions.device,
                batch_size=captions.batch_size,
                show_progress=True,
            ),
            encoder_name=expected or text.DEFAULT_MODEL_NAME,
            dtype=captions.dtype,
        )
    except (OSError, RuntimeError, ImportError) as err:
        # A missing encoder folder, an absent device, an unwritable cache folder.
        raise ValueError(
            f"captions: embedding the captions failed (captions.encoder="
            f"{name or 'null (all-MiniLM-L6-v2)'}, captions.device={captions.device}"
            f"{f', captions.cache_dir={cache_dir}' if cache_dir else ''}): "
            f"{type(err).__name__}: {err}"
        ) from None


def make_targets(
    config: TrainConfig, spec: LossSpec, dataset: LightlyDataset
) -> tuple[Any, str]:
    """``(collate_fn, kind)`` for the loss ``spec`` on the images of ``dataset``."""
    input_dir = str(config.input_dir)
    if spec.targets == "none":
        return MultiViewCollate(), "none"
    if spec.targets == "labels":
        classes = getattr(dataset.dataset, "classes", None) or []
        if len(classes) < 2:
            raise ValueError(
                f"criterion.name={spec.name} uses class labels, which come from the "
                "class subfolders of input_dir (one folder per class), but "
                f"{input_dir} has {len(classes)} class folder(s); at least 2 are needed."
            )
        return XCLRCollate(use_labels=True), "labels"
    records = _read_records(config.captions, input_dir)
    records = _align(records, dataset.get_filenames(), input_dir)
    return XCLRCollate(_embeddings(records, config.captions)), "captions"


def prepare_targets(
    cfg: TrainConfig | DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> tuple[Any, str]:
    """Checks the config for the chosen loss and builds what its targets need.

    Returns:
        ``(collate_fn, kind)``: lightly's ``MultiViewCollate`` and ``"none"``, or an
        :class:`xclr_plugin.data.XCLRCollate` with the caption embeddings
        (``"captions"``) or with ``use_labels=True`` (``"labels"``).

    Raises:
        ValueError: For a bad key, an unknown or image-text loss, a bad ``input_dir``,
            no or bad captions (missing images, not finite), or fewer than two class
            folders for label losses.
        TypeError: For a ``criterion.*`` key the loss does not take.
    """
    config = parse_config(cfg, is_cli_call=is_cli_call)
    spec = check_loss(config.criterion)
    return make_targets(config, spec, list_images(config.input_dir))
