"""What a run reads: the images of ``input_dir`` (checked), the loss (checked by name)
and its targets (caption embeddings, class labels or none)."""

import csv
import os
import warnings
from collections.abc import Sequence
from typing import Any

from lightly.data import LightlyDataset, MultiViewCollate
from lightly.data._helpers import IMG_EXTENSIONS
from PIL import Image

from xclr_plugin import text
from xclr_plugin.cache import CaptionLookup, caption_lookup
from xclr_plugin.captions import (
    DEFAULT_SIDECAR,
    CaptionRecord,
    detect_format,
    match_images,
    read_captions,
)
from xclr_plugin.data import XCLRCollate, check_mode, load_rgb
from xclr_plugin.integrations.lightly_train import config as conf
from xclr_plugin.registry import LossSpec, loss_info, parameter_names


def _unreadable(err: OSError) -> None:
    raise ValueError(f"input_dir: the folder {err.filename} cannot be read: {err}.")


def _check_folder_links(input_dir: str) -> None:
    """Refuses folder links that make torchvision (which follows them) read images
    again: a loop repeats them until the path is too long, two links double them."""
    seen = {os.path.realpath(input_dir)}
    for root, dirs, _ in os.walk(input_dir, onerror=_unreadable, followlinks=True):
        for path in (os.path.join(root, name) for name in sorted(dirs)):
            if (real := os.path.realpath(path)) in seen:
                raise ValueError(
                    f"input_dir: {path} leads to {real}, which input_dir already holds "
                    "(a link loop or a second link to one folder), so its images "
                    "would be read more than once. Remove the link."
                )
            seen.add(real)


def list_images(input_dir: str | None) -> LightlyDataset:
    """The images of ``input_dir`` (no transform yet); ValueError if there are none."""
    if input_dir is None:
        raise ValueError("input_dir is not set: pass input_dir=<image folder>.")
    if not os.path.isdir(input_dir):
        what = "is not a folder" if os.path.exists(input_dir) else "does not exist"
        raise ValueError(f"input_dir {input_dir!r} {what}.")
    _check_folder_links(input_dir)
    try:
        dataset = LightlyDataset(input_dir)
    except (RuntimeError, FileNotFoundError) as err:  # "Found 0 files in folder ..."
        raise ValueError(
            f"input_dir {input_dir!r} holds no image files (searched with subfolders; "
            f"extensions {', '.join(IMG_EXTENSIONS)}): {err}"
        ) from None
    if hasattr(dataset.dataset, "loader"):  # not videos
        dataset.dataset.loader = load_rgb  # lightly's, but 16-bit images not white
    if hasattr(dataset.dataset, "classes"):  # ImageFolder: subfolders only
        top = sorted(f.name for f in os.scandir(input_dir) if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS))  # fmt: skip
        if top:
            warnings.warn(
                f"input_dir: {len(top)} image(s) at the top of {input_dir} (e.g. "
                f"{top[0]!r}) are not trained on: in a folder with subfolders, "
                "lightly's LightlyDataset (and so lightly-ssl-train) lists only the "
                "images inside them, one class per subfolder.",
                stacklevel=2,
            )
    return dataset


def verify_images(input_dir: str, filenames: Sequence[str]) -> None:
    """Opens and verifies every image with PIL, naming the first unreadable one."""
    bad = {}
    for path in (os.path.join(input_dir, name) for name in filenames):
        if path.lower().endswith(IMG_EXTENSIONS):  # videos: lightly's own reader
            try:
                with Image.open(path) as image:
                    check_mode(image)
                    image.verify()
            except Exception as err:  # PIL raises many kinds for many formats
                bad[path] = f"{type(err).__name__}: {err}"
    if bad:
        path, why = next(iter(bad.items()))
        more = f" ({len(bad)} of {len(filenames)} images are unreadable)"
        raise ValueError(
            f"the image {path} cannot be read{more if len(bad) > 1 else ''}: {why}. "
            "Remove or replace it (or set check_images=false to skip this check)."
        )


