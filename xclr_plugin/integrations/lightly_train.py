"""``xclr-train``: a drop-in for lightly's ``lightly-ssl-train`` with a choice of loss.

The hydra config is lightly's own ``lightly/cli/config/config.yaml`` (loaded through
hydra's search path, so every ``lightly-ssl-train`` override keeps working) plus
``criterion.name`` (any two-view loss of :mod:`xclr_plugin.registry`, default
``ntxent``), ``criterion.target_temperature``, ``criterion.gather_distributed``, the
``captions.*`` keys (caption source, text encoder, embedding cache) and optional
``trainer.accelerator`` / ``trainer.devices`` / ``trainer.strategy``.

Training is lightly's: the same model (``ResNetGenerator`` backbone and the CLI's
``_SimCLR`` head), ``SimCLRTransform``, ``LightlyDataset``, SGD, and lightly's Lightning
module ``SelfSupervisedEmbedding`` with its checkpoint and summary callbacks, built in
the same order from the same seed. With ``criterion.name=ntxent`` nothing else changes,
so the run reproduces ``lightly-ssl-train`` step for step. Losses with targets get a
collate (:class:`xclr_plugin.data.XCLRCollate`) that puts the caption embeddings or
class labels in the batch's target slot, and a module that passes them to the loss.

Everything that can be wrong with the config is found before training starts: the
types and ranges of the keys, the loss name and arguments, the caption source, captions
that do not cover the images (or are not finite), missing class folders, an empty or
unreadable ``input_dir``, an image that PIL cannot open, a batch too small to contrast,
and the Lightning trainer settings (the trainer is built first). The command prints
one line ``xclr-train: error: ...`` and exits with status 2; from Python, ``train``
raises ``ValueError`` (``TypeError`` for a loss argument). A non-finite loss stops
training before the step's update with :class:`NonFiniteLossError` (status 1).

Examples:
    Command line::

        xclr-train input_dir=images/ pre_trained=False criterion.name=xclr \\
            captions.source=images/captions.csv

    Python::

        >>> cfg = load_config(["input_dir=images/", "criterion.name=supcon"])
        >>> result = train(cfg)
        >>> result.checkpoint
"""

from __future__ import annotations

import copy
import csv
import inspect
import math
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from lightly.cli._cli_simclr import _SimCLR
from lightly.cli._helpers import (
    cpu_count,
    fix_hydra_arguments,
    fix_input_path,
    get_ptmodel_from_config,
    is_url,
    load_from_state_dict,
    load_state_dict_from_url,
)
from lightly.data import LightlyDataset, MultiViewCollate
from lightly.data._helpers import IMG_EXTENSIONS
from lightly.embedding import SelfSupervisedEmbedding, callbacks
from lightly.models import ResNetGenerator
from lightly.models.batchnorm import get_norm_layer
from lightly.transforms import SimCLRTransform
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from xclr_plugin.registry import LossSpec, build_criterion, loss_info

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
    "NonFiniteLossError",
    "TargetEmbedding",
    "TrainResult",
    "load_config",
    "main",
    "prepare_targets",
    "train",
]

#: Folder of the hydra config, and the config's name.
CONFIG_DIR = Path(__file__).with_name("config")
CONFIG_NAME = "xclr_train"

