"""A run of ``xclr-train``: checked and built before training, then lightly's fit.

:func:`prepare` builds each piece once, in the order of
``lightly.cli.train_cli._train_cli`` (seed, model, criterion, SGD, transform, loader,
``SelfSupervisedEmbedding``, trainer), so the random stream is lightly-ssl-train's;
the checks run in between, cheap ones first and the trainer (which logs) last.
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightly.cli._helpers import (
    cpu_count,
    get_ptmodel_from_config,
    is_url,
    load_from_state_dict,
    load_state_dict_from_url,
)
from lightly.embedding import SelfSupervisedEmbedding, callbacks
from lightly.transforms import SimCLRTransform
from omegaconf import DictConfig
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from xclr_plugin.integrations.lightly_train import config as conf
from xclr_plugin.integrations.lightly_train.images import list_images, verify_images
from xclr_plugin.integrations.lightly_train.modules import (
    StopOnNonFiniteLoss,
    TargetEmbedding,
    build_model,
)
from xclr_plugin.integrations.lightly_train.targets import check_loss, make_targets
from xclr_plugin.registry import create_loss

__all__ = ["Plan", "TrainResult", "check_batches", "fit", "prepare", "train"]


@dataclass
class TrainResult:
    """The best (with lightly's defaults: the last) checkpoint, empty if none was
    written; the trainer's final logged metrics (``{"loss": 4.1}``); the loss name."""

    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    loss_name: str = "ntxent"


@dataclass
class Plan:
    """A checked config and the module and trainer built from it, ready to fit."""

    config: conf.TrainConfig
    module: SelfSupervisedEmbedding
    trainer: Trainer
    checkpoint_callback: ModelCheckpoint


@contextmanager
def _section(
    name: str, hint: str = "", errors: Any = (TypeError, ValueError)
) -> Iterator[None]:
    """Reports a failure to build a config section's piece as a config error."""
    try:
        yield
    except errors as err:
        kind = "" if isinstance(err, (TypeError, ValueError)) else type(err).__name__
        raise ValueError(f"{name}: {kind + ': ' if kind else ''}{err}{hint}") from None


def check_batches(
    loader: conf.LoaderConfig,
    criterion: conf.CriterionConfig,
    count: int,
    world_size: int | None,
) -> None:
    """Refuses batches that cannot be contrasted or never fill (``world_size=None``:
    not known yet, checked again once the trainer is built)."""
    gather = bool(criterion.gather_distributed)
    if world_size is None and gather:
        return
    world_size = world_size or 1
    batch = min(loader.batch_size, count)  # as lightly-ssl-train clamps it
    if batch < 2 and not (gather and world_size > 1) and not criterion.memory_bank_size:
        what = (
            f"loader.batch_size={loader.batch_size}"
            if loader.batch_size < 2
            else f"input_dir holds {count} image, so every batch has 1"
        )
        raise ValueError(
            f"{what}: a contrastive loss needs at least 2 images per batch (with 1, "
            "an image's only candidate is its own other view, the loss is 0 and "
            "nothing is learned). Use loader.batch_size >= 2 and at least 2 images, "
            "or a memory bank (criterion.memory_bank_size)."
        )
    per_process = math.ceil(count / world_size)
    if loader.drop_last and per_process < batch:
        raise ValueError(
            f"loader.batch_size={batch} is larger than the {per_process} images each of "
            f"the {world_size} processes gets ({count} images in input_dir): with "
            "loader.drop_last=true no batch is full and nothing would be trained. "
            f"Use loader.batch_size <= {per_process}."
        )


def _check_writable(dirpath: str | None) -> None:
    """Lightning writes the first checkpoint after an epoch: check the folder now."""
    try:
        if dirpath:
            os.makedirs(dirpath, exist_ok=True)
            tempfile.TemporaryFile(dir=dirpath).close()
    except OSError as err:
        raise ValueError(
            f"checkpoint_callback.dirpath={dirpath}: checkpoints cannot be written "
            f"there: {err}."
        ) from None


def _state_dict(config: conf.TrainConfig) -> dict[str, Any] | None:
    """lightly-ssl-train's starting weights: ``checkpoint``, or the model zoo's."""
    checkpoint = config.checkpoint
    if config.pre_trained and not checkpoint:
        checkpoint, key = get_ptmodel_from_config(config.model.kwargs())
        if not checkpoint:
            warnings.warn(
                f"Cannot download checkpoint for key {key} because it does not exist! "
                "Model will be trained from scratch.",
                stacklevel=3,
            )
    if not checkpoint:
        return None
    load = load_state_dict_from_url if is_url(checkpoint) else torch.load
    try:
        return load(checkpoint, map_location="cpu")["state_dict"]  # type: ignore[no-any-return]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
        source = (
            f"checkpoint={checkpoint}"
            if config.checkpoint
            else "pre_trained=true downloads them; pre_trained=false trains from scratch"
        )
        raise ValueError(
            f"checkpoint: cannot load the starting weights ({source}): "
            f"{type(err).__name__}: {err}"
        ) from None


def _trial_step(
    config: conf.TrainConfig, module: SelfSupervisedEmbedding, kind: str
) -> None:
    """One forward pass of transform, model and loss on two images, on copies (the
    model's batch-norm statistics and a loss's memory bank stay as built); finds what
    only shows when the pieces meet, e.g. an input size too small for the network."""
    stage, dataset = "collate", module.dataloader.dataset
    try:
        with torch.no_grad():
            transform = SimCLRTransform(**config.collate.kwargs())
            items = []
            for index in range(min(2, len(dataset))):
                image, label, name = dataset[index]
                items.append((transform(image), label, name))
            views, targets, _ = module.dataloader.collate_fn(items)
            stage = "model"
            out = copy.deepcopy(module.model).train()(views[0], views[1])
            stage = "criterion"
            if len(items) == 2:
                loss = copy.deepcopy(module.criterion)
                loss(*out) if kind == "none" else loss(*out, targets)
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as err:
        raise ValueError(
            f"{stage}: a trial step on two images failed: {type(err).__name__}: {err}"
        ) from None


def _settle_gather(config: conf.TrainConfig) -> int | None:
    """The process count asked for; drops ``criterion.gather_distributed`` (with a
    warning) where it cannot gather, warns where it is missing."""
    criterion, world_size = config.criterion, config.trainer.world_size()
    ddp = str(config.trainer.kwargs().get("strategy", "")).startswith("ddp")
    if criterion.gather_distributed and world_size == 1 and not ddp:
        warnings.warn(
            "criterion.gather_distributed=true has no effect in a single process; "
            "training without it.",
            stacklevel=4,
        )
        criterion.gather_distributed = None
    elif not criterion.gather_distributed and (world_size or 1) > 1:
        warnings.warn(
            "Training on several processes without criterion.gather_distributed=true: "
            "each process contrasts (and builds targets from) its own batch only.",
            stacklevel=4,
        )
    return world_size


def prepare(
    cfg: conf.TrainConfig | DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> Plan:
    """Checks all that can be checked before training, and builds the run (see
    :func:`train` for the arguments and errors)."""
    config = conf.parse_config(cfg, is_cli_call=is_cli_call)
    spec = check_loss(config.criterion)
    world_size = _settle_gather(config)
    dataset = list_images(config.input_dir)
    # Lightning re-runs this script for the other DDP processes: one check suffices.
    if config.check_images and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        verify_images(str(config.input_dir), dataset.get_filenames())
    check_batches(config.loader, config.criterion, len(dataset), world_size)
    _check_writable(config.checkpoint_callback.dirpath)
    state_dict = _state_dict(config)

    torch.manual_seed(config.seed)
    torch.cuda.manual_seed(config.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if config.loader.batch_size < 64:
        warnings.warn(
            "Training a self-supervised model with a small batch size: "
            f"{config.loader.batch_size}! Small batch size may harm embedding quality. "
            "You can specify the batch size via the loader key-word: loader.batch_size=BSZ",
            stacklevel=3,
        )
    with _section("model"):
        model = build_model(config.model)
    if state_dict is not None:
        load_from_state_dict(model, state_dict)
    with _section("criterion"):
        criterion = create_loss(spec.name, **config.criterion.loss_kwargs())
    with _section("optimizer", " (optimizer.* is passed to torch.optim.SGD)"):
        optimizer = torch.optim.SGD(model.parameters(), **config.optimizer.kwargs())
    loader = config.loader.kwargs()
    loader["batch_size"] = min(loader["batch_size"], len(dataset))
    if loader["num_workers"] < 0:
        loader["num_workers"] = cpu_count()
    # The caption encoder and the trial step must not move torch's random stream.
    with torch.random.fork_rng(devices=[]):
        collate_fn, kind = make_targets(config, spec, dataset)
        with _section("loader", " (loader.* is passed to torch.utils.data.DataLoader)"):
            dataloader = torch.utils.data.DataLoader(
                dataset, **loader, collate_fn=collate_fn
            )
        module_cls = SelfSupervisedEmbedding if kind == "none" else TargetEmbedding
        module = module_cls(model, criterion, optimizer, dataloader)
        _trial_step(config, module, kind)
    # lightly-ssl-train seeds torch only; its blur and rotation draw from numpy, so
    # numpy and random are seeded too (after the trial step, which draws from them).
    random.seed(config.seed)
    np.random.seed(config.seed)
    dataset.transform = SimCLRTransform(**config.collate.kwargs())

    # lightly's SelfSupervisedEmbedding.train_embedding, with one more callback.
    with _section("checkpoint_callback"):
        checkpoint_cb = callbacks.create_checkpoint_callback(
            **config.checkpoint_callback.kwargs()
        )
    summary_cb = callbacks.create_summary_callback(config.summary_callback.kwargs())
    with _section("trainer", errors=Exception):  # also MisconfigurationException
        trainer = Trainer(
            **config.trainer.kwargs(),
            callbacks=[checkpoint_cb, summary_cb, StopOnNonFiniteLoss(spec.name)],
        )
    # Now with the process count Lightning settled on (devices=auto, -1, ...).
    check_batches(config.loader, config.criterion, len(dataset), trainer.world_size)
    return Plan(config, module, trainer, checkpoint_cb)


def fit(plan: Plan) -> TrainResult:
    """Trains a prepared run; reports its checkpoint as lightly-ssl-train does."""
    trainer, module = plan.trainer, plan.module
    trainer.fit(module)
    best = plan.checkpoint_callback.best_model_path
    checkpoint = os.path.join(module.cwd, best) if best else ""
    module.checkpoint = checkpoint or None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    name = plan.config.criterion.name
    if trainer.is_global_zero:
        print(
            f"Best model is stored at: {checkpoint}"
            if checkpoint
            else "No checkpoint was written (checkpoint_callback.save_last=false and "
            "save_top_k=0, or no training step ran)."
        )
        if "loss" in metrics:
            print(f"Final training loss ({name}): {metrics['loss']:.6f}")
    env = plan.config.environment_variable_names["lightly_last_checkpoint_path"]
    os.environ[env] = checkpoint
    return TrainResult(checkpoint, metrics, name)


def train(
    cfg: conf.TrainConfig | DictConfig | Mapping[str, Any], *, is_cli_call: bool = False
) -> TrainResult:
    """Trains like ``lightly-ssl-train``, with the loss named by ``criterion.name``.

    ``cfg`` is a config of :func:`load_config` (a plain nested mapping is merged onto
    the defaults); ``is_cli_call`` resolves relative paths as the command does.

    Raises:
        ValueError: For config errors, before training (TypeError for a
            ``criterion.*`` key the loss does not take).
        xclr_plugin.errors.NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    return fit(prepare(cfg, is_cli_call=is_cli_call))
