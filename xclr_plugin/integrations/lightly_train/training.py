"""A run of ``xclr-train``: :func:`prepare` checks and builds it in lightly-ssl-train's
order (so the random stream is the same), the trainer (which logs) last; then fit."""

import copy
import math
import os
import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightly.cli import _helpers as lightly_cli
from lightly.cli._cli_simclr import _SimCLR
from lightly.embedding import SelfSupervisedEmbedding, callbacks
from lightly.models import ResNetGenerator
from lightly.models.batchnorm import get_norm_layer
from lightly.transforms import SimCLRTransform
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xclr_plugin.errors import NonFiniteLossError
from xclr_plugin.integrations.lightly_train import config as conf
from xclr_plugin.integrations.lightly_train.targets import (
    check_loss,
    list_images,
    make_targets,
    verify_images,
)
from xclr_plugin.registry import create_loss


def build_model(model: conf.ModelConfig) -> nn.Module:
    """lightly-ssl-train's model: ``ResNetGenerator`` backbone and ``_SimCLR`` head."""
    *body, last = ResNetGenerator(model.name, model.width).children()
    features = nn.Sequential(
        get_norm_layer(3, 0),
        *body,
        nn.Conv2d(last.in_features, model.num_ftrs, 1),
        nn.AdaptiveAvgPool2d(1),
    )
    return _SimCLR(features, num_ftrs=model.num_ftrs, out_dim=model.out_dim)  # type: ignore[no-any-return]


class TargetEmbedding(SelfSupervisedEmbedding):  # type: ignore[misc]
    """lightly's ``SelfSupervisedEmbedding``; its loss gets ``(out0, out1, targets)``."""

    def training_step(self, batch: tuple[Any, Tensor, Any], batch_idx: int) -> Tensor:
        (x0, x1), targets, _ = batch
        loss: Tensor = self.criterion(*self(x0, x1), targets)
        # Each process's loss covers its own anchors; their mean is the global batch's.
        self.log("loss", loss, sync_dist=True)
        return loss


class StopOnNonFiniteLoss(Callback):  # type: ignore[misc]
    """Stops on a NaN or infinite loss before the backward pass (earlier checkpoints
    stay finite); under DDP all processes stop, instead of the others hanging."""

    def __init__(self, loss_name: str) -> None:
        self.loss_name = loss_name

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = str(loss.detach().float().flatten()[0].item())
            raise NonFiniteLossError(
                f"the {self.loss_name} loss is "
                f"{'non-finite on another process' if finite else value} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; training stopped "
                "before this step's update (checkpoints of earlier epochs are kept). "
                "Usual causes: a too high optimizer.lr, a too low "
                "criterion.temperature, or non-finite caption embeddings."
            )


@dataclass
class TrainResult:
    """The best (lightly's default: last) checkpoint or "", final metrics, loss name."""

    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    loss_name: str = "ntxent"


#: A checked config and the module and trainer built from it, ready to fit.
Plan = tuple[conf.TrainConfig, SelfSupervisedEmbedding, Trainer]


@contextmanager
def _section(key: str, hint: str = "", *errors: type[Exception]) -> Iterator[None]:
    """Re-raises ``errors``, TypeError and ValueError as a config error of ``key``."""
    caught: tuple[type[Exception], ...] = (*errors, TypeError, ValueError)
    try:
        yield
    except caught as err:
        kind = "" if isinstance(err, (TypeError, ValueError)) else type(err).__name__
        raise ValueError(f"{key}: {kind}{': ' if kind else ''}{err}{hint}") from None


