"""What a demo run depends on: the tasks, the methods and :class:`DemoConfig`.

Two tasks show the paper's two regimes (Sobal et al., ICLR 2025):

- ``animals`` (class-graph regime, the paper's ImageNet setting): Animal-MNIST
  silhouettes of 10 animals; every image's description is its class name in a
  template ("a photo of a zebra"), so many images in a batch share a description.
- ``twemoji`` (caption regime, the paper's CC3M setting): Twemoji clip-art, each image
  described by its own emoji name ("water buffalo"); the probe scores the emoji
  category.

Every method trains the same encoder from the same weights on the same batches; only
the objective differs (:data:`METHODS`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TASKS",
    "METHODS",
    "TASKS",
    "DemoConfig",
    "MethodSpec",
]


@dataclass(frozen=True)
class MethodSpec:
    """A training objective of the comparison.

    Attributes:
        name: Command-line name (``--methods``).
        label: Name in the table and chart.
        loss: Registry name of the loss (:func:`xclr_plugin.registry.create_loss`).
        targets: What the batch carries besides the images: ``"none"``,
            ``"captions"`` (frozen sentence embeddings), ``"labels"`` or ``"tokens"``
            (caption tokens for a text tower trained from scratch).
        uses: What the objective learns from, for the table.
    """

    name: str
    label: str
    loss: str
    targets: str
    uses: str


METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec("simclr", "SimCLR", "ntxent", "none", "images"),
    "supcon": MethodSpec(
        "supcon", "SupCon (labels)", "supcon", "labels", "images + labels"
    ),
    "xclr": MethodSpec("xclr", "X-CLR", "xclr", "captions", "images + descriptions"),
    "clip": MethodSpec(
        "clip", "CLIP, frozen text enc.", "clip", "captions", "images + descriptions"
    ),
    "clip-scratch": MethodSpec(
        "clip-scratch",
        "CLIP, text from scratch",
        "clip",
        "tokens",
        "images + descriptions",
    ),
}
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)

#: Built-in tasks: name -> (regime, short description).
TASKS: dict[str, tuple[str, str]] = {
    "animals": ("class names", "Animal-MNIST silhouettes, captions = class names"),
    "twemoji": ("one caption per image", "Twemoji clip-art, captions = emoji names"),
}
DEFAULT_TASKS: tuple[str, ...] = ("animals", "twemoji")


@dataclass
class DemoConfig:
    """Everything a run depends on; recorded in ``results.json``.

    Attributes:
        data: Comma-separated built-in tasks (``animals``, ``twemoji``), or one
            captions CSV/TSV/JSONL file or image folder of your own.
        methods: Method names (keys of :data:`METHODS`), in table order.
        epochs: Training epochs per method.
        batch_size: Images per step (two views each).
        lr: Peak AdamW learning rate (linear warmup, cosine decay).
        weight_decay: AdamW weight decay (not on biases, norms and the logit scale).
        image_size: Side of the square training and evaluation images, in pixels.
        width: Channels of the encoder's first stage (doubling per stage).
        proj_dim: Output dimension of the projection heads.
        temperature: Logit temperature of NT-Xent, X-CLR and SupCon; CLIP starts its
            learnable temperature at 0.07, as open_clip.
        target_temperature: X-CLR's target temperature ``tau_s``.
        supcon_target_temperature: Target temperature of the SupCon label graph.
        seed: Seed of the weights, augmentations and batch order.
        split_seed: Seed of the train/test split and of the subsets.
        test_fraction: Fraction of each class held out for evaluation.
        eval_split: ``"test"`` scores on the held-out images; ``"val"`` never touches
            them: it splits the training part again (``test_fraction`` of it) and
            scores on that validation part. Every choice of a setting is made with
            ``"val"``.
        animals_images: Animal-MNIST images used (a stratified subset of 10,000).
        min_class_size: Classes with fewer images are left out (Twemoji's
            Component category has 5).
        limit: Use a stratified subset of this many images per task (quick checks).
        probe_labels_per_class: Labelled training images per class of the
            low-label linear probe (fewer if a class has fewer).
        probe_draws: Fixed draws of those images the low-label probe is averaged over.
        knn_k: Neighbours of the kNN classifier.
        knn_t: Temperature of the kNN vote weights.
        device: Torch device.
        threads: Torch CPU threads (None: torch's default).
        text_model: Sentence-transformers model for the descriptions (None: the
            packaged all-MiniLM-L6-v2).
        caption_template: Template turning a class name into a description.
        csv_img_key: Image column of a CSV/TSV source.
        csv_caption_key: Caption column of a CSV/TSV source.
        csv_label_key: Integer label column of a CSV/TSV/JSONL source.
        csv_separator: Column separator of a CSV/TSV source (None: tab for ``.tsv``,
            comma for ``.csv``).
        output: Output folder.
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

    @property
    def tasks(self) -> list[str]:
        """The ``--data`` entries: built-in task names or one path."""
        names = [t.strip() for t in self.data.split(",") if t.strip()]
        return names if all(n in TASKS for n in names) else [self.data]

    def fingerprint(self, task: str, method: str) -> dict[str, Any]:
        """What one method's trained encoder on one task depends on (for resuming).

        The output folder, threads, device and the other methods are left out: a
        finished run is reused whatever else the new command asks for. The settings
        of the low-label probe (:meth:`probe_settings`) are left out too: the saved
        features of a finished run are re-scored under new ones, without retraining.
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

    def validate(self) -> None:
        """Checks the values.

        Raises:
            ValueError: Naming the first bad option, what was expected and what came.
        """
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods must be a comma-separated list of {sorted(METHODS)}, got "
                f"{','.join(self.methods)!r}."
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"--methods lists a method twice: {','.join(self.methods)!r}."
            )
        if not self.data.strip():
            raise ValueError("--data must name a task or a path, got ''.")
        for name in (
            "epochs",
            "batch_size",
            "image_size",
            "width",
            "proj_dim",
            "min_class_size",
            "knn_k",
            "animals_images",
            "probe_labels_per_class",
            "probe_draws",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}."
                )
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be at least 2, got {self.batch_size}.")
        if self.image_size < 8:
            raise ValueError(
                f"--image-size must be at least 8 pixels, got {self.image_size}."
            )
        if self.min_class_size < 2:
            raise ValueError(
                f"--min-class-size must be at least 2, got {self.min_class_size}."
            )
        for name in (
            "lr",
            "temperature",
            "target_temperature",
            "supcon_target_temperature",
            "knn_t",
        ):
            fvalue = getattr(self, name)
            if not math.isfinite(fvalue) or fvalue <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a finite number > 0, got {fvalue!r}."
                )
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"--test-fraction must lie strictly between 0 and 1, got {self.test_fraction!r}."
            )
        if self.eval_split not in ("test", "val"):
            raise ValueError(
                f"--eval-split must be 'test' or 'val', got {self.eval_split!r}."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be a positive integer, got {self.limit!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"--threads must be a positive integer, got {self.threads!r}."
            )
        if "{}" not in self.caption_template:
            raise ValueError(
                f"--caption-template must contain '{{}}' for the class name, got "
                f"{self.caption_template!r}."
            )
