"""ClipLoss vs XCLRClipLoss under bf16 autocast: forward + backward, side by side.

Issue 13: under autocast ``ClipLoss`` runs its logit products in low precision;
``XCLRClipLoss`` now does the same (softmax, targets and sums in float32). Each batch
size times, interleaved in one process, open_clip's ``ClipLoss`` and ``XCLRClipLoss``
dense and chunked, with identity targets (``targets=None``) and caption targets
(``Dt = 384``), on features produced under ``torch.autocast(dtype=bfloat16)``.

CPU (default): ``python benchmarks/bench_clip_autocast.py`` writes
``benchmarks/results/clip_autocast.{json,md}``.
GPU (prepared, one short run): ``python benchmarks/bench_clip_autocast.py --device cuda
--batch-sizes 4096 16384 65536 --output clip_autocast_cuda`` (uses chunked only where
the dense ``B x B`` logits would not fit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from xclr_plugin.atomic import write_text_atomic
from xclr_plugin.clip_loss import XCLRClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    command_line,
    environment,
    markdown_table,
    median_seconds,
    write_json,
)

DIM, TEXT_DIM = 512, 384
CASES = (
    "clip",
    "xclr-clip identity",
    "xclr-clip captions",
    "xclr-clip chunked identity",
    "xclr-clip chunked captions",
)


def _step(
    case: str, batch: dict[str, torch.Tensor], device: torch.device, chunk: int
) -> Any:
    if case == "clip":
        loss_fn: torch.nn.Module = ClipLoss()
    else:
        loss_fn = XCLRClipLoss(chunk_size=chunk if "chunked" in case else None)
    targets = batch["captions"] if case.endswith("captions") else None

    def step() -> None:
        image = batch["image"].detach().requires_grad_(True)
        text = batch["text"].detach().requires_grad_(True)
        scale = batch["scale"].detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            kwargs = {} if case == "clip" else {"targets": targets}
            loss = loss_fn(image, text, scale.exp(), **kwargs)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _fits(step: Any, device: torch.device) -> bool:
    """Runs ``step`` once; False if it ran out of (GPU) memory."""
    try:
        step()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False
    return True


def _cell(seconds: float | None, ratio: float | None) -> str:
    if seconds is None:
        return "out of memory"
    return f"{seconds * 1e3:.1f}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_clip_autocast.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1024, 2048, 4096]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--output", default="clip_autocast")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.chunk_size < 1:
        parser.error("--batch-sizes, --repeats and --chunk-size must be >= 1")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rows: list[dict[str, Any]] = []
    for batch_size in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch_size)
        batch = {
            # Normalised float32, as open_clip's models return them under autocast
            # (the norm runs in float32); only the loss is timed.
            "image": F.normalize(torch.randn(batch_size, DIM, generator=gen), dim=1).to(
                device
            ),
            "text": F.normalize(torch.randn(batch_size, DIM, generator=gen), dim=1).to(
                device
            ),
            "scale": torch.tensor(2.659).to(device),  # log(1 / 0.07)
            "captions": torch.randn(batch_size, TEXT_DIM, generator=gen).to(device),
        }
        steps = {c: _step(c, batch, device, args.chunk_size) for c in CASES}
        failed: set[str] = set()
        for case, step in steps.items():  # warm-up; a case that does not fit is noted
            if not _fits(step, device):
                failed.add(case)
        times: dict[str, list[float]] = {c: [] for c in CASES if c not in failed}
        for _ in range(args.repeats):  # interleaved: contention hits every case alike
            for case in times:
                times[case].append(median_seconds(steps[case], repeats=1, warmup=0))
        medians: dict[str, float | None] = dict.fromkeys(CASES)
        medians.update({c: sorted(t)[len(t) // 2] for c, t in times.items()})
        clip = medians["clip"]
        row = {
            "batch_size": batch_size,
            "seconds": medians,
            "ratio_to_clip": {
                c: None if v is None or clip is None else v / clip
                for c, v in medians.items()
            },
        }
        rows.append(row)
        print(
            f"B={batch_size}: "
            + ", ".join(
                f"{c} {'OOM' if v is None else f'{v * 1e3:.1f} ms'}"
                for c, v in medians.items()
            ),
            flush=True,
        )
    payload = {
        "command": command_line(),
        "started": started,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else environment()["processor"],
        "environment": environment(),
        "settings": {
            "dim": DIM,
            "text_dim": TEXT_DIM,
            "autocast": "bfloat16",
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
        },
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.output}.json", payload)
    header = ["B", *(f"{c} ms (x ClipLoss)" for c in CASES)]
    table = [
        [
            str(r["batch_size"]),
            *(_cell(r["seconds"][c], r["ratio_to_clip"][c]) for c in CASES),
        ]
        for r in rows
    ]
    text = (
        f"# ClipLoss vs XCLRClipLoss under bf16 autocast ({device})\n\n"
        f"Command: `{payload['command']}`  \nStarted: {started}; "
        f"{payload['device_name']}, {environment()['threads']} threads. "
        "Forward + backward, D = 512, captions Dt = 384, median of "
        f"{args.repeats} interleaved runs in one process.\n\n"
        + markdown_table(header, table)
    )
    write_text_atomic(RESULTS / f"{args.output}.md", text)


if __name__ == "__main__":
    main()
