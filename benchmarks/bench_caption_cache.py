"""Caption cache: build throughput vs bare sentence-transformers, lookup cost vs a step.

Two questions:

1. **Build overhead.** ``build_caption_cache`` (chunked encode, float16 memmap writes,
   flush + atomic progress marker per chunk, checksum, manifest) against a bare
   ``SentenceTransformer.encode(captions, normalize_embeddings=True)`` on the same
   captions, same model and batch size. Runs are interleaved (bare, cache, cache,
   bare, ...) so machine load hits both alike. Goal: within 10%.
2. **Lookup cost.** ``CaptionCache.lookup`` of 64 random file names from a large
   memory-mapped cache (what ``XCLRCollate`` adds per batch) against one training step
   of a ResNet-18 (forward + backward + SGD step, batch 64, 64x64 px). Goal: < 1%.
   The large cache is built through the same code path with a fast synthetic
   encoder (random unit vectors), so only storage and lookup are timed.

Usage:
    python benchmarks/bench_caption_cache.py
    python benchmarks/bench_caption_cache.py --captions 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin.atomic import write_text_atomic
from xclr_plugin.cache import CaptionCache, build_caption_cache
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.text import TextEncoder, default_model_path

from _common import (
    RESULTS,
    command_line,
    environment,
    markdown_table,
    write_json,
)

ADJECTIVES = [
    "small",
    "large",
    "old",
    "shiny",
    "blurry",
    "bright",
    "dark",
    "wet",
    "fluffy",
    "striped",
]
COLORS = [
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "grey",
    "brown",
]
NOUNS = [
    "cat",
    "dog",
    "car",
    "boat",
    "house",
    "tree",
    "bicycle",
    "horse",
    "bird",
    "chair",
    "lamp",
    "train",
]
PLACES = [
    "",
    " on a beach",
    " in a snowy forest at dawn",
    " next to a busy road in the city centre",
    " on a wooden table",
    " under a cloudy sky with mountains in the background",
]
TEMPLATES = [
    "a photo of a {a} {c} {n}{p}",
    "{a} {c} {n}{p}",
    "a close-up picture showing a {c} {n} that looks {a}{p}",
]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, varied-length synthetic captions (deterministic)."""
    combos = list(itertools.product(TEMPLATES, ADJECTIVES, COLORS, NOUNS, PLACES))
    random.Random(seed).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"At most {len(combos)} distinct captions, asked for {n}.")
    return [t.format(a=a, c=c, n=noun, p=p) for t, a, c, noun, p in combos[:n]]


