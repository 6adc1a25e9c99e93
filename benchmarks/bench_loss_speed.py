"""Forward+backward time and peak memory: XCLRLoss vs lightly's NTXentLoss vs the floor.

The floor is the bare matrix products an X-CLR loss cannot avoid, on preallocated
inputs: the logits ``Z Z^T`` (2B x 2B x D), the caption similarity ``C C^T``
(B x B x Dt) and the two gradient products ``P Z`` and ``P^T Z``. All three are timed
side by side in one process, interleaved repeat by repeat so that machine load hits
them alike; memory is the growth of the peak resident set of a fresh process running
one forward+backward (see ``_common.peak_rss_delta_mib``).

Usage:
    python benchmarks/bench_loss_speed.py                # B = 512 ... 4096
    python benchmarks/bench_loss_speed.py --batch-sizes 512 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from lightly.loss import NTXentLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin import XCLRLoss
from xclr_plugin.atomic import write_text_atomic

from _common import (
    RESULTS,
    command_line,
    environment,
    markdown_table,
    measure_peak_mib,
    median_seconds,
    peak_rss_delta_mib,
    write_json,
)

DIM, TEXT_DIM = 128, 384
METHODS = ("floor", "ntxent", "xclr")


def make_step(method: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
    """One forward+backward of ``method`` on fixed random inputs."""
    gen = torch.Generator().manual_seed(seed)
    out0 = torch.randn(batch_size, DIM, generator=gen, requires_grad=True)
    out1 = torch.randn(batch_size, DIM, generator=gen, requires_grad=True)
    captions = torch.randn(batch_size, TEXT_DIM, generator=gen)
    if method == "floor":
        z = torch.randn(2 * batch_size, DIM, generator=gen)
        probs = torch.rand(2 * batch_size, 2 * batch_size, generator=gen)

        def floor() -> None:
            torch.mm(z, z.T)
            torch.mm(captions, captions.T)
            torch.mm(probs, z)
            torch.mm(probs.T, z)

        return floor
    if method == "ntxent":
        ntxent = NTXentLoss(temperature=0.1)
        return lambda: ntxent(out0, out1).backward()
    if method == "xclr":
        xclr = XCLRLoss(temperature=0.1, target_temperature=0.1)
        return lambda: xclr(out0, out1, captions).backward()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096]
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(RESULTS / "loss_speed"))
    parser.add_argument(
        "--memory-case", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_case:
        step = make_step(args.memory_case[0], int(args.memory_case[1]))
        step()
        print(measure_peak_mib(step))
        return

    rows = []
    for batch_size in args.batch_sizes:
        steps = {m: make_step(m, batch_size) for m in METHODS}
        for step in steps.values():  # warm-up
            step()
        samples: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for method, step in steps.items():
                samples[method].append(median_seconds(step, repeats=1, warmup=0))
        seconds = {m: sorted(s)[len(s) // 2] for m, s in samples.items()}
        memory = {
            m: peak_rss_delta_mib(__file__, [m, str(batch_size)]) for m in METHODS
        }
        row = {"batch_size": batch_size, "seconds": seconds, "peak_mib": memory}
        row["xclr_over_floor"] = seconds["xclr"] / seconds["floor"]
        row["ntxent_over_floor"] = seconds["ntxent"] / seconds["floor"]
        row["xclr_speedup_over_ntxent"] = seconds["ntxent"] / seconds["xclr"]
        rows.append(row)
        print(
            f"B={batch_size}: floor {seconds['floor'] * 1e3:.0f} ms, ntxent {seconds['ntxent'] * 1e3:.0f} ms "
            f"({row['ntxent_over_floor']:.2f}x), xclr {seconds['xclr'] * 1e3:.0f} ms ({row['xclr_over_floor']:.2f}x); "
            f"peak MiB {memory}",
            flush=True,
        )

    output = Path(args.output)
    payload = {
        "command": command_line(),
        "environment": environment(),
        "dim": DIM,
        "text_dim": TEXT_DIM,
        "repeats": args.repeats,
        "results": rows,
    }
    write_json(output.with_suffix(".json"), payload)
    table = markdown_table(
        [
            "B",
            "floor ms",
            "NTXentLoss ms",
            "XCLRLoss ms",
            "NTXent / floor",
            "XCLR / floor",
            "XCLR speed-up vs NTXent",
            "peak MiB floor / NTXent / XCLR",
        ],
        [
            [
                str(r["batch_size"]),
                f"{r['seconds']['floor'] * 1e3:.0f}",
                f"{r['seconds']['ntxent'] * 1e3:.0f}",
                f"{r['seconds']['xclr'] * 1e3:.0f}",
                f"{r['ntxent_over_floor']:.2f}x",
                f"{r['xclr_over_floor']:.2f}x",
                f"{r['xclr_speedup_over_ntxent']:.2f}x",
                " / ".join(
                    "n/a" if r["peak_mib"][m] is None else f"{r['peak_mib'][m]:.0f}"
                    for m in METHODS
                ),
            ]
            for r in rows
        ],
    )
    header = (
        "# XCLRLoss vs NTXentLoss vs the matrix-product floor (forward + backward)\n\n"
        f"Command: `{command_line()}`\n\nD = {DIM}, Dt = {TEXT_DIM}, median of {args.repeats} interleaved runs, "
        f"{environment()['threads']} torch threads on {environment()['cpu_count']} CPUs, float32. "
        "Peak MiB: growth of the peak resident set of a fresh process over one forward+backward.\n\n"
    )
    write_text_atomic(output.with_suffix(".md"), header + table)


if __name__ == "__main__":
    main()