def check_batches(config: conf.TrainConfig, count: int, world: int | None) -> None:
    """Refuses batches that cannot be contrasted or never fill on ``world`` processes
    (None: not known yet, checked again once the trainer is built)."""
    loader, criterion = config.loader, config.criterion
    gather = bool(criterion.gather_distributed)
    if world is None and gather:
        return
    world, batch = world or 1, min(loader.batch_size, count)  # clamped as lightly does
    if batch < 2 and not ((gather and world > 1) or criterion.memory_bank_size):
        what = f"input_dir holds {count} image, so every batch has 1"
        if loader.batch_size < 2:
            what = f"loader.batch_size={loader.batch_size}"
        raise ValueError(
            f"{what}: a contrastive loss needs at least 2 images per batch (with 1, "
            "an image's only candidate is its own other view, the loss is 0 and "
            "nothing is learned). Use loader.batch_size >= 2 and at least 2 images, "
            "or a memory bank (criterion.memory_bank_size)."
        )
    if loader.drop_last and (per_process := math.ceil(count / world)) < batch:
        raise ValueError(
            f"loader.batch_size={batch} is larger than the {per_process} images each of "
            f"the {world} processes gets ({count} images in input_dir): with "
            "loader.drop_last=true no batch is full and nothing would be trained. "
            f"Use loader.batch_size <= {per_process}."
        )


def _state_dict(config: conf.TrainConfig) -> dict[str, Any] | None:
    """lightly-ssl-train's starting weights: ``checkpoint``, or the model zoo's."""
    checkpoint, source = config.checkpoint, f"checkpoint={config.checkpoint}"
    if config.pre_trained and not checkpoint:
        checkpoint, key = lightly_cli.get_ptmodel_from_config(config.model.kwargs())
        source = "pre_trained=true downloads them (pre_trained=false: from scratch)"
        if not checkpoint:
            warnings.warn(
                f"Cannot download checkpoint for key {key} because it does not exist! "
                "Model will be trained from scratch.",
                stacklevel=3,
            )
    if not checkpoint:
        return None
    url = lightly_cli.is_url(checkpoint)
    load = lightly_cli.load_state_dict_from_url if url else torch.load
    hint = f" (cannot load the starting weights: {source})"
    with _section("checkpoint", hint, OSError, RuntimeError, KeyError):
        state: dict[str, Any] = load(checkpoint, map_location="cpu")["state_dict"]
    return state


def _trial_step(config: conf.TrainConfig, module: SelfSupervisedEmbedding) -> None:
    """Sets the transform, runs it, a copy of the model and of the loss on two images:
    finds what only shows when the pieces meet, e.g. too small an input size."""
    stage, loader = "collate", module.dataloader
    try:
        with torch.no_grad():
            loader.dataset.transform = SimCLRTransform(**config.collate.kwargs())
            items = [loader.dataset[i] for i in range(min(2, len(loader.dataset)))]
            views, targets, _ = loader.collate_fn(items)
            stage = "model"
            out = copy.deepcopy(module.model).train()(views[0], views[1])
            stage = "criterion"
            if len(items) == 2:
                extra = [targets] if isinstance(module, TargetEmbedding) else []
                copy.deepcopy(module.criterion)(*out, *extra)
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as err:
        raise ValueError(
            f"{stage}: a trial step on two images failed: {type(err).__name__}: {err}"
        ) from None


def _settle_gather(config: conf.TrainConfig) -> int | None:
    """The process count asked for; warns where gathering is missing or useless."""
    criterion, world = config.criterion, config.trainer.world_size()
    ddp = str(config.trainer.kwargs()["strategy"]).startswith("ddp")
    if criterion.gather_distributed and world == 1 and not ddp:
        criterion.gather_distributed = None
        warnings.warn(
            "criterion.gather_distributed=true has no effect in a single process; "
            "training without it.",
            stacklevel=4,
        )
    elif not criterion.gather_distributed and (world or 1) > 1:
        warnings.warn(
            "Training on several processes without criterion.gather_distributed=true: "
            "each process contrasts (and builds targets from) its own batch only.",
            stacklevel=4,
        )
    return world