_CAPTION_FORMATS = ("auto", "csv", "jsonl", "folder", "classes")
_SIDECAR = "captions.csv"


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        checkpoint: Path of the best checkpoint (the last one with lightly's defaults).
        metrics: The trainer's final logged metrics, e.g. ``{"loss": 4.1}``.
        loss_name: The loss that was trained with.
    """

    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    loss_name: str = "ntxent"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before that step's update."""


class _StopOnNonFiniteLoss(Callback):  # type: ignore[misc]
    """Stops training on a non-finite loss, before its gradients reach the weights.

    Checked in ``on_before_backward``, so the bad step updates nothing and the
    checkpoints written so far stay finite. Under DDP the decision is reduced over
    the processes (one tiny all-reduce per step), so every process stops together
    instead of the others waiting forever in the next collective.
    """

    def __init__(self, loss_name: str) -> None:
        self.loss_name = loss_name

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        """Raises :class:`NonFiniteLossError` if ``loss`` is NaN or infinite on any process."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = (
                "non-finite on another process"
                if finite
                else str(loss.detach().float().flatten()[0].item())
            )
            raise NonFiniteLossError(
                f"the {self.loss_name} loss is {value} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}; training stopped before this step's "
                "update (checkpoints of earlier epochs are kept). Usual causes: a too "
                "high optimizer.lr, a too low criterion.temperature, or non-finite "
                "caption embeddings."
            )


class TargetEmbedding(SelfSupervisedEmbedding):  # type: ignore[misc]
    """lightly's ``SelfSupervisedEmbedding`` whose loss also gets the batch's targets.

    The batch is lightly's ``(views, targets, filenames)``; the loss is called as
    ``criterion(out0, out1, targets)`` with ``targets`` the ``(B, Dt)`` caption
    embeddings or the ``(B,)`` labels that :class:`xclr_plugin.data.XCLRCollate` put
    there. Everything else (optimizer, dataloader, ``train_embedding`` with lightly's
    callbacks) is lightly's.
    """

    def training_step(
        self, batch: tuple[list[Tensor], Tensor | None, list[str]], batch_idx: int
    ) -> Tensor:
        """Computes the loss of a batch and logs it as ``loss`` (as lightly does).

        Under DDP the logged value is the mean over processes: the loss of the global
        batch.

        Args:
            batch: ``(views, targets, filenames)``; the first two views are used.
            batch_idx: Index of the batch.

        Returns:
            The loss.
        """
        (x0, x1), targets, _ = batch
        y0, y1 = self(x0, x1)
        loss: Tensor = self.criterion(y0, y1, targets)
        # Each process's loss covers its own anchors only; the mean over processes is
        # the loss of the global batch, which is what the log should show.
        self.log("loss", loss, sync_dist=True)
        return loss


def load_config(
    overrides: Sequence[str] = (), updates: Mapping[str, Any] | None = None
) -> DictConfig:
    """Composes the ``xclr-train`` config, as the command line would.

    Args:
        overrides: Hydra overrides, e.g. ``["input_dir=images/", "criterion.name=xclr"]``.
        updates: A nested mapping merged on top, e.g. ``{"loader": {"batch_size": 8}}``.

    Returns:
        The config (lightly's keys plus ``criterion.name``, ``captions.*``, ...).

    Raises:
        hydra.errors.ConfigCompositionException: For an override of an unknown key.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    if updates:
        merged = OmegaConf.merge(cfg, OmegaConf.create(dict(updates)))
        assert isinstance(merged, DictConfig)
        cfg = merged
    return cfg


def _as_config(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    """A private copy of a config; a plain mapping is merged onto the defaults."""
    if isinstance(cfg, DictConfig):
        return copy.deepcopy(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"cfg must be a DictConfig or a mapping, got {type(cfg).__name__}."
        )
    return load_config(updates=cfg)


def _criterion_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``criterion`` node as a plain dict (``name`` and the loss's kwargs)."""
    node = cfg.get("criterion")
    plain = (
        OmegaConf.to_container(node, resolve=True)
        if isinstance(node, DictConfig)
        else None
    )
    if not isinstance(plain, dict) or not plain.get("name"):
        raise ValueError(
            "The config needs criterion.name naming the loss, e.g. criterion.name=xclr."
        )
    return {str(k): v for k, v in plain.items()}


def _check_two_view(spec: LossSpec) -> None:
    """Rejects losses that do not take lightly's two-view inputs."""
    if spec.inputs != "two-view":
        raise ValueError(
            f"criterion.name={spec.name} is an image-text loss (forward(image_features, "
            f"text_features, logit_scale, ...)); xclr-train trains lightly's two-view "
            f"SimCLR model and needs a two-view loss such as ntxent, xclr or supcon. "
            f"Train image-text losses with the open_clip integration "
            f"(xclr_plugin.integrations.open_clip_train)."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_bank_size(value: Any) -> bool:
    if _is_int(value):
        return bool(value == 0)
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(_is_int(v) and v > 0 for v in value)
    )


_RESNETS = (
    "resnet-9",
    "resnet-18",
    "resnet-34",
    "resnet-50",
    "resnet-101",
    "resnet-152",
)

# (key, accepts, what it must be, None allowed). Hydra turns a mistyped value into a
# string (max_epochs=abc) that lightly and Lightning only trip over deep inside
# training, so the keys xclr-train itself passes on are checked here, by name.
_VALUE_CHECKS: list[tuple[str, Callable[[Any], bool], str, bool]] = [
    ("pre_trained", lambda v: isinstance(v, bool), "true or false", False),
    (
        "seed",
        lambda v: _is_int(v) and 0 <= v < 2**32,
        "an integer in [0, 2**32)",
        False,
    ),
    ("model.name", lambda v: v in _RESNETS, f"one of {list(_RESNETS)}", False),
    ("model.width", lambda v: _is_number(v) and v > 0, "a number > 0", False),
    ("model.num_ftrs", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("model.out_dim", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("criterion.temperature", _is_number, "a number", True),
    ("criterion.target_temperature", _is_number, "a number", True),
    (
        "criterion.gather_distributed",
        lambda v: isinstance(v, bool),
        "true or false",
        True,
    ),
    (
        "criterion.memory_bank_size",
        _is_bank_size,
        "0 or [num_entries, out_dim] (two integers > 0)",
        True,
    ),
    ("optimizer.lr", lambda v: _is_number(v) and v >= 0, "a number >= 0", False),
    (
        "optimizer.weight_decay",
        lambda v: _is_number(v) and v >= 0,
        "a number >= 0",
        False,
    ),
    ("collate.input_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("loader.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("loader.num_workers", _is_int, "an integer (-1: one per CPU core)", False),
    ("loader.shuffle", lambda v: isinstance(v, bool), "true or false", False),
    ("loader.drop_last", lambda v: isinstance(v, bool), "true or false", False),
    ("trainer.gpus", lambda v: _is_int(v) and v >= 0, "an integer >= 0", True),
    (
        "trainer.max_epochs",
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "an integer >= 1, or -1 for no limit (0 trains nothing and writes no "
        "checkpoint)",
        True,
    ),
    (
        "trainer.max_steps",
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "an integer >= 1, or -1 for no limit",
        True,
    ),
    (
        "checkpoint_callback.save_last",
        lambda v: isinstance(v, bool),
        "true or false",
        True,
    ),
    (
        "checkpoint_callback.save_top_k",
        lambda v: _is_int(v) and v >= -1,
        "an integer >= -1",
        False,
    ),
    (
        "summary_callback.max_depth",
        lambda v: _is_int(v) and v >= -1,
        "an integer >= -1",
        False,
    ),
    ("check_images", lambda v: isinstance(v, bool), "true or false", False),
    ("captions.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
]

_ABSENT = object()


def _check_values(cfg: DictConfig) -> None:
    """Checks the type and range of every key xclr-train passes on.

    Raises:
        ValueError: Naming the first bad key, what it must be and what it is.
    """
    for key, accepts, expected, nullable in _VALUE_CHECKS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and nullable):
            continue
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not accepts(plain):
            raise ValueError(f"{key} must be {expected}, got {plain!r}.")


def _check_loss_arguments(spec: LossSpec, criterion: Mapping[str, Any]) -> None:
    """Names exactly the ``criterion.*`` keys the loss does not take.

    Raises:
        TypeError: Listing the rejected keys and the ones the loss accepts.
    """
    try:
        parameters = inspect.signature(spec.load()).parameters
    except (TypeError, ValueError):  # no signature: the constructor checks itself
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [
        name
        for name, p in parameters.items()
        if p.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    rejected = [
        k
        for k, v in criterion.items()
        if k != "name" and v is not None and k not in accepted
    ]
    if rejected:
        raise TypeError(
            f"criterion.name={spec.name} ({spec.value}) does not take "
            f"{', '.join('criterion.' + k for k in rejected)}. It accepts: "
            f"{', '.join('criterion.' + k for k in accepted) or 'no arguments'}."
        )


def _path(value: Any, is_cli_call: bool) -> str | None:
    """A path from the config: None/empty stays None; relative paths are fixed."""
    if value is None or str(value) == "":
        return None
    path = str(value)
    return fix_input_path(path) if is_cli_call else path


def _detect_caption_format(source: str) -> str:
    """Guesses the format of a captions file or folder.

    A folder is ``"classes"`` (or ``"folder"`` if it holds ``captions.csv``);
    ``.jsonl``/``.json`` files are ``"jsonl"``; a comma-separated file whose header has
    ``filename`` and ``caption`` is a ``"folder"`` sidecar; anything else is open_clip
    ``"csv"``.
    """
    if os.path.isdir(source):
        return "folder" if os.path.isfile(os.path.join(source, _SIDECAR)) else "classes"
    if source.lower().endswith((".jsonl", ".json")):
        return "jsonl"
    try:
        with open(source, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return "csv"  # the reader raises the precise error
    return "folder" if {"filename", "caption"} <= {h.strip() for h in header} else "csv"


def _read_caption_records(
    captions: Mapping[str, Any], input_dir: str, is_cli_call: bool
) -> list[Any]:
    """Reads the caption records named by the ``captions`` node, for ``input_dir``.

    Returns:
        Records whose file names are relative to ``input_dir`` where that can be told
        (folder sources always; CSV/JSONL rows as written).

    Raises:
        ValueError: If there is no source or the format is unknown (and whatever the
            readers raise for malformed files).
    """
    from xclr_plugin import captions as readers

    fmt = str(captions.get("format") or "auto")
    if fmt not in _CAPTION_FORMATS:
        raise ValueError(
            f"captions.format must be one of {list(_CAPTION_FORMATS)}, got {fmt!r}."
        )
    source = _path(captions.get("source"), is_cli_call)
    sidecar = os.path.join(input_dir, _SIDECAR)
    if fmt == "auto":
        if source is None:
            if not os.path.isfile(sidecar):
                raise ValueError(
                    "This loss needs a caption for every image, but no captions source "
                    f"is set and {sidecar} does not exist. Set captions.source=<file> "
                    "(open_clip CSV/TSV, JSONL, or a filename,caption CSV), "
                    f"put a filename,caption {_SIDECAR} into input_dir, or use "
                    "captions.format=classes to caption class folders from their names."
                )
            source, fmt = sidecar, "folder"
        else:
            fmt = _detect_caption_format(source)
    if fmt == "classes":
        if source is not None and os.path.abspath(source) != os.path.abspath(input_dir):
            raise ValueError(
                f"captions.format=classes captions the class folders of input_dir; "
                f"captions.source must be empty or input_dir, got {source!r}."
            )
        records: list[Any] = readers.read_class_captions(
            input_dir,
            template=str(captions.get("template") or readers.DEFAULT_TEMPLATE),
        )
        return records
    keys = {
        "sep": captions.get("sep"),
        "img_key": captions.get("img_key"),
        "caption_key": captions.get("caption_key"),
    }
    kwargs = {k: v for k, v in keys.items() if v is not None}
    if fmt == "folder":
        if source is not None and os.path.isdir(source):
            source = os.path.join(source, _SIDECAR)
        return readers.read_folder_captions(input_dir, source, **kwargs)
    if source is None:
        raise ValueError(f"captions.format={fmt} needs captions.source=<file>.")
    if fmt == "csv":
        return readers.read_csv_captions(source, **kwargs)
    kwargs.pop("sep", None)
    return readers.read_jsonl_captions(source, **kwargs)


def _relative_name(filename: str, input_dir: str, known: set[str]) -> str:
    """Maps a captions-file path to a ``LightlyDataset`` file name of ``input_dir``.

    A relative path that is one of the image names of ``input_dir`` is taken as is;
    any other path is read as open_clip reads it (absolute, or relative to the working
    directory) and made relative to ``input_dir``. No file system access.
    """
    posix = Path(filename).as_posix()
    if not os.path.isabs(filename) and posix in known:
        return posix
    return Path(os.path.relpath(os.path.abspath(filename), input_dir)).as_posix()


def _align_records(
    records: Sequence[Any], filenames: Sequence[str], input_dir: str
) -> list[Any]:
    """Orders caption records like the dataset's images; every image needs a caption.

    Raises:
        ValueError: If some images of ``input_dir`` have no caption.
    """
    from xclr_plugin.captions import CaptionRecord

    known = {Path(name).as_posix() for name in filenames}
    by_name: dict[str, Any] = {}
    for record in records:
        by_name.setdefault(_relative_name(record.filename, input_dir, known), record)
    aligned, missing = [], []
    for name in filenames:
        record = by_name.pop(Path(name).as_posix(), None)
        if record is None:
            missing.append(name)
        else:
            aligned.append(CaptionRecord(name, record.caption, record.label))
    if missing:
        unmatched = (
            f" The captions name e.g. {next(iter(by_name))!r}, which is not an image of input_dir."
            if by_name
            else ""
        )
        raise ValueError(
            f"The captions do not cover the images: {len(missing)} of {len(filenames)} "
            f"image(s) in {input_dir} have no caption, e.g. {missing[0]!r}.{unmatched} "
            "File names in the captions must be relative to input_dir (or absolute)."
        )
    return aligned


def _check_folder_links(input_dir: str) -> None:
    """Refuses folder links that make ``LightlyDataset`` read images again.

    torchvision walks ``input_dir`` following links: a link to a folder above it (a
    loop) repeats every image until the path grows too long (4 images became 160 in a
    test), and two links to one folder double its images. Both are refused, naming
    the link.

    Raises:
        ValueError: For such a link or a folder that cannot be read.
    """
    seen = {os.path.realpath(input_dir)}
    stack = [input_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise ValueError(
                f"input_dir: the folder {folder} cannot be read: {err}."
            ) from None
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                continue  # a broken link: the image check names broken files
            if not is_dir:
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                raise ValueError(
                    f"input_dir: {entry.path} leads to {real}, which input_dir already "
                    "holds (a link loop or a second link to one folder), so its images "
                    "would be read more than once. Remove the link."
                )
            seen.add(real)
            stack.append(entry.path)


def _list_images(input_dir: str | None) -> LightlyDataset:
    """The images of ``input_dir``, as ``LightlyDataset`` finds them (no transform yet).

    Raises:
        ValueError: If ``input_dir`` is unset, missing, not a folder, unreadable, or
            holds no image lightly can read.
    """
    if input_dir is None:
        raise ValueError("input_dir is not set: pass input_dir=<image folder>.")
    if not os.path.exists(input_dir):
        raise ValueError(f"input_dir {input_dir!r} does not exist.")
    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir {input_dir!r} is not a folder.")
    _check_folder_links(input_dir)
    try:
        dataset = LightlyDataset(input_dir)
    except PermissionError as err:
        raise ValueError(f"input_dir {input_dir!r} cannot be read: {err}.") from None
    except (RuntimeError, FileNotFoundError) as err:
        # torchvision: "Found 0 files in folder ..." (also for a folder of non-images).
        raise ValueError(
            f"input_dir {input_dir!r} holds no image files (searched with "
            f"subfolders; extensions {', '.join(IMG_EXTENSIONS)}): {err}"
        ) from None
    if len(dataset) == 0:
        raise ValueError(f"input_dir {input_dir!r} holds no image files.")
    return dataset


def _targets(
    config: DictConfig,
    spec: LossSpec,
    input_dir: str,
    dataset: LightlyDataset,
    is_cli_call: bool,
) -> tuple[Any, str]:
    """``(collate_fn, kind)`` for the loss ``spec`` on ``dataset`` (see prepare_targets)."""
    if spec.targets == "none":
        return MultiViewCollate(), "none"

    from xclr_plugin.data import XCLRCollate

    if spec.targets == "labels":
        classes = getattr(dataset.dataset, "classes", None) or []
        if len(classes) < 2:
            raise ValueError(
                f"criterion.name={spec.name} uses class labels, which come from the class "
                f"subfolders of input_dir (one folder per class), but {input_dir} has "
                f"{len(classes)} class folder(s); at least 2 are needed."
            )
        return XCLRCollate(use_labels=True), "labels"

    captions = config.get("captions") or {}
    records = _read_caption_records(captions, input_dir, is_cli_call)
    records = _align_records(records, dataset.get_filenames(), input_dir)

    from xclr_plugin.cache import CaptionCache, CaptionTable, build_caption_cache
    from xclr_plugin.text import TextEncoder

    cache_dir = _path(captions.get("cache_dir"), is_cli_call)
    encoder_name = captions.get("encoder")
    lookup: Any = None
    if cache_dir is not None:
        # A finished cache of these captions is used without loading the encoder (so
        # DDP workers and repeated runs start at once).
        lookup = _open_finished_cache(cache_dir, records, encoder_name)
    if lookup is None:
        device = str(captions.get("device") or "cpu")
        try:
            encoder = TextEncoder(
                encoder_name,
                device=device,
                batch_size=int(captions.get("batch_size") or 256),
                show_progress=True,
            )
            if cache_dir is None:
                lookup = CaptionTable.from_records(records, encoder)
            else:
                lookup = build_caption_cache(
                    records,
                    cache_dir,
                    encoder,
                    dtype=str(captions.get("dtype") or "float16"),
                )
        except (OSError, RuntimeError, ImportError) as err:
            # A missing encoder folder, a device that is not there, a cache folder
            # that cannot be written: all show up here, as different exceptions.
            where = f", captions.cache_dir={cache_dir}" if cache_dir else ""
            raise ValueError(
                f"captions: embedding the captions failed (captions.encoder="
                f"{encoder_name or 'null (all-MiniLM-L6-v2)'}, captions.device="
                f"{device}{where}): "
                f"{type(err).__name__}: {err}"
            ) from None
    if isinstance(lookup, CaptionCache):
        # Training reads every row: one NaN row would turn every loss it meets into
        # NaN (and, gathered, every process's), so the rows are checked once here.
        lookup = CaptionCache.open(lookup.path, records=records, check_finite=True)
    elif not bool(torch.isfinite(lookup.embeddings).all()):
        bad = int((~torch.isfinite(lookup.embeddings).all(dim=1)).nonzero()[0, 0])
        raise ValueError(
            f"The caption embedding of {records[bad].filename!r} (caption "
            f"{records[bad].caption!r}) is not finite."
        )
    return XCLRCollate(lookup), "captions"


def prepare_targets(
    cfg: DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> tuple[Any, str]:
    """Checks the config for the chosen loss and builds what its targets need.

    Args:
        cfg: The ``xclr-train`` config.
        is_cli_call: Resolve relative paths against hydra's original working directory.

    Returns:
        ``(collate_fn, kind)``: lightly's ``MultiViewCollate`` and ``"none"`` for losses
        without targets; an :class:`xclr_plugin.data.XCLRCollate` with the caption
        embeddings (``"captions"``) or with ``use_labels=True`` (``"labels"``).

    Raises:
        ValueError: For a key of the wrong type or range, an unknown loss name, an
            image-text loss, a missing, empty or unreadable ``input_dir``, a missing
            captions source, captions that do not cover the images or are not finite,
            or a folder without at least two class subfolders for label losses.
        TypeError: For a ``criterion.*`` key the loss does not take.
    """
    config = _as_config(cfg)
    collate_fn, kind, _, _ = _check_and_list(config, is_cli_call)
    return collate_fn, kind


def _check_and_list(
    config: DictConfig, is_cli_call: bool
) -> tuple[Any, str, str, LightlyDataset]:
    """Config checks and targets: ``(collate_fn, kind, input_dir, dataset)``."""
    _check_values(config)
    criterion = _criterion_config(config)
    spec = loss_info(str(criterion["name"]))
    _check_two_view(spec)
    _check_loss_arguments(spec, criterion)
    try:
        build_criterion(criterion)  # checks the values now (the real one comes later)
    except (TypeError, ValueError) as err:
        raise ValueError(f"criterion: {err}") from None
    input_dir = _path(config.get("input_dir"), is_cli_call)
    dataset = _list_images(input_dir)
    assert input_dir is not None  # _list_images refuses None
    collate_fn, kind = _targets(config, spec, input_dir, dataset, is_cli_call)
    return collate_fn, kind, input_dir, dataset


def _open_finished_cache(
    cache_dir: str, records: Sequence[Any], encoder: str | None
) -> Any:
    """Opens a finished caption cache of exactly ``records`` made by ``encoder``.

    Returns:
        The :class:`xclr_plugin.cache.CaptionCache`, or None if there is none, it is
        unfinished or different, or it was made by another encoder (then the caller
        loads the encoder and builds, resumes or reports it).
    """
    from xclr_plugin.cache import MANIFEST_FILE, CaptionCache
    from xclr_plugin.text import DEFAULT_MODEL_NAME

    if not os.path.isfile(os.path.join(cache_dir, MANIFEST_FILE)):
        return None
    try:
        cache = CaptionCache.open(cache_dir, records=records)
    except (OSError, ValueError):
        return None
    if encoder is None:
        expected = DEFAULT_MODEL_NAME
    else:
        expected = os.path.abspath(encoder) if os.path.isdir(encoder) else str(encoder)
    return cache if cache.encoder == expected else None


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """lightly-ssl-train's trainer arguments, with optional accelerator overrides."""
    trainer: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    # lightly-ssl-train: GPU if available, DDP over trainer.gpus GPUs.
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and int(trainer.get("gpus") or 1) > 1:
        devices, strategy = trainer["gpus"], "ddp"
    else:
        devices, strategy = 1, None
    trainer.pop("gpus", None)
    chosen = {
        "accelerator": trainer.pop("accelerator", None),
        "devices": trainer.pop("devices", None),
        "strategy": trainer.pop("strategy", None),
    }
    trainer["accelerator"] = chosen["accelerator"] or accelerator
    trainer["devices"] = chosen["devices"] if chosen["devices"] is not None else devices
    strategy = chosen["strategy"] or strategy
    if strategy is not None:
        trainer["strategy"] = strategy
    return trainer


def _many_processes(trainer: Mapping[str, Any]) -> bool:
    """Whether the trainer settings ask for more than one process."""
    devices = trainer.get("devices")
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    return (isinstance(count, int) and count > 1) or int(
        trainer.get("num_nodes") or 1
    ) > 1


def _world_size(trainer: Mapping[str, Any]) -> int | None:
    """The number of processes the trainer settings ask for; None if Lightning decides."""
    devices = trainer.get("devices")
    if isinstance(devices, (list, tuple)):
        count: int | None = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        count = None  # "auto", -1, "0", ...: Lightning decides
    nodes = trainer.get("num_nodes") or 1
    return count * nodes if count is not None and _is_int(nodes) else None


def _single_process(trainer: Mapping[str, Any]) -> bool:
    """Whether the trainer settings certainly run one process."""
    devices = trainer.get("devices")
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    strategy = str(trainer.get("strategy") or "")
    return (
        count == 1
        and int(trainer.get("num_nodes") or 1) == 1
        and not strategy.startswith("ddp")
    )


def _build_model(cfg: DictConfig) -> nn.Module:
    """lightly-ssl-train's model: ResNetGenerator backbone and ``_SimCLR`` head."""
    resnet = ResNetGenerator(cfg["model"]["name"], cfg["model"]["width"])
    last_conv_channels = list(resnet.children())[-1].in_features
    features = nn.Sequential(
        get_norm_layer(3, 0),
        *list(resnet.children())[:-1],
        nn.Conv2d(last_conv_channels, cfg["model"]["num_ftrs"], 1),
        nn.AdaptiveAvgPool2d(1),
    )
    model: nn.Module = _SimCLR(
        features, num_ftrs=cfg["model"]["num_ftrs"], out_dim=cfg["model"]["out_dim"]
    )
    return model


def _load_state_dict(cfg: DictConfig, is_cli_call: bool) -> dict[str, Tensor] | None:
    """lightly-ssl-train's checkpoint logic: ``checkpoint`` or the model zoo."""
    checkpoint = cfg["checkpoint"]
    if cfg["pre_trained"] and not checkpoint:
        checkpoint, key = get_ptmodel_from_config(cfg["model"])
        if not checkpoint:
            warnings.warn(
                f"Cannot download checkpoint for key {key} because it does not exist! "
                "Model will be trained from scratch.",
                stacklevel=3,
            )
    elif checkpoint:
        checkpoint = fix_input_path(checkpoint) if is_cli_call else checkpoint
    if not checkpoint:
        return None
    if is_url(checkpoint):
        state: dict[str, Tensor] | None = load_state_dict_from_url(
            checkpoint, map_location="cpu"
        )["state_dict"]
        return state
    loaded: dict[str, Tensor] = torch.load(checkpoint, map_location="cpu")["state_dict"]
    return loaded


def _verify_images(input_dir: str, filenames: Sequence[str]) -> None:
    """Opens every image with PIL and verifies it, so a bad file is named now.

    ``Image.open`` reads the header; ``verify`` walks the file's structure (for PNG
    every chunk and its CRC, which finds truncated and corrupt files) without decoding
    the pixels. JPEG data is not decoded: a JPEG with a valid header but corrupt
    scan data still passes.

    Raises:
        ValueError: Naming the first unreadable image (and how many there are).
    """
    bad: list[tuple[str, str]] = []
    for name in filenames:
        path = os.path.join(input_dir, name)
        if not path.lower().endswith(IMG_EXTENSIONS):  # videos: lightly's own reader
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many kinds for many formats
            bad.append((path, f"{type(err).__name__}: {err}"))
    if bad:
        path, reason = bad[0]
        more = (
            f" ({len(bad)} of {len(filenames)} images are unreadable)"
            if len(bad) > 1
            else ""
        )
        raise ValueError(
            f"the image {path} cannot be read{more}: {reason}. Remove or replace it "
            "(or set check_images=false to skip this check)."
        )


def _check_batches(
    cfg: DictConfig, criterion: Mapping[str, Any], count: int, world_size: int | None
) -> None:
    """Refuses batches that cannot be contrasted or that never fill.

    A contrastive loss contrasts each image with the others of its batch. With one
    image per batch the only candidate is the image's own other view: the loss is 0
    and nothing is learned (lightly-ssl-train trains on like that, printing a loss of
    0). A memory bank, or gathering over several processes, supplies the negatives.

    Raises:
        ValueError: Naming ``loader.batch_size`` (or the image count) and the reason.
    """
    if world_size is None:  # unknown yet: checked again once the trainer is built
        if criterion.get("gather_distributed"):
            return
        world_size = 1
    requested = int(cfg["loader"]["batch_size"])
    batch = min(requested, count)  # as lightly-ssl-train clamps it
    gathered = bool(criterion.get("gather_distributed")) and world_size > 1
    has_bank = bool(criterion.get("memory_bank_size"))
    if batch < 2 and not gathered and not has_bank:
        what = (
            f"loader.batch_size={requested}"
            if requested < 2
            else f"input_dir holds {count} image, so every batch has 1"
        )
        raise ValueError(
            f"{what}: a contrastive loss needs at least 2 images per batch (with 1, "
            "an image's only candidate is its own other view, the loss is 0 and "
            "nothing is learned). Use loader.batch_size >= 2 and at least 2 images, "
            "or a memory bank (criterion.memory_bank_size)."
        )
    per_process = math.ceil(count / world_size)
    if cfg["loader"]["drop_last"] and per_process < batch:
        raise ValueError(
            f"loader.batch_size={batch} is larger than the {per_process} images each of "
            f"the {world_size} processes gets ({count} images in input_dir): with "
            "loader.drop_last=true no batch is full and nothing would be trained. "
            f"Use loader.batch_size <= {per_process}."
        )


def _dry_run(
    cfg: DictConfig,
    criterion_cfg: Mapping[str, Any],
    dataset: LightlyDataset,
    collate_fn: Any,
    kind: str,
) -> None:
    """One forward pass of transform, model and loss on two images, before training.

    Catches what only shows when the pieces meet (an input size too small for the
    network, a transform value of the wrong type, ...). Runs under a forked torch RNG
    and before the run is seeded, so it changes no random stream.

    Raises:
        ValueError: Naming the config section whose piece failed.
    """
    stage = "collate"
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            transform = SimCLRTransform(**cfg["collate"])
            items = []
            for index in range(min(2, len(dataset))):
                image, label, name = dataset[index]
                items.append((transform(image), label, name))
            views, targets, _ = collate_fn(items)
            stage = "model"
            model = _build_model(cfg)
            model.train()
            out0, out1 = model(views[0], views[1])
            if len(items) < 2:
                return
            stage = "criterion"
            dry = dict(criterion_cfg, gather_distributed=None)
            loss = build_criterion(dry)
            loss(out0, out1) if kind == "none" else loss(out0, out1, targets)
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as err:
        raise ValueError(
            f"{stage}: a trial step on two images failed: {type(err).__name__}: {err}"
        ) from None


def _check_writable(dirpath: Any) -> None:
    """Checks that checkpoints can be written to ``checkpoint_callback.dirpath``.

    Lightning creates the folder only when it saves the first checkpoint, at the end
    of the first epoch; a folder that cannot be written would lose that epoch.

    Raises:
        ValueError: Naming the folder and the reason.
    """
    if dirpath is None or str(dirpath) == "":
        return
    folder = os.path.abspath(str(dirpath))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(
            f"checkpoint_callback.dirpath={dirpath}: checkpoints cannot be written "
            f"there: {err}."
        ) from None


@dataclass
class _Plan:
    """A checked config and everything built from it before training."""

    cfg: DictConfig
    criterion: dict[str, Any]
    input_dir: str
    dataset: LightlyDataset
    collate_fn: Any
    kind: str
    trainer: Trainer
    checkpoint_callback: Any
    state_dict: dict[str, Tensor] | None


def _prepare(cfg: DictConfig | Mapping[str, Any], is_cli_call: bool) -> _Plan:
    """Checks everything that can be checked before training and builds the trainer.

    Raises:
        ValueError, TypeError: For config errors (see :func:`train`).
    """
    cfg = _as_config(cfg)
    collate_fn, kind, input_dir, dataset = _check_and_list(cfg, is_cli_call)
    criterion_cfg = _criterion_config(cfg)
    # Lightning re-runs this script for the other DDP processes once the first one
    # has started training; their images were already checked by it.
    if cfg.get("check_images", True) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _verify_images(input_dir, dataset.get_filenames())

    trainer_kwargs = _trainer_kwargs(cfg)
    if _many_processes(trainer_kwargs) and not criterion_cfg.get("gather_distributed"):
        warnings.warn(
            "Training on several processes without criterion.gather_distributed=true: "
            "each process contrasts (and builds targets from) its own batch only.",
            stacklevel=3,
        )
    if criterion_cfg.get("gather_distributed") and _single_process(trainer_kwargs):
        # A multi-GPU config run on one device: nothing to gather (XCLRLoss would
        # otherwise ask for a process group that a single process does not start).
        warnings.warn(
            "criterion.gather_distributed=true has no effect in a single process; "
            "training without it.",
            stacklevel=3,
        )
        criterion_cfg["gather_distributed"] = None

    # Cheap checks first, so that their errors come before Lightning's start-up lines.
    _check_batches(cfg, criterion_cfg, len(dataset), _world_size(trainer_kwargs))
    try:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **cfg["optimizer"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"optimizer: {err} (optimizer.* is passed to torch.optim.SGD)"
        ) from None
    loader = {k: v for k, v in cfg["loader"].items() if k != "batch_size"}
    loader["num_workers"] = max(0, int(loader.get("num_workers") or 0))
    try:
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.zeros(2)), batch_size=2, **loader
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loader: {err} (loader.* is passed to torch.utils.data.DataLoader)"
        ) from None
    _dry_run(cfg, criterion_cfg, dataset, collate_fn, kind)
    # Loaded now (no random numbers involved) so that a missing file or an offline
    # model-zoo download is reported before training, not after the set-up.
    try:
        state_dict = _load_state_dict(cfg, is_cli_call)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        source = (
            f"checkpoint={cfg['checkpoint']}"
            if cfg["checkpoint"]
            else "pre_trained=true downloads them; pre_trained=false trains from scratch"
        )
        raise ValueError(
            f"checkpoint: cannot load the starting weights ({source}): "
            f"{type(err).__name__}: {err}"
        ) from None
    _check_writable(cfg["checkpoint_callback"].get("dirpath"))

    # lightly's SelfSupervisedEmbedding.train_embedding, with the trainer built now
    # (so that bad trainer.* settings are reported before training) and one more
    # callback.
    try:
        checkpoint_cb = callbacks.create_checkpoint_callback(
            **cfg["checkpoint_callback"]
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint_callback: {err}") from None
    trainer_callbacks: list[Callback] = [checkpoint_cb]
    summary_cb = callbacks.create_summary_callback(
        summary_callback_config=cfg["summary_callback"]
    )
    if summary_cb is not None:
        trainer_callbacks.append(summary_cb)
    trainer_callbacks.append(_StopOnNonFiniteLoss(str(criterion_cfg["name"])))
    try:
        trainer = Trainer(**trainer_kwargs, callbacks=trainer_callbacks)
    # Lightning raises TypeError, ValueError and MisconfigurationException here.
    except Exception as err:
        raise ValueError(f"trainer: {type(err).__name__}: {err}") from None
    # Now with the process count Lightning settled on (devices=auto, -1, ...).
    _check_batches(cfg, criterion_cfg, len(dataset), trainer.world_size)
    return _Plan(
        cfg,
        criterion_cfg,
        input_dir,
        dataset,
        collate_fn,
        kind,
        trainer,
        checkpoint_cb,
        state_dict,
    )


def _fit(plan: _Plan, is_cli_call: bool) -> TrainResult:
    """Trains a prepared plan, in the order of ``lightly.cli.train_cli._train_cli``."""
    cfg, criterion_cfg = plan.cfg, plan.criterion
    # From here on, the order of lightly.cli.train_cli._train_cli (same RNG use).
    if "seed" in cfg:
        seed = cfg["seed"]
        torch.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # lightly-ssl-train seeds torch only; its Gaussian blur and rotation draw from
        # numpy. Seeding numpy and random too makes runs repeatable and leaves torch's
        # random stream, and hence parity with lightly-ssl-train, unchanged.
        random.seed(seed)
        np.random.seed(seed)

    if cfg["loader"]["batch_size"] < 64:
        warnings.warn(
            f"Training a self-supervised model with a small batch size: "
            f"{cfg['loader']['batch_size']}! Small batch size may harm embedding quality. "
            "You can specify the batch size via the loader key-word: loader.batch_size=BSZ",
            stacklevel=3,
        )
    if cfg["loader"]["num_workers"] < 0:
        cfg["loader"]["num_workers"] = cpu_count()

    state_dict = plan.state_dict
    model = _build_model(cfg)
    if state_dict is not None:
        load_from_state_dict(model, state_dict)

    criterion = build_criterion(criterion_cfg)
    optimizer = torch.optim.SGD(model.parameters(), **cfg["optimizer"])
    dataset = plan.dataset  # already listed: only the transform is new
    dataset.transform = SimCLRTransform(**cfg["collate"])
    cfg["loader"]["batch_size"] = min(cfg["loader"]["batch_size"], len(dataset))
    dataloader = torch.utils.data.DataLoader(
        dataset, **cfg["loader"], collate_fn=plan.collate_fn
    )

    module_cls = SelfSupervisedEmbedding if plan.kind == "none" else TargetEmbedding
    encoder = module_cls(model, criterion, optimizer, dataloader)
    trainer = plan.trainer
    trainer.fit(encoder)
    best = plan.checkpoint_callback.best_model_path
    checkpoint = os.path.join(encoder.cwd, best) if best else ""
    encoder.checkpoint = checkpoint or None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        if checkpoint:
            print(f"Best model is stored at: {checkpoint}")
        else:
            print(
                "No checkpoint was written (checkpoint_callback.save_last=false and "
                "save_top_k=0, or no training step ran)."
            )
        if "loss" in metrics:
            print(
                f"Final training loss ({criterion_cfg['name']}): {metrics['loss']:.6f}"
            )
    os.environ[cfg["environment_variable_names"]["lightly_last_checkpoint_path"]] = (
        checkpoint
    )
    return TrainResult(checkpoint, metrics, str(criterion_cfg["name"]))


def train(
    cfg: DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> TrainResult:
    """Trains like ``lightly-ssl-train``, with the loss named by ``criterion.name``.

    The steps and their order are those of ``lightly.cli.train_cli._train_cli``
    (seed, model, criterion, SGD, ``SimCLRTransform`` + ``LightlyDataset``, loader,
    ``SelfSupervisedEmbedding.train_embedding``), so with ``criterion.name=ntxent``
    the losses equal ``lightly-ssl-train``'s step for step. Before any of that, the
    config is checked and the Lightning trainer is built (see the module docstring).

    Args:
        cfg: The config (see :func:`load_config`); a plain nested mapping is merged
            onto the defaults.
        is_cli_call: Resolve relative paths against hydra's original working directory.

    Returns:
        The checkpoint path (empty if none was written) and final metrics.

    Raises:
        ValueError: For config errors, before training (see :func:`prepare_targets`;
            also bad trainer, optimizer, collate and model settings, unreadable
            images, batches that cannot be contrasted).
        TypeError: For a ``criterion.*`` key the loss does not take.
        NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    return _fit(_prepare(cfg, is_cli_call), is_cli_call)


def _one_line(err: BaseException) -> str:
    """An error message on one line (some messages, e.g. torchvision's, span several)."""
    return " ".join(str(err).split())


def _run(cfg: DictConfig) -> None:
    """The hydra task of ``xclr-train``: config errors are one line and status 2."""
    try:
        plan = _prepare(cfg, is_cli_call=True)
    except (ValueError, TypeError) as err:
        print(f"xclr-train: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    try:
        _fit(plan, is_cli_call=True)
    except NonFiniteLossError as err:
        print(f"xclr-train: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(1)


# An absolute config path: a file-based config source, which needs no __init__.py in
# the config folder.
_hydra_main = hydra.main(
    **fix_hydra_arguments(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
)(_run)


def main() -> None:
    """Console entry ``xclr-train``: ``lightly-ssl-train`` plus ``criterion.name``.

    Examples:
        >>> # exactly lightly-ssl-train (NT-Xent)
        >>> xclr-train input_dir=images/ pre_trained=False
        >>> # X-CLR with a filename,caption sidecar images/captions.csv
        >>> xclr-train input_dir=images/ criterion.name=xclr
        >>> # SupCon on class folders, two CPU processes
        >>> xclr-train input_dir=train/ criterion.name=supcon trainer.accelerator=cpu \\
        ...     trainer.devices=2 trainer.strategy=ddp criterion.gather_distributed=true
    """
    _hydra_main()


if __name__ == "__main__":
    main()
