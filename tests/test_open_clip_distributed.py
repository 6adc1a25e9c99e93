"""xclr-openclip-train under ``torchrun --nproc_per_node 2`` (gloo, CPU), end to end.

32 drawn images with distinct captions in an open_clip TSV, a caption cache, the tiny
model, one epoch (4 loss calls per rank with ``--accum-freq 2``). Each rank records
what reaches the loss (``_openclip_dist_worker.py``); the sample indices carried with
the batch are the per-sample identity followed through both paths:

- alignment: on every rank and loss call, the text features are those of the samples
  the indices name, the targets are the cache rows of those indices, and after the
  gathers the gathered features and targets are every rank's, in the same rank order;
- parity: the loss equals one process's loss on the concatenated global batch
  (``--local-loss``: the mean of the rank losses does);
- negative control: with one rank's captions shifted by one sample, both fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _clip_helpers import dense_xclr_clip
from _openclip_helpers import (
    TINY,
    common_args,
    register_tiny,
    samples,
    shard_table,
    write_shards,
)

from xclr_plugin.cache import CaptionCache, build_caption_cache
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.cli.embed_captions import main as embed_main
from xclr_plugin.text import TextEncoder

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_openclip_dist_worker.py"
TAU_S = 0.2
WORLD = 2


@dataclass
class Data:
    root: Path
    train: Path
    cache: Path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("ddp")
    register_tiny(root)
    rows, records = ["filepath\ttitle"], []
    for i, (image, caption) in enumerate(samples(32)):
        path = root / f"img{i:02d}.png"
        image.save(path)
        rows.append(f"{path}\t{caption}")
        records.append(CaptionRecord(str(path), caption))
    train = root / "train.tsv"
    train.write_text("\n".join(rows) + "\n")
    cache = root / "cache"
    build_caption_cache(records, cache, TextEncoder(), progress=False)
    return Data(root, train, cache)


def torchrun(
    data: Data,
    name: str,
    *extra: str,
    env: dict[str, str] | None = None,
    train: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Runs the worker on 2 gloo processes; returns each rank's records."""
    out = data.root / name
    out.mkdir()
    csv = ["--train-data", str(data.train), "--dataset-type", "csv", "--workers", "0",
           "--xclr-caption-cache", str(data.cache)]  # fmt: skip
    args = [
        *(train or csv), *common_args(data.root / "logs", name, *extra),
        "--loss", "xclr-clip", "--xclr-target-temperature", str(TAU_S),
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(WORLD),
        str(WORKER), str(out), str(data.root / "configs"), "--", *args,
    ]  # fmt: skip
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    done = subprocess.run(
        command, env=environ, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def misalignments(
    ranks: list[dict[str, Any]],
    cache: CaptionCache | torch.Tensor,
    local_loss: bool,
    caption_ids: Callable[[int, torch.Tensor], torch.Tensor] = lambda rank, ids: ids,
    resampled: bool = False,
) -> list[str]:
    """Every way in which the recorded loss inputs do not line up; empty if aligned.

    ``cache``: the caption row of each sample id. ``caption_ids(rank, ids)``: the
    samples whose captions are expected for ``ids``. ``resampled``: a sample may
    come twice.
    """
    problems: list[str] = []
    calls = [r["calls"] for r in ranks]
    assert len({len(c) for c in calls}) == 1 and len(calls[0]) == 4
    for step in range(len(calls[0])):
        here = [c[step] for c in calls]
        global_ids = torch.cat([h["ids"] for h in here])
        caption_global = torch.cat(
            [caption_ids(r, h["ids"]) for r, h in enumerate(here)]
        )
        if not resampled and len(set(global_ids.tolist())) != len(global_ids):
            problems.append(f"call {step}: a sample on two ranks")
        for rank, h in enumerate(here):
            where = f"call {step}, rank {rank}"
            if h["text_err"] > 1e-4:
                problems.append(f"{where}: text features are not those samples'")
            if not torch.equal(h["targets"], cache[caption_ids(rank, h["ids"])]):
                problems.append(f"{where}: targets are not those samples' captions")
            gathered = h["gathered"]
            assert len(gathered["features"]) == 1 and len(gathered["targets"]) == 1
            all_image, all_text = gathered["features"][0]
            (all_targets,) = gathered["targets"][0]
            for got, key in (
                (all_image, "image_features"),
                (all_text, "text_features"),
            ):
                want = torch.cat([x[key] for x in here])
                if not torch.equal(got, want):
                    problems.append(f"{where}: gathered {key} are not in rank order")
            if not torch.equal(all_targets, cache[caption_global]):
                problems.append(f"{where}: gathered targets are not the samples'")
            h["global"] = dense_xclr_clip(
                all_image.double(),
                all_text.double(),
                h["logit_scale"].double(),
                descriptions=cache[caption_global].double(),
                target_temperature=TAU_S,
            )
        reference = here[0]["global"]
        logged = [h["loss"].double() for h in here]
        checked = [sum(logged) / WORLD] if local_loss else logged
        for value in checked:
            if not torch.allclose(value, reference, rtol=1e-5, atol=1e-6):
                problems.append(
                    f"call {step}: loss {float(value):.6f} != single-process loss "
                    f"on the global batch {float(reference):.6f}"
                )
    return problems


def test_two_processes_local_loss_gather_with_grad_accum(data: Data) -> None:
    ranks = torchrun(
        data, "ddp-local", "--local-loss", "--gather-with-grad", "--accum-freq", "2"
    )
    assert [r["result"] for r in ranks] == [None, None]
    cache = CaptionCache.open(data.cache)
    assert misalignments(ranks, cache, local_loss=True) == []
    seen = torch.cat([c["ids"] for r in ranks for c in r["calls"]])
    assert sorted(set(seen.tolist())) == list(range(32))  # every sample, once per pass
    ckpt = data.root / "logs" / "ddp-local" / "checkpoints" / "epoch_1.pt"
    import open_clip

    # open_clip saves DDP's "module."-prefixed keys and strips them when loading
    open_clip.create_model_and_transforms(TINY, pretrained=str(ckpt))


def test_shifted_captions_on_one_rank_are_caught(data: Data) -> None:
    """Negative control: rank 1 looks up its neighbour's caption for every sample."""
    ranks = torchrun(
        data, "ddp-shifted", "--accum-freq", "2", env={"XCLR_TEST_SHIFT_RANK": "1"}
    )
    problems = misalignments(ranks, CaptionCache.open(data.cache), local_loss=False)
    assert not any("rank 0: targets" in p for p in problems)
    assert all(
        f"call {s}, rank 1: targets are not" in "\n".join(problems) for s in range(4)
    )
    assert sum("gathered targets" in p for p in problems) == 8  # both ranks see it
    assert sum("single-process loss" in p for p in problems) == 8
    # Expecting exactly that shift, everything lines up: the only error is the shift,
    # and without --local-loss each rank's loss is the global batch's loss.
    shifted = misalignments(
        ranks,
        CaptionCache.open(data.cache),
        local_loss=False,
        caption_ids=lambda rank, ids: ids.roll(1) if rank == 1 else ids,
    )
    assert shifted == []


def test_two_processes_webdataset_resampled_with_workers(data: Data) -> None:
    """Shards, --dataset-resampled, 2 workers per rank: every sample's own caption."""
    shards = data.root / "shards"
    write_shards(shards, shards=4, per_shard=8)
    urls, cache = f"{shards}/{{00000..00003}}.tar", data.root / "shard-cache"
    assert (
        embed_main(["--format", "webdataset", urls, "-o", str(cache), "--no-progress"])
        == 0
    )
    train = ["--train-data", urls, "--dataset-type", "webdataset", "--workers", "2",
             "--dataset-resampled", "--train-num-samples", "32",
             "--xclr-caption-cache", str(cache)]  # fmt: skip
    ranks = torchrun(data, "ddp-wds", "--accum-freq", "2", train=train)
    assert [r["result"] for r in ranks] == [None, None]
    _, table = shard_table(cache, urls)
    assert misalignments(ranks, table, local_loss=False, resampled=True) == []
    seen = torch.cat([c["ids"] for r in ranks for c in r["calls"]])
    assert len(set(seen.tolist())) > 12  # samples of several shards and workers
