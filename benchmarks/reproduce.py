"""Reproduction benchmark: the demo's comparison with more epochs, 3 seeds and SupCon.

Trains the demo's encoder (``xclr_plugin.demo``) on the Twemoji training images with
SimCLR, X-CLR (caption targets), CLIP-style image-text training and SupCon (X-CLR with
the category labels: supervised, an upper reference), for each seed, and evaluates each
by linear probe and kNN on the held-out images. The split is fixed (``--split-seed``);
a seed changes the initial weights (shared by all methods), the augmentations and the
batch order, so the spread is training noise and methods are compared pairwise per seed.

``--pretrain-fractions`` adds the data-scarce setting of the paper's claim: the encoders
see only a stratified fraction of the training images (same epochs, so fewer steps),
while the probes are still fitted on all training images.

Writes ``benchmarks/results/reproduce.json`` (every run, the aggregates, config,
versions, machine load), ``reproduce.md`` (tables) and ``reproduce.png`` (chart; one
``reproduce_scarce<pct>.png`` per extra fraction), each after every finished run, so an
interrupted benchmark continues with ``--resume``.

Usage (defaults: 24 epochs = twice the demo's, seeds 0,1,2, all four methods):
    python benchmarks/reproduce.py --pretrain-fractions 1,0.25 --threads 1
    # the same runs as one process per seed, then merged (what RESULTS.md reports):
    for s in 0 1 2; do python benchmarks/reproduce.py --seeds $s \
        --pretrain-fractions 1,0.25 --threads 1 --name reproduce_seed$s & done; wait
    python benchmarks/reproduce.py --merge benchmarks/results/reproduce_seed{0,1,2}.json
    python benchmarks/reproduce.py --limit 200 --epochs 1 --seeds 0 --output smoke-out  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin import demo

from _common import RESULTS, command_line, markdown_table

NAME = "reproduce"
DEFAULT_METHODS = "simclr,xclr,clip,supcon"
DEFAULT_EPOCHS = 24
DEFAULT_SEEDS = "0,1,2"
# The keys of the config that must match for --resume to reuse earlier runs.
_RUN_KEYS = ("method", "seed", "pretrain_fraction")


def build_parser() -> argparse.ArgumentParser:
    """The demo's parser with the benchmark's defaults and options."""
    parser = demo.build_parser()
    parser.prog = "benchmarks/reproduce.py"
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.set_defaults(
        epochs=DEFAULT_EPOCHS, methods=DEFAULT_METHODS, output=os.path.relpath(RESULTS)
    )
    parser.add_argument(
        "--seeds", default=DEFAULT_SEEDS, help="comma-separated training seeds"
    )
    parser.add_argument(
        "--pretrain-fractions",
        default="1.0",
        help="comma-separated fractions of the training images the encoders see",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished runs of the same config"
    )
    parser.add_argument(
        "--name", default=NAME, help="file name stem of the outputs in --output"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of the same configuration (e.g. one per seed) "
        "into --output/--name instead of running",
    )
    return parser


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            f"{option} must be comma-separated numbers, got {text!r}."
        ) from None
    if not values:
        raise SystemExit(f"{option} is empty.")
    return values


def _fingerprint(config: demo.DemoConfig) -> dict[str, Any]:
    """The config without what varies between runs or does not change results."""
    out = dataclasses.asdict(config)
    for key in (
        "methods",
        "seed",
        "pretrain_fraction",
        "output",
        "threads",
        "workers",
        "device",
    ):
        out.pop(key)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(
    runs: Sequence[dict[str, Any]], methods: Sequence[str], fractions: Sequence[float]
) -> dict[str, Any]:
    """Mean and spread per method, and paired differences per seed.

    Returns:
        ``{fraction: {"methods": {name: stats}, "paired": {"a - b": stats}}}`` with
        fraction keys as strings.
    """
    out: dict[str, Any] = {}
    for fraction in fractions:
        block: dict[str, Any] = {"methods": {}, "paired": {}}
        by_method: dict[str, dict[int, dict[str, Any]]] = {}
        for run in runs:
            if run["pretrain_fraction"] == fraction:
                by_method.setdefault(run["method"], {})[run["seed"]] = run
        for name in ["random_init", *methods]:
            seeds = by_method.get(name, {})
            if not seeds:
                continue
            stats: dict[str, Any] = {"seeds": sorted(seeds), "n": len(seeds)}
            for key in (
                "linear_top1",
                "knn_top1",
                "train_seconds",
                "train_cpu_seconds",
            ):
                values = [float(seeds[s][key]) for s in sorted(seeds)]
                mean, std = _mean_std(values)
                stats[key] = {"mean": mean, "std": std, "values": values}
            block["methods"][name] = stats
        for a, b in (
            ("xclr", "simclr"),
            ("xclr", "clip"),
            ("xclr", "supcon"),
            ("simclr", "clip"),
        ):
            common = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
            if not common:
                continue
            pair: dict[str, Any] = {"seeds": common}
            for key in ("linear_top1", "knn_top1"):
                diffs = [by_method[a][s][key] - by_method[b][s][key] for s in common]
                mean, std = _mean_std(diffs)
                pair[key] = {
                    "mean": mean,
                    "std": std,
                    "values": diffs,
                    "wins": sum(d > 0 for d in diffs),
                }
            block["paired"][f"{a} - {b}"] = pair
        out[f"{fraction:g}"] = block
    return out


def _label(name: str) -> str:
    return "random init" if name == "random_init" else demo.METHODS[name].label


def _pm(stat: dict[str, Any]) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown(payload: dict[str, Any]) -> str:
    """The tables of ``reproduce.md``."""
    config = payload["config"]
    data = payload["data"]
    lines = [
        "# X-CLR reproduction on Twemoji"
        if config["data"] == "twemoji"
        else f"# X-CLR reproduction on {config['data']}",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Data: {data['images']} images, {len(data['classes'])} classes "
        f"(left out: {data['dropped_classes'] or 'none'}), train {data['train_images']} / "
        f"test {data['test_images']} (fixed split, seed {config['split_seed']}). Encoder: "
        f"{config['image_size']}px, width {config['width']}; {config['epochs']} epochs, "
        f"batch {config['batch_size']}, AdamW lr {config['lr']}. Seeds: {payload['seeds']}. "
        "Top-1 accuracy (%) on the held-out images, mean ± std over seeds.",
        "",
    ]
    refs = payload["references"]
    for fraction, block in payload["aggregate"].items():
        pct = f"{100 * float(fraction):.0f}%"
        lines += [f"## Encoders trained on {pct} of the training images", ""]
        rows = []
        for name, stats in block["methods"].items():
            uses = "-" if name == "random_init" else demo.METHODS[name].uses
            seconds = stats["train_seconds"]["mean"]
            rows.append(
                [
                    _label(name),
                    uses,
                    _pm(stats["linear_top1"]),
                    _pm(stats["knn_top1"]),
                    " ".join(f"{100 * v:.1f}" for v in stats["linear_top1"]["values"]),
                    f"{seconds:.0f}" if seconds else "-",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "method",
                    "trains on",
                    "linear probe",
                    "kNN",
                    "linear per seed",
                    "train s",
                ],
                rows,
            )
        )
        if block["paired"]:
            pair_rows = [
                [
                    name.replace("xclr", "X-CLR")
                    .replace("simclr", "SimCLR")
                    .replace("clip", "CLIP")
                    .replace("supcon", "SupCon"),
                    f"{100 * p['linear_top1']['mean']:+.1f} ± {100 * p['linear_top1']['std']:.1f}",
                    f"{p['linear_top1']['wins']}/{len(p['seeds'])}",
                    f"{100 * p['knn_top1']['mean']:+.1f} ± {100 * p['knn_top1']['std']:.1f}",
                    f"{p['knn_top1']['wins']}/{len(p['seeds'])}",
                ]
                for name, p in block["paired"].items()
            ]
            lines += [
                "Paired differences (same seed, same initial weights and batches), points:",
                "",
                markdown_table(
                    ["difference", "linear", "wins", "kNN", "wins"], pair_rows
                ),
            ]
    majority = refs["majority_class"]
    text = refs["caption_text"]
    lines += [
        f"Chance: majority class ({majority['class']}) {100 * majority['linear_top1']:.1f}%, "
        f"uniform {100 * refs['uniform_chance']:.1f}%. Captions alone (MiniLM embeddings, "
        f"no image): linear {100 * text['linear_top1']:.1f}%, kNN {100 * text['knn_top1']:.1f}%. "
        f"One test-set standard error at 50% accuracy: ±{100 * (0.25 / data['test_images']) ** 0.5:.1f} points.",
        "",
    ]
    if data.get("credit"):
        lines += [data["credit"], ""]
    return "\n".join(lines)


def _rows_for_chart(block: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "label": _label(name),
            "linear_top1": stats["linear_top1"]["mean"],
            "linear_std": stats["linear_top1"]["std"],
            "knn_top1": stats["knn_top1"]["mean"],
            "knn_std": stats["knn_top1"]["std"],
        }
        for name, stats in block["methods"].items()
    ]


def write_outputs(payload: dict[str, Any], out_dir: Path, name: str = NAME) -> None:
    """Writes JSON, markdown and charts (atomically)."""
    demo.write_json_atomic(out_dir / f"{name}.json", payload)
    demo.write_text_atomic(out_dir / f"{name}.md", markdown(payload))
    config = payload["config"]
    for fraction, block in payload["aggregate"].items():
        if not block["methods"]:
            continue
        f = float(fraction)
        suffix = "" if f >= 1 else f"_scarce{100 * f:.0f}"
        demo.plot_results(
            _rows_for_chart(block),
            out_dir / f"{name}{suffix}.png",
            title=(
                f"{config['data']}: held-out top-1, mean ± std over seeds {payload['seeds']}, "
                f"{config['epochs']} epochs, encoders on {100 * f:.0f}% of train"
            ),
            chance=payload["references"]["majority_class"]["linear_top1"],
            footnote=payload["data"].get("credit"),
        )


def merge(paths: Sequence[Path], out_dir: Path, name: str) -> dict[str, Any]:
    """Combines the runs of several result files of the same configuration.

    Lets the seeds run as separate processes (``--name reproduce_seed0 --seeds 0``,
    ...) and be reported together (``--merge FILE... --name reproduce``).

    Raises:
        SystemExit: If the files hold different configurations or overlapping runs.
    """
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    first = parts[0]
    for path, part in zip(paths, parts, strict=True):
        if part["fingerprint"] != first["fingerprint"]:
            raise SystemExit(
                f"{path} was run with a different configuration than {paths[0]}."
            )
    runs: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for path, part in zip(paths, parts, strict=True):
        for run in part["runs"]:
            key = tuple(run[k] for k in _RUN_KEYS)
            if key in seen:
                raise SystemExit(
                    f"{path} repeats the run {dict(zip(_RUN_KEYS, key, strict=True))}."
                )
            seen.add(key)
            runs.append(run)
    seeds = sorted({int(s) for part in parts for s in part["seeds"]})
    fractions = sorted(
        {float(f) for part in parts for f in part["pretrain_fractions"]}, reverse=True
    )
    payload = {
        **first,
        "seeds": seeds,
        "pretrain_fractions": fractions,
        "command": " && ".join(part["command"] for part in parts),
        "merged_from": [os.fspath(p) for p in paths],
        "runs": runs,
        "aggregate": aggregate(runs, first["config"]["methods"], fractions),
        "timings_seconds": {
            os.fspath(p): part["timings_seconds"]
            for p, part in zip(paths, parts, strict=True)
        },
        "machine": {
            os.fspath(p): part["machine"] for p, part in zip(paths, parts, strict=True)
        },
    }
    write_outputs(payload, out_dir, name)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (or merges result files with ``--merge``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out_dir = Path(args.output)
    if args.merge:
        merged = merge([Path(p) for p in args.merge], out_dir, args.name)
        print(markdown(merged))
        print(
            f"Merged {len(args.merge)} file(s) into {out_dir / args.name}.{{json,md,png}}."
        )
        return 0
    seeds = [int(s) for s in _floats(args.seeds, "--seeds")]
    fractions = _floats(args.pretrain_fractions, "--pretrain-fractions")
    try:
        base = demo.config_from_args(args)
        base.validate()
        for f in fractions:
            dataclasses.replace(base, pretrain_fraction=f).validate()
    except ValueError as err:
        parser.error(str(err))
    if base.threads is not None:
        torch.set_num_threads(base.threads)
    progress = not args.no_progress
    json_path = out_dir / f"{args.name}.json"

    start = time.perf_counter()
    machine_start = demo.machine()
    data = demo.load_data(base, progress=progress)
    references = demo.reference_results(data, base)
    runs: list[dict[str, Any]] = []
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == _fingerprint(base):
            runs = [
                r
                for r in previous.get("runs", [])
                if r["seed"] in seeds and r["pretrain_fraction"] in fractions
            ]
            print(f"Resuming: {len(runs)} finished run(s) reused from {json_path}.")
        else:
            print(f"Not resuming: {json_path} holds a different configuration.")
    done = {tuple(r[k] for k in _RUN_KEYS) for r in runs}

    def payload() -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(base),
            "fingerprint": _fingerprint(base),
            "seeds": seeds,
            "pretrain_fractions": fractions,
            "command": command_line(),
            "data": data.summary(),
            "references": references,
            "runs": runs,
            "aggregate": aggregate(runs, base.methods, fractions),
            "timings_seconds": {**data.seconds, "total": time.perf_counter() - start},
            "machine": {"start": machine_start, "now": demo.machine()},
            "versions": demo.versions(),
        }

    todo = [
        (f, s, m)
        for f in fractions
        for s in seeds
        for m in ["random_init", *base.methods]
        if (m, s, f) not in done
    ]
    for i, (fraction, seed, method) in enumerate(todo, start=1):
        config = dataclasses.replace(base, pretrain_fraction=fraction, seed=seed)
        if method == "random_init":
            ref = demo.reference_results(data, config, seed=seed)["random_init"]
            result = dict(ref)
        else:
            res, _ = demo.run_method(
                demo.METHODS[method], data, config, seed=seed, progress=progress,
                position=f"[{i}/{len(todo)}] f={fraction:g} seed={seed} ",
            )  # fmt: skip
            result = dataclasses.asdict(res)
            print(
                f"{res.label:18s} f={fraction:g} seed={seed}: linear {100 * res.linear_top1:.1f}  "
                f"kNN {100 * res.knn_top1:.1f}  ({res.train_seconds:.0f} s)",
                flush=True,
            )
        result.update({"method": method, "seed": seed, "pretrain_fraction": fraction})
        runs.append(result)
        write_outputs(payload(), out_dir, args.name)
    final = payload()
    write_outputs(final, out_dir, args.name)
    print(markdown(final))
    print(
        f"Done in {time.perf_counter() - start:.0f} s; wrote {out_dir / args.name}.{{json,md,png}}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
