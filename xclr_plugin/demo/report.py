"""The table, its notes and the figure: every method, every task, side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xclr_plugin.atomic import atomic_path
from xclr_plugin.demo.config import METHODS, DemoConfig
from xclr_plugin.demo.data import TaskData

_METRICS = (("linear_top1", "linear"), ("lowlabel_top1", "low-label"),
            ("knn_top1", "kNN"), ("structure_rho", "rho"))  # fmt: skip


def _cell(value: float | None, key: str, spread: float | None = None) -> str:
    """An accuracy in % (one decimal) or a correlation (two decimals)."""
    if value is None:
        return "-"
    rho = key == "structure_rho"
    text = f"{value:+.2f}" if rho else f"{100 * value:.1f}"
    if spread is not None:
        text += f"±{spread:.2f}" if rho else f"±{100 * spread:.1f}"
    return text


def format_table(
    tasks: Sequence[str],
    rows: Sequence[dict[str, Any]],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table, one row per method, four columns per task, then ``notes``.

    A row holds ``label``, ``uses`` and per task a dict of scores (optional ``*_std``;
    a missing score shows as ``-``).
    """
    header = ["method", "trains on"]
    for task in tasks:
        header += [f"{task} {name}" for _, name in _METRICS]
    body = []
    for row in rows:
        cells = [str(row["label"]), str(row.get("uses", ""))]
        for task in tasks:
            scores = row.get(task) or {}
            cells += [
                _cell(scores.get(key), key, scores.get(f"{key}_std"))
                for key, _ in _METRICS
            ]
        body.append(cells)
    widths = [
        max(len(header[i]), *(len(r[i]) for r in body)) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, body), rule, *notes])


def report(
    tasks: dict[str, TaskData],
    refs: dict[str, Any],
    results: dict[str, dict[str, Any]],
    config: DemoConfig,
    png: Path,
) -> str:
    """Draws the figure into ``png``; returns the table with its notes."""
    names = list(tasks)
    rows = [{"label": "random init", "uses": "-", **{t: refs[t]["random_init"] for t in names}}]  # fmt: skip
    for m in config.methods:
        rows.append({"label": METHODS[m].label, "uses": METHODS[m].uses,
                     **{t: results[t][m]["scores"] for t in names}})  # fmt: skip
    title = (
        f"X-CLR demo: {config.epochs} epochs, batch {config.batch_size}, "
        f"{config.image_size}px, width {config.width}, seed {config.seed}"
    )
    credits = " ".join(d.credit for d in tasks.values() if d.credit)
    plot_results(
        names, [f"{n}: {tasks[n].regime}" for n in names], rows, png, suptitle=title,
        chance=[refs[n]["majority_class"]["top1"] for n in names],
        footnote=credits or None,
    )  # fmt: skip
    return format_table(names, rows, title, notes(tasks, refs, results, config))


def notes(
    tasks: dict[str, TaskData],
    refs: dict[str, Any],
    results: dict[str, dict[str, Any]],
    config: DemoConfig,
) -> list[str]:
    """Lines under the table: what each task is, chance, noise, X-CLR's target."""
    lines = []
    held_out = "validation" if config.eval_split == "val" else "held-out"
    for name, data in tasks.items():
        r = refs[name]
        lines.append(
            f"{name} ({data.regime}): {len(data.train_idx)} train / {len(data.test_idx)} "
            f"{held_out} images, {data.num_classes} classes; majority class "
            f"{100 * r['majority_class']['top1']:.1f}%; probe noise "
            f"±{100 * r['probe_noise']:.1f} points (1 s.e.); descriptions alone "
            f"{100 * r['descriptions_alone']['linear_top1']:.1f}% linear; X-CLR target "
            f"mass on the own view {100 * r['own_view_mass']:.0f}% (B={config.batch_size}, "
            f"tau_s={config.target_temperature})."
        )
    scores = [r["random_init"] for r in refs.values()]
    scores += [run["scores"] for task in results.values() for run in task.values()]
    draw_se = max(float(s.get("lowlabel_draw_se", 0.0)) for s in scores)
    lines.append(
        f"linear = logistic regression on all training images; low-label = the same "
        f"on {config.probe_labels_per_class} labelled images per class, mean of "
        f"{config.probe_draws} fixed draws (draw noise up to ±{100 * draw_se:.1f} "
        f"points, 1 s.e. over draws); kNN = lightly knn_predict (k={config.knn_k}); all "
        "on frozen features; rho = Spearman correlation between image-embedding and "
        "description similarities (class means for class names, image pairs for "
        "captions)."
    )
    return [
        *lines,
        "SupCon trains on the labels the probe scores: a supervised reference.",
    ]


def plot_results(
    tasks: Sequence[str],
    titles: Sequence[str],
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    suptitle: str,
    chance: Sequence[float | None] = (),
    footnote: str | None = None,
) -> None:
    """Writes one PNG: per task, accuracy bars (top) and description structure (bottom)."""
    from matplotlib.figure import Figure

    def values(task: str, key: str, scale: float = 1.0) -> list[float]:
        return [scale * float((r.get(task) or {}).get(key) or 0) for r in rows]

    x = np.arange(len(rows))
    fig = Figure(figsize=(5.5 * len(tasks), 7.0), dpi=100)
    axes = fig.subplots(2, len(tasks), squeeze=False, gridspec_kw={"height_ratios": [2, 1]})  # fmt: skip
    for col, task in enumerate(tasks):
        top, bottom = axes[0][col], axes[1][col]
        for offset, key, name, color in (
            (-0.27, "linear_top1", "linear probe", "#4C72B0"),
            (0.0, "lowlabel_top1", "low-label linear", "#8172B3"),
            (0.27, "knn_top1", "kNN", "#DD8452"),
        ):
            errors = values(task, f"{key}_std", 100)
            bars = top.bar(x + offset, values(task, key, 100), 0.27, capsize=2,
                           yerr=errors if any(errors) else None, label=name, color=color)  # fmt: skip
            top.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        if col < len(chance) and chance[col] is not None:
            top.axhline(100 * float(chance[col] or 0), color="gray", linestyle="--",
                        linewidth=1, label="majority class")  # fmt: skip
        top.set_ylim(0, 100)
        top.set_title(titles[col], fontsize=9)
        top.set_ylabel("held-out top-1 (%)")
        top.set_xticks(x, [])
        top.legend(fontsize=7, loc="lower right")
        errors = values(task, "structure_rho_std")
        bars = bottom.bar(x, values(task, "structure_rho"), 0.6, capsize=2,
                          yerr=errors if any(errors) else None, color="#55A868")  # fmt: skip
        bottom.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_ylabel("Spearman rho with\ndescription similarity", fontsize=8)
        bottom.set_xticks(x, [str(r["label"]) for r in rows], rotation=30, ha="right", fontsize=7)  # fmt: skip
    fig.suptitle(suptitle, fontsize=10)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=5, color="gray", wrap=True)
    fig.tight_layout(rect=(0, 0.03 if footnote else 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
