"""What a demo run depends on: the tasks, the methods and :class:`DemoConfig`.

The tasks are the paper's two regimes: ``animals`` (descriptions are class names, the
ImageNet setting) and ``twemoji`` (one caption per image, the CC3M setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """A method: its registry ``loss`` and what the batch carries besides the images
    (``targets``: ``"none"``, ``"captions"``, ``"labels"`` or ``"tokens"``)."""

    name: str
    label: str
    loss: str
    targets: str
    uses: str


_DESCRIPTIONS = "images + descriptions"
METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec("simclr", "SimCLR", "ntxent", "none", "images"),
    "supcon": MethodSpec("supcon", "SupCon (labels)", "supcon", "labels", "images + labels"),
    "xclr": MethodSpec("xclr", "X-CLR", "xclr", "captions", _DESCRIPTIONS),
    "clip": MethodSpec("clip", "CLIP, frozen text enc.", "clip", "captions", _DESCRIPTIONS),
    "clip-scratch": MethodSpec("clip-scratch", "CLIP, text from scratch", "clip", "tokens", _DESCRIPTIONS),
}  # fmt: skip
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)

#: Built-in tasks and their regimes.
TASKS = {"animals": "class names", "twemoji": "one caption per image"}
DEFAULT_TASKS: tuple[str, ...] = ("animals", "twemoji")


#: Fields without an ``xclr-demo`` option.
_NO_FLAG = ("proj_dim", "supcon_target_temperature", "knn_t")
#: Help of the ``xclr-demo`` options, by field.
_HELP = {
    "data": f"comma-separated tasks from {','.join(TASKS)}, or a captions CSV/TSV "
    "(open_clip style with an integer label column) or JSONL, or a folder of class "
    "subfolders (captions from --caption-template)",
    "methods": f"comma-separated, from {','.join(METHODS)}",
    "epochs": "training epochs per method",
    "batch_size": "images per step (two views each)",
    "lr": "peak AdamW learning rate",
    "image_size": "input side in pixels",
    "width": "encoder width (first-stage channels)",
    "temperature": "NT-Xent/X-CLR/SupCon temperature",
    "target_temperature": "X-CLR tau_s",
    "seed": "seed of weights, augmentations, batches",
    "split_seed": "seed of the split and subsets",
    "eval_split": "'val' scores on a validation part of the training images (for "
    "choosing settings)",
    "animals_images": "Animal-MNIST images used (stratified, of 10,000)",
    "min_class_size": "leave out smaller classes",
    "limit": "a stratified subset of N images per task",
    "probe_labels_per_class": "labelled training images per class of the low-label "
    "linear probe",
    "probe_draws": "fixed draws of those images the low-label probe is averaged over",
    "device": "torch device, e.g. cpu or cuda",
    "threads": "torch CPU threads (default: torch's)",
    "text_model": "sentence-transformers folder (default: all-MiniLM-L6-v2)",
    "csv_separator": "default: tab for .tsv, comma for .csv",
    "output": "output folder",
}
#: Integer settings and their smallest value (``limit`` and ``threads`` may be None).
_AT_LEAST = {"epochs": 1, "batch_size": 2, "image_size": 8, "width": 1, "proj_dim": 1,
             "min_class_size": 2, "knn_k": 1, "animals_images": 1, "limit": 1,
             "probe_labels_per_class": 1, "probe_draws": 1, "threads": 1}  # fmt: skip
#: Float settings that must be finite and > 0.
_POSITIVE = ("lr", "temperature", "target_temperature", "supcon_target_temperature",
             "knn_t")  # fmt: skip


@dataclass
class DemoConfig:
    """Every setting of a run, set by the ``xclr-demo`` option of its name.

    Raises:
        ValueError: Naming the first bad option, what was expected and what came.
    """

    data: str = ",".join(DEFAULT_TASKS)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    image_size: int = 28
    width: int = 16
    proj_dim: int = 128
    temperature: float = 0.1
    target_temperature: float = 0.1
    supcon_target_temperature: float = 0.01
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.3
    eval_split: str = "test"
    animals_images: int = 2000
    min_class_size: int = 10
    limit: int | None = None
    probe_labels_per_class: int = 10
    probe_draws: int = 10
    knn_k: int = 20
    knn_t: float = 0.1
    device: str = "cpu"
    threads: int | None = None
    text_model: str | None = None
    caption_template: str = "a photo of a {}"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str = "label"
    csv_separator: str | None = None
    output: str = "xclr-demo-output"

    def __post_init__(self) -> None:
        def count(name: str, least: int) -> bool:
            v = getattr(self, name)
            if v is None:
                return name in ("limit", "threads")
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        def positive(name: str) -> bool:
            return math.isfinite(getattr(self, name)) and getattr(self, name) > 0

        rules = [
            ("methods", bool(self.methods) and set(self.methods) <= set(METHODS),
             f"a comma-separated list of {sorted(METHODS)}"),
            ("methods", len(set(self.methods)) == len(self.methods), "each method once"),
            ("data", bool(self.data.strip()), "a task or a path"),
            *((n, count(n, least), "a positive integer" if least == 1 else
               f"at least {least}") for n, least in _AT_LEAST.items()),
            *((n, positive(n), "a finite number > 0") for n in _POSITIVE),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             ">= 0"),
            ("test_fraction", 0 < self.test_fraction < 1, "strictly between 0 and 1"),
            ("eval_split", self.eval_split in ("test", "val"), "'test' or 'val'"),
            ("caption_template", "{}" in self.caption_template,
             "a template with '{}' for the class name"),
        ]  # fmt: skip
        for name, ok, expected in rules:
            if not ok:
                value = getattr(self, name)
                if name == "methods":
                    value = ",".join(value)
                raise ValueError(f"{_flag(name)} must be {expected}, got {value!r}.")

    @property
    def tasks(self) -> list[str]:
        """The ``--data`` entries: built-in task names or one path."""
        names = [t.strip() for t in self.data.split(",") if t.strip()]
        return names if all(n in TASKS for n in names) else [self.data]

    def fingerprint(self, task: str, method: str) -> dict[str, Any]:
        """What one trained encoder depends on (a finished run with it is reused).

        Output, threads, device, the other methods and the low-label probe settings
        (saved features are re-scored under new ones) are left out.
        """
        out = dataclasses.asdict(self)
        for key in ("data", "methods", "output", "threads", "device",
                    "probe_labels_per_class", "probe_draws"):  # fmt: skip
            out.pop(key)
        out.update(task=task, method=method)
        return out

    def probe_settings(self) -> dict[str, int]:
        """The scoring settings a saved run can be re-scored under."""
        return {
            "probe_labels_per_class": self.probe_labels_per_class,
            "probe_draws": self.probe_draws,
        }


#: The fields with an ``xclr-demo`` option, in ``--help`` order.
_FLAGS = [f.name for f in dataclasses.fields(DemoConfig) if f.name not in _NO_FLAG]


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the option of each :class:`DemoConfig` field (but :data:`_NO_FLAG`)."""
    hints, defaults = typing.get_type_hints(DemoConfig), DemoConfig()
    for name in _FLAGS:
        hint, default = hints[name], getattr(defaults, name)
        kind: Callable[[str], Any] = _names
        if name != "methods":
            kind = next(
                t for t in (int, float, str) if t in (hint, *typing.get_args(hint))
            )
        parser.add_argument(
            _flag(name),
            type=kind,
            default=",".join(default) if isinstance(default, list) else default,
            help=_HELP.get(name),
            choices=("test", "val") if name == "eval_split" else None,
        )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` of parsed arguments (raises ``ValueError`` as it)."""
    return DemoConfig(**{name: getattr(args, name) for name in _FLAGS})
