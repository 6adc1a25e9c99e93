"""Time and peak memory of contrastive losses as the batch grows (issue 7).

Compares dense X-CLR, chunked X-CLR (``chunk_size``), lightly's ``NTXentLoss`` and
open_clip's ``ClipLoss`` (and ``XCLRClipLoss`` dense/chunked when it is installed), one
forward+backward each, float32, D = 128. Every (method, B) runs in a fresh process with
an address-space cap (``--memory-budget-gib``), so a case that does not fit fails
cleanly instead of swapping the machine; it is then reported as "does not fit".

Usage:
    python benchmarks/bench_loss_scaling.py
    python benchmarks/bench_loss_scaling.py --batch-sizes 1024 4096 --methods xclr-dense xclr-chunked
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin.atomic import atomic_path, write_text_atomic

from _common import (
    LOSS_METHODS,
    RESULTS,
    command_line,
    environment,
    markdown_table,
    measure_peak_mib,
    median_seconds,
    write_json,
)

DIM, TEXT_DIM, CHUNK = 128, 384, 1024
METHODS = LOSS_METHODS


def make_step(method: str, batch_size: int) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(
        torch.randn(batch_size, DIM, generator=gen), dim=1
    ).requires_grad_(True)
    b = torch.nn.functional.normalize(
        torch.randn(batch_size, DIM, generator=gen), dim=1
    ).requires_grad_(True)
    captions = torch.randn(batch_size, TEXT_DIM, generator=gen)
    scale = torch.tensor(10.0, requires_grad=True)
    if method.startswith("xclr-clip"):
        from xclr_plugin.clip_loss import XCLRClipLoss

        clip_loss = XCLRClipLoss(
            chunk_size=CHUNK if method.endswith("chunked") else None
        )
        return lambda: clip_loss(a, b, scale, targets=captions).backward()
    if method.startswith("xclr"):
        from xclr_plugin import XCLRLoss

        xclr = XCLRLoss(chunk_size=CHUNK if method == "xclr-chunked" else None)
        return lambda: xclr(a, b, captions).backward()
    if method == "ntxent":
        from lightly.loss import NTXentLoss

        ntxent = NTXentLoss(temperature=0.1)
        return lambda: ntxent(a, b).backward()
    if method == "clip":
        from open_clip.loss import ClipLoss

        clip = ClipLoss()
        return lambda: clip(a, b, scale).backward()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_case(method: str, batch_size: int, repeats: int) -> dict[str, Any]:
    step = make_step(method, batch_size)
    step()  # warm-up: thread pools and library workspaces are not the loss's memory
    peak = measure_peak_mib(step)
    seconds = median_seconds(step, repeats=repeats, warmup=0)
    return {"peak_mib": peak, "seconds": seconds}


def run_in_child(
    method: str, batch_size: int, repeats: int, budget_gib: float, timeout: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        method,
        str(batch_size),
        str(repeats),
        str(budget_gib),
    ]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        fits = "memory" not in tail.lower() and "alloc" not in tail.lower()
        return {"error": tail[:200] if fits else f"does not fit in {budget_gib:g} GiB"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _cap_address_space(budget_gib: float) -> None:
    """Caps this process's address space at what it maps now plus the budget."""
    with open("/proc/self/status") as status:
        vm_size_kib = next(
            int(line.split()[1]) for line in status if line.startswith("VmSize:")
        )
    limit = vm_size_kib * 1024 + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in sorted({r["method"] for r in rows}, key=METHODS.index):
        pts = [
            (r["batch_size"], r["peak_mib"], r["seconds"])
            for r in rows
            if r["method"] == method and "seconds" in r
        ]
        if not pts:
            continue
        bs, mem, sec = zip(*pts, strict=True)
        ax_mem.plot(bs, mem, marker="o", label=method)
        ax_time.plot(bs, sec, marker="o", label=method)
    for ax, label in (
        (ax_mem, "peak memory growth (MiB)"),
        (ax_time, "forward+backward (s)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (2B views for two-view losses)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    fig.suptitle(f"Contrastive losses on CPU, D={DIM}, float32 (chunk_size={CHUNK})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--memory-budget-gib", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--output", default=str(RESULTS / "loss_scaling"))
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        method, batch_size, repeats, budget = args.case
        _cap_address_space(float(budget))
        print(json.dumps(run_case(method, int(batch_size), int(repeats))))
        return

    rows: list[dict[str, Any]] = []
    skip: set[str] = set()
    for batch_size in args.batch_sizes:
        repeats = 5 if batch_size <= 4096 else 3 if batch_size <= 8192 else 2
        for method in args.methods:
            if method in skip:
                rows.append(
                    {
                        "method": method,
                        "batch_size": batch_size,
                        "error": "a smaller batch already did not fit",
                    }
                )
                continue
            result = run_in_child(
                method, batch_size, repeats, args.memory_budget_gib, args.timeout
            )
            if "error" in result:
                skip.add(method)
            rows.append(
                {
                    "method": method,
                    "batch_size": batch_size,
                    "repeats": repeats,
                    **result,
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    output = Path(args.output)
    write_json(
        output.with_suffix(".json"),
        {
            "command": command_line(),
            "environment": environment(),
            "dim": DIM,
            "text_dim": TEXT_DIM,
            "chunk_size": CHUNK,
            "memory_budget_gib": args.memory_budget_gib,
            "results": rows,
        },
    )
    plot(rows, output.with_suffix(".png"))
    cell = {(r["method"], r["batch_size"]): r for r in rows}
    table = markdown_table(
        ["B", *args.methods],
        [
            [str(b)]
            + [
                (
                    f"{cell[(m, b)]['seconds']:.2f} s / {cell[(m, b)]['peak_mib']:.0f} MiB"
                    if "seconds" in cell[(m, b)]
                    else cell[(m, b)]["error"]
                )
                for m in args.methods
            ]
            for b in args.batch_sizes
        ],
    )
    header = (
        "# Loss time and peak memory vs batch size (forward + backward)\n\n"
        f"Command: `{command_line()}`\n\nEach cell: median time / growth of the peak resident set of a fresh "
        f"process, float32, D = {DIM}, Dt = {TEXT_DIM}, chunk_size = {CHUNK}, "
        f"{environment()['cpu_count']} CPUs, address space capped at {args.memory_budget_gib:g} GiB above the "
        "process's baseline. Plot: `loss_scaling.png`.\n\n"
    )
    write_text_atomic(output.with_suffix(".md"), header + table)


if __name__ == "__main__":
    main()
