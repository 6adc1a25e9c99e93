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

Everything that can be wrong with the config (loss name and arguments, caption source,
captions that do not cover the images, missing class folders) raises before the model
is built.

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
import os
import random
import warnings
from collections.abc import Mapping, Sequence
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
from lightly.embedding import SelfSupervisedEmbedding
from lightly.models import ResNetGenerator
from lightly.models.batchnorm import get_norm_layer
from lightly.transforms import SimCLRTransform
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from xclr_plugin.registry import LossSpec, build_criterion, loss_info

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
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

        Args:
            batch: ``(views, targets, filenames)``; the first two views are used.
            batch_idx: Index of the batch.

        Returns:
            The loss.
        """
        (x0, x1), targets, _ = batch
        y0, y1 = self(x0, x1)
        loss: Tensor = self.criterion(y0, y1, targets)
        self.log("loss", loss)
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
        ValueError: For an unknown loss name, an image-text loss, bad loss arguments
            (``TypeError``), a missing captions source, captions that do not cover the
            images, or a folder without at least two class subfolders for label losses.
    """
    config = _as_config(cfg)
    criterion = _criterion_config(config)
    spec = loss_info(str(criterion["name"]))
    _check_two_view(spec)
    build_criterion(criterion)  # checks the arguments now (the real one is built later)
    input_dir = _path(config.get("input_dir"), is_cli_call)
    if input_dir is None:
        raise ValueError("input_dir is not set: pass input_dir=<image folder>.")
    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir {input_dir!r} is not a folder.")
    if spec.targets == "none":
        return MultiViewCollate(), "none"

    from xclr_plugin.data import XCLRCollate

    dataset = LightlyDataset(input_dir)
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

    from xclr_plugin.cache import CaptionTable, build_caption_cache
    from xclr_plugin.text import TextEncoder

    cache_dir = _path(captions.get("cache_dir"), is_cli_call)
    encoder_name = captions.get("encoder")
    lookup: Any = None
    if cache_dir is not None:
        # A finished cache of these captions is used without loading the encoder (so
        # DDP workers and repeated runs start at once).
        lookup = _open_finished_cache(cache_dir, records, encoder_name)
    if lookup is None:
        encoder = TextEncoder(
            encoder_name,
            device=str(captions.get("device") or "cpu"),
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
    return XCLRCollate(lookup), "captions"


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


def train(
    cfg: DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> TrainResult:
    """Trains like ``lightly-ssl-train``, with the loss named by ``criterion.name``.

    The steps and their order are those of ``lightly.cli.train_cli._train_cli``
    (seed, model, criterion, SGD, ``SimCLRTransform`` + ``LightlyDataset``, loader,
    ``SelfSupervisedEmbedding.train_embedding``), so with ``criterion.name=ntxent``
    the losses equal ``lightly-ssl-train``'s step for step. Config errors are raised
    before the model is built.

    Args:
        cfg: The config (see :func:`load_config`); a plain nested mapping is merged
            onto the defaults.
        is_cli_call: Resolve relative paths against hydra's original working directory.

    Returns:
        The checkpoint path and final metrics.

    Raises:
        ValueError: For config errors (see :func:`prepare_targets`).
    """
    cfg = _as_config(cfg)
    collate_fn, kind = prepare_targets(cfg, is_cli_call=is_cli_call)
    criterion_cfg = _criterion_config(cfg)
    input_dir = _path(cfg["input_dir"], is_cli_call)
    trainer_kwargs = _trainer_kwargs(cfg)
    if _many_processes(trainer_kwargs) and not criterion_cfg.get("gather_distributed"):
        warnings.warn(
            "Training on several processes without criterion.gather_distributed=true: "
            "each process contrasts (and builds targets from) its own batch only.",
            stacklevel=2,
        )
    if criterion_cfg.get("gather_distributed") and _single_process(trainer_kwargs):
        # A multi-GPU config run on one device: nothing to gather (XCLRLoss would
        # otherwise ask for a process group that a single process does not start).
        warnings.warn(
            "criterion.gather_distributed=true has no effect in a single process; "
            "training without it.",
            stacklevel=2,
        )
        criterion_cfg["gather_distributed"] = None

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
            stacklevel=2,
        )
    if cfg["loader"]["num_workers"] < 0:
        cfg["loader"]["num_workers"] = cpu_count()

    state_dict = _load_state_dict(cfg, is_cli_call)
    model = _build_model(cfg)
    if state_dict is not None:
        load_from_state_dict(model, state_dict)

    criterion = build_criterion(criterion_cfg)
    optimizer = torch.optim.SGD(model.parameters(), **cfg["optimizer"])
    dataset = LightlyDataset(input_dir, transform=SimCLRTransform(**cfg["collate"]))
    cfg["loader"]["batch_size"] = min(cfg["loader"]["batch_size"], len(dataset))
    dataloader = torch.utils.data.DataLoader(
        dataset, **cfg["loader"], collate_fn=collate_fn
    )

    module_cls = SelfSupervisedEmbedding if kind == "none" else TargetEmbedding
    encoder = module_cls(model, criterion, optimizer, dataloader)
    trainer = encoder.train_embedding(
        trainer_config=OmegaConf.create(trainer_kwargs),
        checkpoint_callback_config=cfg["checkpoint_callback"],
        summary_callback_config=cfg["summary_callback"],
    )
    checkpoint = encoder.checkpoint or ""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"Best model is stored at: {checkpoint}")
        if "loss" in metrics:
            print(
                f"Final training loss ({criterion_cfg['name']}): {metrics['loss']:.6f}"
            )
    os.environ[cfg["environment_variable_names"]["lightly_last_checkpoint_path"]] = (
        checkpoint
    )
    return TrainResult(checkpoint, metrics, str(criterion_cfg["name"]))


def _run(cfg: DictConfig) -> None:
    """The hydra task of ``xclr-train``."""
    train(cfg, is_cli_call=True)


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
