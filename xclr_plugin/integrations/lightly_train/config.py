"""The ``xclr-train`` config, typed (an OmegaConf structured config) and checked once;
keys a section does not declare go to its ``extra`` and are passed on with it."""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from lightly.cli._helpers import fix_input_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).parent
CONFIG_NAME = "xclr_train"
#: Paths: empty means None; relative to the caller's folder on the command line.
_PATHS = {"input_dir", "checkpoint", "captions.source", "captions.cache_dir"}
_EPOCHS = ">= 1, or -1 for no limit"
_NO_EPOCHS = f"{_EPOCHS} (0 trains nothing and writes no checkpoint)"


def _rule(default: Any, test: Callable[[Any], bool], expected: str) -> Any:
    """A field whose value (unless None) must pass ``test``."""
    return field(default=default, metadata={"rule": (test, expected)})


def _at_least(low: int, default: Any) -> Any:
    return _rule(default, lambda v: v >= low, f">= {low}")


def _one_of(options: Sequence[str], default: str) -> Any:
    return _rule(default, lambda v: v in options, f"one of {list(options)}")


def _is_bank(v: Any) -> bool:
    ints = [v] if isinstance(v, int) else v if isinstance(v, list) else [None]
    ok = all(type(i) is int for i in ints)
    return ok and (ints == [0] or (len(ints) == 2 and min(ints) > 0))


