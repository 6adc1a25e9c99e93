"""``xclr-embed-captions --format webdataset``: one process, or any number under torchrun.

Under ``torchrun`` each process embeds shard i when i mod world size is its rank, on
its own device (``--device cuda`` means ``cuda:LOCAL_RANK``); a shared file system and
torch.distributed (gloo, for the progress counts and the index) are all it needs. A
killed job, started again, redoes only the shards whose files are missing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from xclr_plugin.cache.shards import (
    ShardCache,
    embed_shards,
    prepare_shard_cache,
    publish_index,
    unique_shards,
)
from xclr_plugin.captions.shards import expand_shard_urls, local_path


def _on_rank0(rank: int, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result (or its error, raised again) on every rank."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", work())
        except (ValueError, OSError) as err:
            box[0] = ("error", err)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def build_shards(
    source: str,
    output: Path,
    make_encoder: Callable[[str], Any],
    *,
    device: str = "cpu",
    dtype: str = "float16",
    caption_key: str = "txt",
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Embeds the shards of ``source`` into ``output`` (``make_encoder(device)``); 0 when done."""
    urls = expand_shard_urls(source)
    count = len(unique_shards(urls))  # names checked before any work
    missing = [u for u in urls if (p := local_path(u)) and not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(urls)} shard(s) do not exist, the first is "
            f"{missing[0]!r}."
        )
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")  # coordination only: each process encodes alone
        if device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        start = time.perf_counter()
        encoder = make_encoder(device)
        begun = time.perf_counter()  # the rate leaves out loading the encoder
        manifest = _on_rank0(
            rank,
            lambda: prepare_shard_cache(
                output,
                encoder,
                dtype=dtype,
                caption_key=caption_key,
                overwrite=overwrite,
            ),
        )
        bar = tqdm(
            total=count,
            unit="shard",
            desc="Embedding shards",
            disable=not progress or rank != 0,
        )
        rounds, totals = math.ceil(count / world), torch.zeros(2, dtype=torch.int64)

        def step(done: int) -> None:
            # Every process calls this once per round (padding after its last shard),
            # so the counts are all-reduced in lockstep.
            counts = torch.tensor([1 if done >= 0 else 0, max(done, 0)])
            if dist.is_initialized():
                dist.all_reduce(counts)
            totals.add_(counts)
            bar.update(int(counts[0]))
            rate = int(totals[1]) / max(time.perf_counter() - begun, 1e-9)
            bar.set_postfix(captions=int(totals[1]), per_s=f"{rate:.0f}")

        calls = 0

        def on_shard(url: str, done: int) -> None:
            nonlocal calls
            calls += 1
            step(done)

        entries = embed_shards(
            urls,
            output,
            encoder,
            manifest,
            rank=rank,
            world_size=world,
            on_shard=on_shard,
        )
        for _ in range(rounds - calls):
            step(-1)
        bar.close()
        gathered: list[Any] = [entries]
        if dist.is_initialized():
            gathered = [None] * world if rank == 0 else []
            dist.gather_object(entries, gathered if rank == 0 else None, dst=0)

        def publish() -> int:
            merged = {k: v for part in gathered for k, v in part.items()}
            publish_index(output, merged)
            ShardCache.open(output, urls)  # every shard there, none changed
            return sum(e["count"] for e in merged.values())

        rows = _on_rank0(rank, publish)
        if rank == 0:
            print(
                f"Shard caption cache ready: {rows} embeddings of {count} "
                f"shard(s) ({manifest['dim']}-d {manifest['dtype']}, encoder "
                f"{manifest['encoder']}) in {output}; {int(totals[1])} "
                f"captions embedded now by {world} process(es) in "
                f"{time.perf_counter() - start:.1f} s."
            )
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
