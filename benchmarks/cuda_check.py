"""CUDA paths and timings of the losses, for a machine with a GPU (not part of CI).

Checks, on the GPU: XCLRLoss (dense and chunked) equals the CPU float64 computation
(values and gradients), the identity graph equals lightly's NTXentLoss, and under
``torch.autocast`` (float16 and bfloat16) the loss is float32 and finite down to
``temperature=0.01``. Then times forward+backward with bf16 autocast inputs for dense
and chunked X-CLR, NTXentLoss and ClipLoss (and XCLRClipLoss when importable) as the
batch grows, with peak GPU memory from ``torch.cuda.max_memory_allocated``.

Usage (results as JSON and markdown in --output):
    python benchmarks/cuda_check.py --output benchmarks/results
    python benchmarks/cuda_check.py --device cpu --batch-sizes 256 512   # smoke run

ClipLoss vs XCLRClipLoss under bf16 autocast, side by side (issue 13; the GPU half is
prepared, not yet run: a few minutes on one H200, cases that do not fit are recorded as
out of memory):
    python benchmarks/bench_clip_autocast.py --device cuda \
        --batch-sizes 4096 8192 16384 32768 65536 --chunk-size 4096 \
        --output clip_autocast_cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from open_clip.loss import ClipLoss

from xclr_plugin import XCLRLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LOSS_METHODS

DIM, TEXT_DIM = 128, 384


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_correctness(device: torch.device) -> dict[str, Any]:
    """Max abs differences between the device and CPU float64 / lightly."""
    gen = torch.Generator().manual_seed(0)
    out0 = torch.randn(257, 32, generator=gen, dtype=torch.float64)
    out1 = torch.randn(257, 32, generator=gen, dtype=torch.float64)
    targets = {
        "none": None,
        "captions": torch.randn(257, 48, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 9, (257,), generator=gen),
    }
    report: dict[str, Any] = {}

    def value_and_grads(
        loss_fn: torch.nn.Module,
        a: torch.Tensor,
        b: torch.Tensor,
        t: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        a = a.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        loss = loss_fn(a, b) if t is None else loss_fn(a, b, t)
        return [
            loss.detach().cpu(),
            *(g.cpu() for g in torch.autograd.grad(loss, [a, b])),
        ]

    for kind, t in targets.items():
        expected = value_and_grads(XCLRLoss(0.1, 0.1), out0, out1, t)
        for chunk in (None, 64):
            actual = value_and_grads(
                XCLRLoss(0.1, 0.1, chunk_size=chunk),
                out0.to(device),
                out1.to(device),
                None if t is None else t.to(device),
            )
            report[f"float64 {kind} chunk={chunk}: max abs diff vs CPU"] = max(
                float((x - y).abs().max())
                for x, y in zip(actual, expected, strict=True)
            )
    a32, b32 = out0.float().to(device), out1.float().to(device)
    report["float32 identity vs NTXentLoss: max abs diff"] = max(
        float((x - y).abs().max())
        for x, y in zip(
            value_and_grads(XCLRLoss(0.1), a32, b32, None),
            value_and_grads(NTXentLoss(0.1), a32, b32, None),
            strict=True,
        )
    )
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, DIM).to(device)
        x0, x1 = (
            torch.randn(512, 64, device=device),
            torch.randn(512, 64, device=device),
        )
        captions = torch.randn(512, TEXT_DIM, device=device)
        for chunk in (None, 128):
            model.zero_grad()
            with torch.autocast(device.type, dtype=dtype):
                loss = XCLRLoss(temperature=0.01, chunk_size=chunk)(
                    model(x0), model(x1), captions.to(dtype)
                )
            loss.backward()
            grads_finite = all(
                bool(torch.isfinite(p.grad).all())
                for p in model.parameters()
                if p.grad is not None
            )
            report[f"autocast {dtype} tau=0.01 chunk={chunk}"] = {
                "loss_dtype": str(loss.dtype),
                "loss": float(loss),
                "finite": bool(torch.isfinite(loss)) and grads_finite,
            }
    return report


def make_step(
    method: str, batch_size: int, device: torch.device, chunk: int
) -> Callable[[], None]:
    gen = torch.Generator(device=device).manual_seed(0)
    a = (
        torch.randn(batch_size, DIM, generator=gen, device=device)
        .bfloat16()
        .requires_grad_(True)
    )
    b = (
        torch.randn(batch_size, DIM, generator=gen, device=device)
        .bfloat16()
        .requires_grad_(True)
    )
    captions = torch.randn(
        batch_size, TEXT_DIM, generator=gen, device=device
    ).bfloat16()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if method.startswith("xclr-clip"):
        from xclr_plugin.clip_loss import XCLRClipLoss

        clip_x = XCLRClipLoss(chunk_size=chunk if method.endswith("chunked") else None)

        def step_clip_x() -> None:
            with autocast:
                loss = clip_x(
                    F.normalize(a, dim=1),
                    F.normalize(b, dim=1),
                    scale,
                    targets=captions,
                )
            loss.backward()

        return step_clip_x
    loss_fn: torch.nn.Module
    if method.startswith("xclr"):
        loss_fn = XCLRLoss(chunk_size=chunk if method == "xclr-chunked" else None)

        def step_xclr() -> None:
            with autocast:
                loss = loss_fn(a, b, captions)
            loss.backward()

        return step_xclr
    if method == "ntxent":
        loss_fn = NTXentLoss(temperature=0.1)
    elif method == "clip":
        clip = ClipLoss()

        def step_clip() -> None:
            with autocast:
                loss = clip(F.normalize(a, dim=1), F.normalize(b, dim=1), scale)
            loss.backward()

        return step_clip
    else:
        raise ValueError(method)

    def step_plain() -> None:
        with autocast:
            loss = loss_fn(a, b)
        loss.backward()

    return step_plain


def time_case(
    step: Callable[[], None], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds and peak memory (MiB) above the inputs."""
    step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    peak = (
        (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if device.type == "cuda"
        else float("nan")
    )
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536]
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(LOSS_METHODS),
    )
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "command": "python benchmarks/cuda_check.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k != "methods"
        ),
    }
    report["correctness"] = check_correctness(device)
    print(json.dumps(report["correctness"], indent=1), flush=True)
    rows = []
    failed: set[str] = set()
    for batch_size in args.batch_sizes:
        for method in args.methods:
            if method in failed:
                continue
            try:
                seconds, peak = time_case(
                    make_step(method, batch_size, device, args.chunk_size),
                    device,
                    args.repeats,
                )
                row: dict[str, Any] = {
                    "method": method,
                    "batch_size": batch_size,
                    "ms": seconds * 1e3,
                    "peak_mib": peak,
                }
            except torch.OutOfMemoryError:
                failed.add(method)
                row = {
                    "method": method,
                    "batch_size": batch_size,
                    "error": "out of memory",
                }
            except Exception as exc:  # recorded, not fatal: the other cases still run
                failed.add(method)
                row = {
                    "method": method,
                    "batch_size": batch_size,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    "trace": traceback.format_exc()[-800:],
                }
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["timings"] = rows
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2) + "\n")
    cell = {(r["method"], r["batch_size"]): r for r in rows}
    lines = [
        f"# CUDA check on {name} (torch {torch.__version__})\n",
        f"Command: `{report['command']}`\n",
        "## Correctness\n",
        "```json\n" + json.dumps(report["correctness"], indent=1) + "\n```\n",
        "## Forward+backward, bf16 autocast inputs (loss computed in float32)\n",
        f"Median of {args.repeats} runs; peak = max_memory_allocated above the inputs.\n",
        "| B | " + " | ".join(args.methods) + " |",
        "|---|" + "---|" * len(args.methods),
    ]
    for b in args.batch_sizes:
        cells = []
        for m in args.methods:
            r = cell.get((m, b))
            cells.append(
                "-"
                if r is None
                else r.get("error", "") or f"{r['ms']:.1f} ms / {r['peak_mib']:.0f} MiB"
            )
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    (out / "cuda_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