class RandomEncoder:
    """Fast stand-in encoder (random unit vectors) to build a large cache quickly."""

    def __init__(self, dim: int = 384) -> None:
        self.name = "synthetic/random-unit-vectors"
        self.dim = dim
        self._gen = torch.Generator().manual_seed(0)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Random unit vectors, one per text."""
        return torch.nn.functional.normalize(
            torch.randn(len(texts), self.dim, generator=self._gen), dim=1
        )


def bench_build(
    n: int, repeats: int, batch_size: int, chunk_size: int
) -> dict[str, Any]:
    """Interleaved timings of bare ``SentenceTransformer.encode`` and ``build_caption_cache``."""
    from sentence_transformers import SentenceTransformer

    captions = make_captions(n)
    records = [CaptionRecord(f"img_{i:06d}.jpg", c) for i, c in enumerate(captions)]
    bare = SentenceTransformer(default_model_path(), device="cpu")
    bare.eval()
    encoder = TextEncoder(batch_size=batch_size)

    def run_bare() -> None:
        bare.encode(
            captions,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        runs = itertools.count()

        def run_cache() -> None:
            build_caption_cache(
                records,
                Path(tmp) / f"run{next(runs)}",
                encoder,
                chunk_size=chunk_size,
                progress=False,
            )

        run_bare()  # warm-up (allocator, threads)
        run_cache()
        times: dict[str, list[float]] = {"bare": [], "cache": []}
        for r in range(repeats):
            order = [("bare", run_bare), ("cache", run_cache)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "captions": n,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "repeats": repeats,
        "times_s": times,
        "median_s": med,
        "captions_per_s": {k: n / v for k, v in med.items()},
        "overhead_pct": 100.0 * (med["cache"] / med["bare"] - 1.0),
    }


def bench_lookup(rows: int, batch_size: int, lookups: int) -> dict[str, Any]:
    """Median time of one ``CaptionCache.lookup`` of ``batch_size`` random file names."""
    with tempfile.TemporaryDirectory() as tmp:
        records = [
            CaptionRecord(f"img_{i:07d}.jpg", f"caption {i}") for i in range(rows)
        ]
        start = time.perf_counter()
        built = build_caption_cache(
            records, tmp, RandomEncoder(), chunk_size=16384, progress=False
        )
        build_s = time.perf_counter() - start
        # What a DataLoader worker gets: an unpickled cache that maps the file lazily.
        cache: CaptionCache = pickle.loads(pickle.dumps(built))
        rng = random.Random(0)
        names = [r.filename for r in records]
        start = time.perf_counter()
        cache.lookup(rng.sample(names, batch_size))  # first call: maps file, reads keys
        first_s = time.perf_counter() - start
        times = []
        for _ in range(lookups):
            batch = rng.sample(names, batch_size)
            start = time.perf_counter()
            out = cache.lookup(batch)
            times.append(time.perf_counter() - start)
        assert out.shape == (batch_size, 384)
        by_index = []
        for _ in range(lookups):
            idx = rng.sample(range(rows), batch_size)
            start = time.perf_counter()
            cache[idx]
            by_index.append(time.perf_counter() - start)
        size_mib = os.path.getsize(cache.data_path) / 2**20
        # What opening costs with each check (trainers pass records= and
        # check_finite=True; the file is in the page cache, as right after a build).
        open_s: dict[str, float] = {}
        for label, kwargs in (
            ("default", {}),
            ("records", {"records": records}),
            ("check_finite", {"check_finite": True}),
            ("verify_checksum", {"verify_checksum": True}),
        ):
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                CaptionCache.open(tmp, **kwargs)  # type: ignore[arg-type]
                runs.append(time.perf_counter() - start)
            open_s[label] = statistics.median(runs)
    return {
        "cache_rows": rows,
        "cache_mib": size_mib,
        "synthetic_build_s": build_s,
        "batch_size": batch_size,
        "lookups": lookups,
        "first_lookup_s": first_s,
        "median_lookup_by_filename_s": statistics.median(times),
        "median_lookup_by_index_s": statistics.median(by_index),
        "open_s": open_s,
    }


def bench_train_step(batch_size: int, image_size: int, steps: int) -> dict[str, Any]:
    """Median time of a ResNet-18 forward + backward + SGD step."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, image_size, image_size)
    targets = torch.randint(0, 128, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "model": "torchvision resnet18 (128 outputs)",
        "batch_size": batch_size,
        "image_size": image_size,
        "steps": steps,
        "times_s": times,
        "median_step_s": statistics.median(times),
    }