def _keys(names: Sequence[str]) -> str:
    return ", ".join(f"criterion.{k}" for k in names)


def check_loss(criterion: conf.CriterionConfig) -> LossSpec:
    """The two-view loss ``criterion.name``; ValueError for an unknown or image-text
    loss, TypeError naming exactly the ``criterion.*`` keys it does not take."""
    spec = loss_info(criterion.name)
    if spec.inputs != "two-view":
        raise ValueError(
            f"criterion.name={spec.name} is an image-text loss; xclr-train trains "
            "lightly's two-view SimCLR model and needs a two-view loss such as ntxent, "
            "xclr or supcon. Train image-text losses with xclr-openclip-train."
        )
    accepted = parameter_names(spec.load())  # None: it takes **kwargs
    given = criterion.loss_kwargs()
    if accepted is not None and (rejected := [k for k in given if k not in accepted]):
        raise TypeError(
            f"criterion.name={spec.name} ({spec.value}) does not take {_keys(rejected)}."
            f" It accepts: {_keys(accepted) or 'no arguments'}."
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


def _read_records(captions: conf.CaptionsConfig, input_dir: str) -> list[CaptionRecord]:
    """The caption records ``captions.*`` names for the images of ``input_dir``."""
    source, fmt = captions.source, captions.format
    if fmt == "auto" and source is None:
        if not os.path.isfile(sidecar := os.path.join(input_dir, DEFAULT_SIDECAR)):
            raise ValueError(
                "This loss needs a caption for every image, but no captions source is "
                f"set and {sidecar} does not exist. Set captions.source=<file> "
                "(open_clip CSV/TSV, JSONL, or a filename,caption CSV), put a "
                f"filename,caption {DEFAULT_SIDECAR} into input_dir, or use "
                "captions.format=classes to caption class folders from their names."
            )
        fmt = "folder"
    elif fmt == "auto" and source is not None:
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


def _embeddings(
    records: list[CaptionRecord], captions: conf.CaptionsConfig
) -> CaptionLookup:
    """A finished cache of the records, opened without the encoder, else embedded."""
    name, cache_dir, device = captions.encoder, captions.cache_dir, captions.device

    def encoder() -> text.TextEncoder:
        return text.TextEncoder(
            name, device=device, batch_size=captions.batch_size, show_progress=True
        )

    expected = text.encoder_name(name)
    try:
        return caption_lookup(
            records, cache_dir, encoder, encoder_name=expected, dtype=captions.dtype
        )
    except (OSError, RuntimeError, ImportError) as err:
        # A missing encoder folder, an absent device, an unwritable cache folder.
        cache = f", captions.cache_dir={cache_dir}" if cache_dir else ""
        raise ValueError(
            f"captions: embedding the captions failed (captions.encoder="
            f"{name or 'null (all-MiniLM-L6-v2)'}, captions.device={device}{cache}): "
            f"{type(err).__name__}: {err}"
        ) from None


def make_targets(
    config: conf.TrainConfig, spec: LossSpec, dataset: LightlyDataset
) -> tuple[Any, str]:
    """``(collate_fn, kind)`` for the loss ``spec`` on the images of ``dataset``."""
    if spec.targets == "none":
        return MultiViewCollate(), "none"
    input_dir = str(config.input_dir)
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
    source = f"captions.source={config.captions.source or input_dir}"
    records = match_images(records, dataset.get_filenames(), input_dir, source=source)
    return XCLRCollate(_embeddings(records, config.captions)), "captions"


def prepare_targets(
    cfg: conf.AnyConfig, *, is_cli_call: bool = False
) -> tuple[Any, str]:
    """Checks the config for its loss: ``(collate_fn, kind)``, kind ``"none"``,
    ``"labels"`` or ``"captions"`` (ValueError or TypeError as :func:`train`)."""
    config = conf.parse_config(cfg, is_cli_call=is_cli_call)
    spec = check_loss(config.criterion)
    return make_targets(config, spec, list_images(config.input_dir))
