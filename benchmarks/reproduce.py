"""Reproduction: the demo's comparison over several seeds, plus a batch-size sweep.

Runs ``xclr-demo`` (:func:`xclr_plugin.demo.run_demo`) once per seed, each into its own
folder under ``--output/<name>_runs/``; a seed changes the initial weights (shared by
all methods), the augmentations and the batch order, while the split stays fixed, so
methods are compared pairwise per seed. The demo saves every finished (task, method),
so an interrupted benchmark continues where it stopped when run again, and seeds can
run as separate processes side by side, then be summarised by one more call with all
seeds (which only reads the finished runs):

    for s in 0 1 2; do python benchmarks/reproduce.py --seeds $s --threads 1 & done; wait
    python benchmarks/reproduce.py --seeds 0,1,2

writes ``<name>.json`` (every score, means, paired differences), ``<name>.md`` (tables)
and ``<name>.png`` (the demo's figure with error bars over seeds).

``--batch-sizes 64,256,1024`` runs the sweep instead: the caption regime (``--data
twemoji``) with SimCLR and X-CLR at each batch size (same epochs, so fewer steps for
larger batches), with X-CLR's target mass on the own view at each size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin.atomic import write_json_atomic, write_text_atomic
from xclr_plugin.demo import METHODS, DemoConfig, config_from_args, run_demo
from xclr_plugin.demo import build_parser as demo_parser
from xclr_plugin.demo.report import plot_results
from xclr_plugin.errors import one_line

from _common import RESULTS, command_line, markdown_table

METRICS = ("linear_top1", "lowlabel_top1", "knn_top1", "structure_rho")
HEADERS = ("linear", "low-label", "kNN", "rho")


def build_parser() -> argparse.ArgumentParser:
    """The demo's parser plus ``--seeds``, ``--name`` and ``--batch-sizes``."""
    parser = demo_parser()
    parser.prog = "benchmarks/reproduce.py"
    parser.set_defaults(output=os.path.relpath(RESULTS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--name", default=None, help="output stem (default: reproduce or sweep)"
    )
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated batch sizes: run the batch-size sweep")  # fmt: skip
    return parser


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{option} must be comma-separated integers, got {text!r}."
        ) from None
    if not values:
        raise ValueError(f"{option} is empty.")
    return values


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def aggregate(
    payloads: Sequence[dict[str, Any]], methods: Sequence[str]
) -> dict[str, Any]:
    """Per task: mean ± std of every score, and X-CLR minus each method per seed."""
    out: dict[str, Any] = {}
    for task in payloads[0]["results"]:
        block: dict[str, Any] = {"methods": {}, "paired": {}}
        block["methods"]["random_init"] = {
            k: mean_std([p["references"][task]["random_init"][k] for p in payloads])
            for k in METRICS
        }
        for m in methods:
            block["methods"][m] = {
                k: mean_std([p["results"][task][m]["scores"][k] for p in payloads])
                for k in METRICS
            }
        pairs = [("xclr", m) for m in methods if "xclr" in methods and m != "xclr"]
        if "supcon" in methods and "simclr" in methods:
            pairs.append(("supcon", "simclr"))  # issue 11's check of the setup
        for a, b in pairs:
            pair = {}
            for k in METRICS:
                diffs = [p["results"][task][a]["scores"][k]
                         - p["results"][task][b]["scores"][k] for p in payloads]  # fmt: skip
                pair[k] = {**mean_std(diffs), "wins": sum(d > 0 for d in diffs)}
            block["paired"][f"{a} - {b}"] = pair
        refs = [p["references"][task] for p in payloads]
        block["probe_noise"] = refs[0]["probe_noise"]
        block["own_view_mass"] = refs[0]["own_view_mass"]
        block["majority_class"] = refs[0]["majority_class"]
        block["descriptions_alone"] = refs[0]["descriptions_alone"]
        block["regime"] = payloads[0]["data"][task]["regime"]
        out[task] = block
    return out


def _pm(stat: dict[str, Any], key: str, sign: str = "") -> str:
    if key == "structure_rho":
        return f"{stat['mean']:+.2f} ± {stat['std']:.2f}"
    return f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f}"


def _label(name: str) -> str:
    return "random init" if name == "random_init" else METHODS[name].label