def prepare(cfg: conf.AnyConfig, *, is_cli_call: bool = False) -> Plan:
    """Checks all that can be checked before training and builds the run."""
    config = conf.parse_config(cfg, is_cli_call=is_cli_call)
    spec = check_loss(config.criterion)
    world = _settle_gather(config)
    dataset = list_images(config.input_dir)
    # Lightning re-runs this script for the other DDP processes: one check suffices.
    if config.check_images and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        verify_images(str(config.input_dir), dataset.get_filenames())
    check_batches(config, len(dataset), world)
    if dirpath := config.checkpoint_callback.dirpath:  # Lightning writes it only later
        hint = " (checkpoints cannot be written there)"
        with _section(f"checkpoint_callback.dirpath={dirpath}", hint, OSError):
            os.makedirs(dirpath, exist_ok=True)
            tempfile.TemporaryFile(dir=dirpath).close()
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
        try:
            lightly_cli.load_from_state_dict(model, state_dict)
        except (RuntimeError, KeyError) as err:  # another model's weights
            where = (
                f"checkpoint={config.checkpoint}"
                if config.checkpoint
                else "pre_trained=true"
            )
            why = " ".join(str(err).split())
            raise ValueError(
                f"{where}: the weights do not fit the model of model.* "
                f"({config.model.kwargs()}); pass the model.* keys they were trained "
                f"with. {why[:300]}{'...' if len(why) > 300 else ''}"
            ) from None
    with _section("criterion"):
        criterion = create_loss(spec.name, **config.criterion.loss_kwargs())
    with _section("optimizer", " (optimizer.* is passed to torch.optim.SGD)"):
        optimizer = torch.optim.SGD(model.parameters(), **config.optimizer.kwargs())
    loader = config.loader.kwargs()
    loader["batch_size"] = min(loader["batch_size"], len(dataset))
    if loader["num_workers"] < 0:
        loader["num_workers"] = lightly_cli.cpu_count()
    # The caption encoder and the trial step must not move torch's random stream.
    with torch.random.fork_rng(devices=[]):
        collate_fn, kind = make_targets(config, spec, dataset)
        with _section("loader", " (loader.* is passed to torch.utils.data.DataLoader)"):
            dataloader = DataLoader(dataset, **loader, collate_fn=collate_fn)
        module_cls = SelfSupervisedEmbedding if kind == "none" else TargetEmbedding
        module = module_cls(model, criterion, optimizer, dataloader)
        _trial_step(config, module)
    # lightly-ssl-train seeds torch only; its blur and rotation draw from numpy, so
    # numpy and random are seeded too (after the trial step, which draws from them).
    random.seed(config.seed)
    np.random.seed(config.seed)

    # lightly's SelfSupervisedEmbedding.train_embedding, with one more callback.
    with _section("checkpoint_callback"):
        ckpt = callbacks.create_checkpoint_callback(
            **config.checkpoint_callback.kwargs()
        )
    summary = callbacks.create_summary_callback(config.summary_callback.kwargs())
    with _section("trainer", "", Exception):  # also MisconfigurationException
        stop = StopOnNonFiniteLoss(spec.name)
        trainer = Trainer(**config.trainer.kwargs(), callbacks=[ckpt, summary, stop])
    # Now with the process count Lightning settled on (devices=auto, -1, ...).
    check_batches(config, len(dataset), trainer.world_size)
    return config, module, trainer


def fit(plan: Plan) -> TrainResult:
    """Trains a prepared run; reports its checkpoint as lightly-ssl-train does."""
    config, module, trainer = plan
    trainer.fit(module)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    checkpoint = os.path.join(module.cwd, best) if best else ""
    module.checkpoint = checkpoint or None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    name = config.criterion.name
    if trainer.is_global_zero:
        print(
            f"Best model is stored at: {checkpoint}"
            if checkpoint
            else "No checkpoint was written (checkpoint_callback.save_last=false and "
            "save_top_k=0, or no training step ran)."
        )
        if "loss" in metrics:
            print(f"Final training loss ({name}): {metrics['loss']:.6f}")
    env = config.environment_variable_names["lightly_last_checkpoint_path"]
    os.environ[env] = checkpoint
    return TrainResult(checkpoint, metrics, name)


def train(cfg: conf.AnyConfig, *, is_cli_call: bool = False) -> TrainResult:
    """Trains like ``lightly-ssl-train`` with the loss ``criterion.name``, from a config
    of :func:`load_config` (or a nested mapping merged onto the defaults). Raises
    ValueError for config errors before training (TypeError for a ``criterion.*`` key
    the loss does not take), NonFiniteLossError if the loss becomes NaN or infinite."""
    return fit(prepare(cfg, is_cli_call=is_cli_call))
