"""Caption targets from webdataset shards: reading captions vs embedding them.

The question (issue 13): for a user with 3 M captions in img2dataset shards, is a cache
built once from the shards (``xclr-embed-captions --format webdataset``) bounded by the
sentence encoder's own throughput, and what would embedding each batch's captions on the
fly cost instead? Measured on the same machine:

1. ``read_webdataset_captions`` over local shards (seeks over the images, reads the
   tar headers and the ``.txt`` members): samples/s. This is also the check
   ``xclr-openclip-train`` runs over the training shards before training.
2. For comparison, streaming every byte of the same shards through webdataset's
   ``tar_file_expander`` (what a ``pipe:`` URL costs).
3. The sentence encoder (packaged all-MiniLM-L6-v2, ``TextEncoder``) on the same
   captions: captions/s.

Shards hold ``KEY.jpg`` (random bytes of ``--image-kib`` KiB; the reader never decodes
them), ``KEY.txt`` and ``KEY.json``, as img2dataset writes them.

Usage:
    python benchmarks/bench_shard_captions.py
    python benchmarks/bench_shard_captions.py --shards 20 --per-shard 1000 --encode 1024
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xclr_plugin.atomic import write_text_atomic
from xclr_plugin.captions.shards import read_webdataset_captions
from xclr_plugin.text import TextEncoder

from _common import RESULTS, command_line, environment, markdown_table, write_json

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "dog",
    "cat",
    "house",
    "tree",
    "car",
    "street",
    "city",
    "beach",
    "people",
    "man",
    "woman",
    "child",
    "playing",
    "standing",
    "sitting",
    "near",
    "with",
    "on",
    "in",
    "front",
]


def write_shards(folder: Path, shards: int, per_shard: int, image_kib: int) -> str:
    import webdataset

    rng = random.Random(0)
    payload = os.urandom(image_kib * 1024)
    for s in range(shards):
        with webdataset.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = " ".join(rng.choices(WORDS, k=rng.randint(6, 16)))
                sink.write(
                    {
                        "__key__": key,
                        "jpg": payload,
                        "txt": caption,
                        "json": json.dumps({"key": key, "caption": caption}).encode(),
                    }
                )
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def stream_all(urls: str) -> int:
    """Samples with a caption when every byte is read (webdataset's tar expander)."""
    from webdataset.tariterators import tar_file_expander, url_opener

    count = 0
    for sample in tar_file_expander(url_opener([{"url": u} for u in _expand(urls)])):
        count += sample["fname"].endswith(".txt")
    return count


def _expand(urls: str) -> list[str]:
    from xclr_plugin.captions.shards import expand_shard_urls

    return expand_shard_urls(urls)


def drop_page_cache(paths: list[str]) -> bool:
    """Asks the kernel to forget the shards' pages (cold read); False if it cannot."""
    ok = True
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--image-kib", type=int, default=16)
    parser.add_argument("--encode", type=int, default=1024, help="captions embedded")
    parser.add_argument("--device", default="cpu", help="sentence encoder device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "command": command_line(),
        "environment": environment(),
        "load_start": os.getloadavg(),
        "shards": args.shards,
        "per_shard": args.per_shard,
        "image_kib": args.image_kib,
    }
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), args.shards, args.per_shard, args.image_kib)
        paths = _expand(urls)
        total_mib = sum(os.path.getsize(p) for p in paths) / 2**20
        read_times: list[float] = []
        cold_times: list[float] = []
        stream_times: list[float] = []
        parallel_times: list[float] = []
        workers = min(8, os.cpu_count() or 1)
        records: list[Any] = []
        for _ in range(args.repeats):
            cold = drop_page_cache(paths)
            start = time.perf_counter()
            records = read_webdataset_captions(urls, workers=1)
            (cold_times if cold else read_times).append(time.perf_counter() - start)
            start = time.perf_counter()
            records = read_webdataset_captions(urls, workers=1)
            read_times.append(time.perf_counter() - start)
            if workers > 1:
                start = time.perf_counter()
                assert len(read_webdataset_captions(urls, workers=workers)) == len(
                    records
                )
                parallel_times.append(time.perf_counter() - start)
            drop_page_cache(paths)
            start = time.perf_counter()
            assert stream_all(urls) == len(records)
            stream_times.append(time.perf_counter() - start)
        n = len(records)
        captions = [r.caption for r in records[: args.encode]]
        encoder = TextEncoder(device=args.device, show_progress=False)
        encoder.encode(captions[:64])  # warm-up (model load, kernels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        encoder.encode(captions)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        encode_s = time.perf_counter() - start

    def rate(seconds: list[float], count: int) -> float:
        return count / min(seconds) if seconds else float("nan")

    rows = {
        "read captions (page cache warm)": rate(read_times, n),
        "read captions (page cache dropped)": rate(cold_times, n),
        f"read captions, {workers} processes (page cache warm)": rate(
            parallel_times, n
        ),
        "stream every byte (page cache dropped)": rate(stream_times, n),
        f"embed captions ({encoder.name}, {args.device}, batch {encoder.batch_size})": (
            len(captions) / encode_s
        ),
    }
    result.update(
        samples=n,
        shards_mib=total_mib,
        samples_per_s=rows,
        load_end=os.getloadavg(),
        projected_3m_seconds={k: 3_000_000 / v for k, v in rows.items()},
    )
    table = markdown_table(
        ["what", "samples/s", "3 M samples would take"],
        [
            [k, f"{v:,.0f}", f"{3_000_000 / v / 60:,.1f} min"]
            for k, v in rows.items()
            if v == v
        ],
    )
    encode_rate = rows[next(k for k in rows if k.startswith("embed"))]
    read_rate = rows["read captions (page cache dropped)"]
    if read_rate != read_rate:
        read_rate = rows["read captions (page cache warm)"]
    text = (
        "# Caption targets from webdataset shards: reading vs embedding\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Machine: {result['environment']['cpu_count']} CPUs, torch "
        f"{result['environment']['torch']}, {result['environment']['threads']} threads; "
        f"load average {[round(x, 2) for x in result['load_start']]} at start, "
        f"{[round(x, 2) for x in result['load_end']]} at end (other jobs shared the "
        "machine). Best of the repeats.\n\n"
        f"{args.shards} shards x {args.per_shard} samples ({n} samples, "
        f"{total_mib:.0f} MiB; `KEY.jpg` of {args.image_kib} KiB, `KEY.txt`, "
        f"`KEY.json`), local disk.\n\n"
        + table
        + f"\nReading the captions takes {100 * encode_rate / read_rate:.1f}% of the "
        "time the encoder needs for the same captions: building the cache is bound by "
        "the encoder's throughput, and the pre-training key check of the shards costs "
        "the 'read captions' line.\n\n"
        "Decision: a cache built once from the shards (`xclr-embed-captions --format "
        "webdataset SHARDS -o DIR`, looked up by `__key__`). Embedding each batch's "
        f"captions on the fly would add {256 / encode_rate:.2f} s to every training "
        f"step of batch 256 on this device ({args.device}), every epoch; a cache "
        "lookup of 64 rows costs 0.2 ms (`caption_cache.md`).\n"
    )
    name = "shard_captions" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{name}.json", result)
    write_text_atomic(RESULTS / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