def markdown(payload: dict[str, Any]) -> str:
    """The tables of ``reproduce.md``."""
    c = payload["config"]
    lines = [
        "# X-CLR reproduction: both regimes",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{c['epochs']} epochs, batch {c['batch_size']}, {c['image_size']} px, width "
        f"{c['width']}, AdamW lr {c['lr']}, tau {c['temperature']}, tau_s "
        f"{c['target_temperature']}; seeds {payload['seeds']}; scored on the "
        f"{'validation' if c['eval_split'] == 'val' else 'held-out test'} images. "
        f"low-label = linear probe on {c['probe_labels_per_class']} labelled images per "
        f"class (mean of {c['probe_draws']} fixed draws). "
        "Accuracies in %, rho = Spearman correlation with the description similarities; "
        "mean ± std over seeds.",
        "",
    ]
    for task, block in payload["aggregate"].items():
        lines += [f"## {task} ({block['regime']})", ""]
        rows = [
            [_label(m), *(_pm(s[k], k) for k in METRICS),
             " ".join(f"{100 * v:.1f}" for v in s["linear_top1"]["values"])]
            for m, s in block["methods"].items()
        ]  # fmt: skip
        lines.append(markdown_table(["method", *HEADERS, "linear per seed"], rows))
        pairs = [
            [" - ".join(_label(n) for n in name.split(" - ")),
             *(f"{_pm(p[k], k, '+')} ({p[k]['wins']}/{len(payload['seeds'])})"
               for k in METRICS)]
            for name, p in block["paired"].items()
        ]  # fmt: skip
        lines += [
            "Paired differences per seed (same initial weights and batches), wins in "
            "brackets; SupCon - SimCLR checks the setup (issue 11 asks for >= 3 points):",
            "",
            markdown_table(["difference", *HEADERS], pairs),
            f"Probe noise (1 s.e. of one accuracy): ±{100 * block['probe_noise']:.1f} "
            f"points. Majority class {100 * block['majority_class']['top1']:.1f}%. "
            f"Descriptions alone: linear {100 * block['descriptions_alone']['linear_top1']:.1f}%. "
            f"X-CLR target mass on the own view: {100 * block['own_view_mass']:.0f}%.",
            "",
        ]
    return "\n".join(lines)


def reproduce(config: DemoConfig, seeds: list[int], name: str, command: str) -> None:
    """Runs (or resumes) every seed, then writes the summary files."""
    out = Path(config.output)
    payloads = []
    for seed in seeds:
        run = dataclasses.replace(
            config, seed=seed, output=str(out / f"{name}_runs" / f"seed{seed}")
        )
        payloads.append(
            run_demo(run, progress=False, command=f"{command} (seed {seed})")
        )
    summary = {
        "command": command,
        "config": dataclasses.asdict(config),
        "seeds": seeds,
        "aggregate": aggregate(payloads, config.methods),
        "timings_seconds": [p["timings_seconds"] for p in payloads],
        "machine": [p["machine"] for p in payloads],
        "versions": payloads[0]["versions"],
    }
    write_json_atomic(out / f"{name}.json", summary)
    write_text_atomic(out / f"{name}.md", markdown(summary))
    tasks = list(summary["aggregate"])
    rows = []
    for m in ["random_init", *config.methods]:
        row: dict[str, Any] = {"label": _label(m)}
        for t in tasks:
            s = summary["aggregate"][t]["methods"][m]
            row[t] = {**{k: s[k]["mean"] for k in METRICS},
                      **{f"{k}_std": s[k]["std"] for k in METRICS}}  # fmt: skip
        rows.append(row)
    plot_results(
        tasks, [f"{t}: {summary['aggregate'][t]['regime']}" for t in tasks], rows,
        out / f"{name}.png",
        suptitle=f"mean ± std over seeds {seeds}; {config.epochs} epochs, batch {config.batch_size}",
        chance=[summary["aggregate"][t]["majority_class"]["top1"] for t in tasks],
    )  # fmt: skip
    print(markdown(summary))


def sweep(
    config: DemoConfig, seeds: list[int], sizes: list[int], name: str, command: str
) -> None:
    """SimCLR vs X-CLR in one task at several batch sizes."""
    out = Path(config.output)
    rows, blocks = [], {}
    for size in sizes:
        payloads = []
        for seed in seeds:
            run = dataclasses.replace(
                config, seed=seed, batch_size=size,
                output=str(out / f"{name}_runs" / f"B{size}_seed{seed}"),
            )  # fmt: skip
            payloads.append(
                run_demo(
                    run, progress=False, command=f"{command} (B={size}, seed {seed})"
                )
            )
        block = aggregate(payloads, config.methods)
        blocks[str(size)] = block
        for task, b in block.items():
            cells = [str(size), task, f"{100 * b['own_view_mass']:.0f}%"]
            for m in config.methods:
                cells += [_pm(b["methods"][m][k], k) for k in METRICS]
            for pair in b["paired"].values():
                cells += [
                    f"{100 * pair['linear_top1']['mean']:+.1f} ({pair['linear_top1']['wins']}/{len(seeds)})"
                ]
            rows.append(cells)
    header = ["B", "task", "X-CLR own-view mass"]
    for m in config.methods:
        header += [f"{METHODS[m].label} {h}" for h in HEADERS]
    header += [
        f"{' - '.join(_label(n) for n in pair.split(' - '))} linear"
        for pair in next(iter(blocks.values()))[
            next(iter(next(iter(blocks.values()))))
        ]["paired"]
    ]
    text = "\n".join([
        "# Batch-size sweep", "", f"Command: `{command}`", "",
        f"{config.epochs} epochs at every batch size (fewer steps for larger batches); "
        f"seeds {seeds}; scored on the {'validation' if config.eval_split == 'val' else 'held-out test'} images.",
        "", markdown_table(header, rows),
    ])  # fmt: skip
    write_json_atomic(out / f"{name}.json", {"command": command, "config": dataclasses.asdict(config),
                                              "seeds": seeds, "batch_sizes": sizes, "aggregate": blocks})  # fmt: skip
    write_text_atomic(out / f"{name}.md", text)
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        seeds = _ints(args.seeds, "--seeds")
        sizes = _ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else []
    except ValueError as err:
        parser.error(one_line(err))
    command = command_line()
    if sizes:
        sweep(config, seeds, sizes, args.name or "sweep_batch", command)
    else:
        reproduce(config, seeds, args.name or "reproduce", command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
