"""The table and the figure: every method, every task, side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from xclr_plugin.atomic import atomic_path

__all__ = ["format_table", "plot_results"]

_METRICS = (
    ("linear_top1", "linear"),
    ("lowlabel_top1", "low-label"),
    ("knn_top1", "kNN"),
    ("structure_rho", "rho"),
)


def _cell(value: float | None, key: str, spread: float | None = None) -> str:
    """An accuracy in % (one decimal) or a correlation (two decimals)."""
    if value is None:
        return "-"
    if key == "structure_rho":
        text = f"{value:+.2f}"
        return text if spread is None else f"{text}±{spread:.2f}"
    text = f"{100 * value:.1f}"
    return text if spread is None else f"{text}±{100 * spread:.1f}"


def format_table(
    tasks: Sequence[str],
    rows: Sequence[dict[str, Any]],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table: one row per method, four columns per task.

    Args:
        tasks: Task names, in column order.
        rows: Dicts with ``label``, ``uses`` and, per task, a dict of scores
            (``linear_top1``, ``lowlabel_top1``, ``knn_top1``, ``structure_rho``;
            optional ``*_std``; a missing score shows as ``-``).
        title: First line.
        notes: Lines printed under the table.
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
    """One figure: per task, accuracy bars (top) and description structure (bottom).

    Written atomically as a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["label"]) for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(
        2, len(tasks), figsize=(5.5 * len(tasks), 7.0), dpi=100, squeeze=False,
        gridspec_kw={"height_ratios": [2, 1]},
    )  # fmt: skip
    for col, task in enumerate(tasks):
        top, bottom = axes[0][col], axes[1][col]
        for offset, key, name, color in (
            (-0.27, "linear_top1", "linear probe", "#4C72B0"),
            (0.0, "lowlabel_top1", "low-label linear", "#8172B3"),
            (0.27, "knn_top1", "kNN", "#DD8452"),
        ):
            values = [100 * float((r.get(task) or {}).get(key) or 0) for r in rows]
            errors = [
                100 * float((r.get(task) or {}).get(f"{key}_std") or 0) for r in rows
            ]
            bars = top.bar(x + offset, values, 0.27, yerr=errors if any(errors) else None,
                           capsize=2, label=name, color=color)  # fmt: skip
            top.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        if col < len(chance) and chance[col] is not None:
            top.axhline(100 * float(chance[col] or 0), color="gray", linestyle="--",
                        linewidth=1, label="majority class")  # fmt: skip
        top.set_ylim(0, 100)
        top.set_title(titles[col], fontsize=9)
        top.set_ylabel("held-out top-1 (%)")
        top.set_xticks(x, [])
        top.legend(fontsize=7, loc="lower right")
        rho = [float((r.get(task) or {}).get("structure_rho") or 0) for r in rows]
        rho_err = [
            float((r.get(task) or {}).get("structure_rho_std") or 0) for r in rows
        ]
        bars = bottom.bar(x, rho, 0.6, yerr=rho_err if any(rho_err) else None,
                          capsize=2, color="#55A868")  # fmt: skip
        bottom.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_ylabel("Spearman rho with\ndescription similarity", fontsize=8)
        bottom.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle(suptitle, fontsize=10)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=5, color="gray", wrap=True)
    fig.tight_layout(rect=(0, 0.03 if footnote else 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