@dataclass
class Section:
    """A config section; ``extra`` holds the keys it does not declare."""

    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """The section as keyword arguments: its fields, then the extra keys."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**own, **self.extra}


@dataclass
class ModelConfig(Section):
    name: str = _one_of([f"resnet-{n}" for n in (9, 18, 34, 50, 101, 152)], "resnet-18")
    width: float = _rule(1.0, lambda v: v > 0, "> 0")
    num_ftrs: int = _at_least(1, 32)
    out_dim: int = _at_least(1, 128)


@dataclass
class CriterionConfig(Section):
    """The loss name; every other key is a loss argument (None: the loss's default)."""

    name: str = "ntxent"
    temperature: float | None = None
    target_temperature: float | None = None
    gather_distributed: bool | None = None
    memory_bank_size: Any = field(
        default=None, metadata={"rule": (_is_bank, "0 or [num_entries, out_dim]")}
    )

    def loss_kwargs(self) -> dict[str, Any]:
        """Every key but ``name`` that is not None."""
        return {k: v for k, v in self.kwargs().items() if k != "name" and v is not None}


@dataclass
class OptimizerConfig(Section):
    lr: float = _at_least(0, 1.0)
    weight_decay: float = _at_least(0, 1e-5)


@dataclass
class CollateConfig(Section):
    input_size: int = _at_least(1, 64)


@dataclass
class LoaderConfig(Section):
    batch_size: int = _at_least(1, 16)
    shuffle: bool = True
    num_workers: int = -1  # -1: one per CPU core
    drop_last: bool = True


@dataclass
class TrainerConfig(Section):
    """Lightning ``Trainer`` arguments; ``gpus`` as lightly-ssl-train reads it."""

    gpus: int | None = _at_least(0, None)
    max_epochs: int | None = _rule(None, lambda v: v >= 1 or v == -1, _NO_EPOCHS)
    max_steps: int = _rule(-1, lambda v: v >= 1 or v == -1, _EPOCHS)
    accelerator: str | None = None
    devices: Any = None
    strategy: str | None = None
    num_nodes: int = _at_least(1, 1)

    def kwargs(self) -> dict[str, Any]:
        """lightly-ssl-train's choice (GPU if any, DDP over ``gpus``) unless set."""
        kwargs = super().kwargs()
        gpu, gpus = torch.cuda.is_available(), kwargs.pop("gpus") or 1
        many = gpu and gpus > 1
        kwargs["accelerator"] = self.accelerator or ("gpu" if gpu else "cpu")
        if self.devices is None:
            kwargs["devices"] = gpus if many else 1
        kwargs["strategy"] = self.strategy or ("ddp" if many else "auto")
        return kwargs

    def world_size(self) -> int | None:
        """The number of processes asked for; None where Lightning decides (auto, -1)."""
        devices = self.kwargs()["devices"]
        if isinstance(devices, str) and "," in devices:
            devices = [d for d in devices.split(",") if d.strip()]
        count = len(devices) if isinstance(devices, list) else devices
        return count * self.num_nodes if type(count) is int and count >= 1 else None


@dataclass
class CheckpointConfig(Section):
    save_last: bool | None = True
    save_top_k: int = _at_least(-1, 1)
    dirpath: str | None = None


@dataclass
class SummaryConfig(Section):
    max_depth: int = _at_least(-1, 1)


@dataclass
class CaptionsConfig(Section):
    source: str | None = None
    format: str = _one_of(["auto", "csv", "jsonl", "folder", "classes"], "auto")
    sep: str | None = None
    img_key: str | None = None
    caption_key: str | None = None
    template: str = "a photo of a {}"
    encoder: str | None = None
    device: str = "cpu"
    batch_size: int = _at_least(1, 256)
    cache_dir: str | None = None
    dtype: str = "float16"


@dataclass
class TrainConfig(Section):
    """The whole ``xclr-train`` config (lightly-ssl-train's keys plus ours), typed."""

    input_dir: str | None = None
    checkpoint: str | None = None
    pre_trained: bool = True
    seed: int = _rule(1, lambda v: 0 <= v < 2**32, "in [0, 2**32)")
    check_images: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    collate: CollateConfig = field(default_factory=CollateConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint_callback: CheckpointConfig = field(default_factory=CheckpointConfig)
    summary_callback: SummaryConfig = field(default_factory=SummaryConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    environment_variable_names: dict[str, str] = field(default_factory=dict)


#: What :func:`parse_config` (and so ``train``) takes.
AnyConfig = TrainConfig | DictConfig | Mapping[str, Any]


def load_config(
    overrides: Sequence[str] = (), updates: Mapping[str, Any] | None = None
) -> DictConfig:
    """The config as the command line composes it, with nested ``updates`` on top."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    if updates:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(updates)))  # type: ignore[assignment]
    return cfg


def _split(cls: Any, values: Mapping[Any, Any]) -> dict[str, Any]:
    """``values`` with the keys that dataclass ``cls`` does not declare in ``extra``."""
    kinds = {f.name: f.type for f in fields(cls) if f.name != "extra"}
    out: dict[str, Any] = {"extra": {k: v for k, v in values.items() if k not in kinds}}
    for key in [k for k in values if k in kinds]:
        nested = is_dataclass(kinds[key]) and isinstance(values[key], Mapping)
        out[key] = _split(kinds[key], values[key]) if nested else values[key]
    return out


def _check(section: Any, prefix: str, is_cli_call: bool) -> None:
    """Checks the ranges of ``section``'s fields; empty paths become None."""
    for f in fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        test, expected = f.metadata.get("rule", (None, ""))
        if is_dataclass(value):
            _check(value, f"{key}.", is_cli_call)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}.")
        elif test and value is not None and not test(value):
            raise ValueError(f"{key} must be {expected}, got {value!r}.")
        elif key in _PATHS:
            fixed = fix_input_path(value) if value and is_cli_call else value
            setattr(section, f.name, fixed or None)


def parse_config(cfg: AnyConfig, *, is_cli_call: bool = False) -> TrainConfig:
    """Types and checks a config once (ValueError naming the first bad key); a plain
    mapping is merged onto the defaults; ``is_cli_call``: paths as on the CLI."""
    if isinstance(cfg, TrainConfig):
        return cfg
    plain = OmegaConf.to_container(
        cfg if isinstance(cfg, DictConfig) else load_config(updates=cfg), resolve=True
    )
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    try:
        config = OmegaConf.to_object(
            OmegaConf.merge(TrainConfig, _split(TrainConfig, plain))
        )
    except OmegaConfBaseException as err:
        # Hydra reads a mistyped value as a string, which lightly and Lightning would
        # only trip over deep inside training.
        raise ValueError(f"{err.full_key}: {str(err.msg).splitlines()[0]}.") from None
    assert isinstance(config, TrainConfig)
    _check(config, "", is_cli_call)
    return config