def _markdown(result: dict[str, Any]) -> str:
    build, lookup, step = result["build"], result["lookup"], result["train_step"]
    env = result["environment"]
    lines = [
        "# Caption cache: build throughput and lookup cost",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['cpu_count']} CPUs ({env['processor']}), torch {env['torch']}, "
        f"{env['threads']} threads, load average {result['load_average_start']} at start, "
        f"{result['load_average_end']} at end (other jobs shared the machine). "
        "Medians of interleaved runs.",
        "",
        "## Build: bare `SentenceTransformer.encode` vs `build_caption_cache`",
        "",
        f"{build['captions']} synthetic captions, all-MiniLM-L6-v2 on CPU, batch size "
        f"{build['batch_size']}, cache chunk size {build['chunk_size']}, float16, "
        f"{build['repeats']} runs each.",
        "",
        markdown_table(
            ["what", "median s", "captions/s"],
            [
                [k, f"{build['median_s'][k]:.2f}", f"{build['captions_per_s'][k]:.0f}"]
                for k in ("bare", "cache")
            ],
        ),
        f"Cache build overhead: **{build['overhead_pct']:+.1f}%** (goal: within 10%).",
        "",
        "## Lookup per batch vs a training step",
        "",
        markdown_table(
            ["what", "median ms", "share of a step"],
            [
                [
                    f"lookup of {lookup['batch_size']} file names in a {lookup['cache_rows']:,}-row "
                    f"cache ({lookup['cache_mib']:.0f} MiB float16 memmap)",
                    f"{1e3 * lookup['median_lookup_by_filename_s']:.3f}",
                    f"{result['lookup_share_pct']:.3f}%",
                ],
                [
                    f"lookup of {lookup['batch_size']} dataset indices",
                    f"{1e3 * lookup['median_lookup_by_index_s']:.3f}",
                    f"{100 * lookup['median_lookup_by_index_s'] / step['median_step_s']:.3f}%",
                ],
                [
                    f"ResNet-18 forward+backward+SGD, batch {step['batch_size']}, "
                    f"{step['image_size']}x{step['image_size']} px",
                    f"{1e3 * step['median_step_s']:.1f}",
                    "100%",
                ],
            ],
        ),
        f"First lookup in a fresh process (maps the file, reads {lookup['cache_rows']:,} "
        f"keys): {1e3 * lookup['first_lookup_s']:.0f} ms, once per DataLoader worker. "
        f"Goal: lookup < 1% of a step.",
        "",
        "## Opening the cache, by check",
        "",
        f"`CaptionCache.open` of the {lookup['cache_rows']:,}-row cache (median of 3; "
        "the file in the page cache). Every open reads and hashes `keys.json`.",
        "",
        markdown_table(
            ["open(...)", "median ms"],
            [
                [f"`{label}`", f"{1e3 * seconds:.0f}"]
                for label, seconds in lookup["open_s"].items()
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and writes ``caption_cache.json`` and ``caption_cache.md``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--captions", type=int, default=5000, help="captions embedded per build run"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each build variant"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="encoder batch size"
    )
    parser.add_argument("--chunk-size", type=int, default=4096, help="cache chunk size")
    parser.add_argument(
        "--lookup-rows", type=int, default=200_000, help="rows of the lookup cache"
    )
    parser.add_argument("--lookups", type=int, default=300, help="timed lookups")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    build = bench_build(args.captions, args.repeats, args.batch_size, args.chunk_size)
    print(
        f"build: {build['median_s']}, overhead {build['overhead_pct']:+.1f}%",
        flush=True,
    )
    lookup = bench_lookup(args.lookup_rows, 64, args.lookups)
    print(f"lookup: {lookup['median_lookup_by_filename_s'] * 1e3:.3f} ms", flush=True)
    step = bench_train_step(64, 64, args.steps)
    print(f"train step: {step['median_step_s'] * 1e3:.1f} ms", flush=True)
    result = {
        "command": command_line(),
        "environment": environment(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "build": build,
        "lookup": lookup,
        "train_step": step,
        "lookup_share_pct": 100
        * lookup["median_lookup_by_filename_s"]
        / step["median_step_s"],
        "goals_met": {
            "build_within_10pct": abs(build["overhead_pct"]) <= 10.0,
            "lookup_below_1pct_of_step": 100
            * lookup["median_lookup_by_filename_s"]
            / step["median_step_s"]
            < 1.0,
        },
    }
    write_json(args.out / "caption_cache.json", result)
    write_text_atomic(args.out / "caption_cache.md", _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
