"""Tests of xclr-train, the drop-in for lightly-ssl-train with a choice of loss."""

from __future__ import annotations

import csv
import importlib
import logging
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightly.cli.config.get_config import get_lightly_config
from lightly.loss import NTXentLoss
from omegaconf import OmegaConf
from PIL import Image

from xclr_plugin.data import XCLRCollate
from xclr_plugin.integrations import lightly_train
from xclr_plugin.integrations.lightly_train import load_config, prepare_targets, train
from xclr_plugin.loss import XCLRLoss
from xclr_plugin.text import TextEncoder

pytestmark = pytest.mark.filterwarnings(
    "ignore:Training a self-supervised model with a small batch size",
    "ignore:Checkpoint directory .* exists and is not empty",
)

CLASSES = ["cat", "dog", "red_car", "tree"]
# Two captions repeat, so rows of the X-CLR graph differ in more than the diagonal.
CAPTIONS = [
    "a cat on a sofa",
    "a dog in the park",
    "a red car on a road",
    "a tall green tree",
    "a cat on a sofa",
    "a sailing boat at sea",
    "a plate of pasta",
    "a dog in the park",
]

# Small and quick, all lightly-ssl-train keys: 32 px images, a quarter-width resnet-18,
# no blur (lightly-ssl-train draws the blur from numpy, which it does not seed).
FAST = [
    "pre_trained=False",
    "collate.input_size=32",
    "collate.gaussian_blur=0",
    "model.width=0.25",
    "model.num_ftrs=16",
    "model.out_dim=16",
    "loader.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=False",
    "+trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=False",
    "seed=3",
]


def _write_images(folder: Path, count: int, seed: int) -> list[str]:
    """Writes random 32x32 PNGs; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / name
        )
        names.append(name)
    return names


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Trains on one thread: on a busy 2-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The packaged all-MiniLM-L6-v2 (offline), loaded once for this module."""
    return TextEncoder()


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images with a filename,caption sidecar ``captions.csv``."""
    folder = tmp_path_factory.mktemp("flat") / "images"
    names = _write_images(folder, 16, seed=0)
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "caption"])
        for i, name in enumerate(names):
            writer.writerow([name, CAPTIONS[i % len(CAPTIONS)]])
    return folder


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 class folders with 4 images each."""
    root = tmp_path_factory.mktemp("classes") / "train"
    for k, name in enumerate(CLASSES):
        _write_images(root / name, 4, seed=10 + k)
    return root


def _run_hydra_entry(
    entry: Callable[[], Any],
    argv: list[str],
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs a hydra console entry in-process, as its console script would.

    Hydra's global state (its config singleton, which Lightning's DDP launcher checks,
    and the logging handlers it installs) is reset afterwards.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        entry()
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def record_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Records what XCLRCollate returns and what XCLRLoss receives and returns."""
    calls: dict[str, list[Any]] = {"collate": [], "loss": []}
    collate, forward = XCLRCollate.__call__, XCLRLoss.forward

    def recording_collate(self: XCLRCollate, batch: Any) -> Any:
        out = collate(self, batch)
        calls["collate"].append((out[1], out[2]))
        return out

    def recording_forward(
        self: XCLRLoss, out0: Any, out1: Any, targets: Any = None
    ) -> Any:
        loss = forward(self, out0, out1, targets)
        calls["loss"].append((targets, loss.detach()))
        return loss

    monkeypatch.setattr(XCLRCollate, "__call__", recording_collate)
    monkeypatch.setattr(XCLRLoss, "forward", recording_forward)
    return calls


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Runs the test in tmp_path (Lightning writes lightning_logs/ to the cwd)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def test_config_is_lightlys_plus_our_keys() -> None:
    ours = OmegaConf.to_container(load_config(), resolve=True)
    theirs = OmegaConf.to_container(get_lightly_config(), resolve=True)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    # Every lightly key is there with lightly's value, except memory_bank_size, whose
    # default "0 = no bank" becomes null = "the loss's default" (DCL has no bank).
    for section, values in theirs.items():
        if isinstance(values, dict):
            for key, value in values.items():
                expected = (
                    None
                    if (section, key) == ("criterion", "memory_bank_size")
                    else value
                )
                assert ours[section][key] == expected, (section, key)
        else:
            assert ours[section] == values, section
    assert ours["criterion"]["name"] == "ntxent"
    assert set(ours) - set(theirs) == {"captions"}
    # lightly-ssl-train overrides keep working; unknown keys are still rejected.
    cfg = load_config(
        ["loader.batch_size=128", "trainer.max_epochs=7", "criterion.name=xclr"]
    )
    assert (cfg.loader.batch_size, cfg.trainer.max_epochs) == (128, 7)
    with pytest.raises(Exception, match=r"criterion\.nme"):
        load_config(["criterion.nme=xclr"])


@pytest.mark.slow
def test_ntxent_reproduces_lightly_ssl_train(
    flat_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same config and seed: xclr-train's losses equal lightly-ssl-train's, step by step."""
    argv = [
        f"input_dir={flat_folder}",
        "loader.batch_size=8",
        *FAST,
        "trainer.max_epochs=2",
    ]
    # Both CLIs build lightly.loss.NTXentLoss (lightly's by import, ours through the
    # registry): record every loss value it computes.
    losses: list[float] = []
    forward = NTXentLoss.forward

    def recording_forward(self: NTXentLoss, out0: Any, out1: Any) -> Any:
        loss = forward(self, out0, out1)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(NTXentLoss, "forward", recording_forward)
    lightly_cli = importlib.import_module("lightly.cli.train_cli")
    _run_hydra_entry(lightly_cli.entry, argv, tmp_path / "lightly", monkeypatch)
    theirs, losses[:] = list(losses), []
    _run_hydra_entry(
        lightly_train.main,
        [*argv, "criterion.name=ntxent"],
        tmp_path / "ours",
        monkeypatch,
    )
    assert len(theirs) == 4  # 2 epochs x 2 batches of 8
    assert losses == theirs
    assert len(set(theirs)) == 4  # the steps really differ (weights and batches move)


def test_xclr_with_captions_trains_an_epoch(
    flat_folder: Path,
    in_tmp: Path,
    record_calls: dict[str, list[Any]],
    encoder: TextEncoder,
) -> None:
    cfg = load_config(
        [
            f"input_dir={flat_folder}",
            "loader.batch_size=8",
            *FAST,
            "criterion.name=xclr",
            "criterion.temperature=0.1",
            f"checkpoint_callback.dirpath={in_tmp / 'ckpt'}",
        ]
    )
    result = train(cfg)

    assert result.loss_name == "xclr"
    assert Path(result.checkpoint).is_file()
    state = torch.load(result.checkpoint, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert np.isfinite(result.metrics["loss"])

    # The loss got the caption embeddings of exactly the batch's images.
    assert len(record_calls["loss"]) == 2
    with open(flat_folder / "captions.csv", newline="") as handle:
        captions = {row["filename"]: row["caption"] for row in csv.DictReader(handle)}
    for (targets, filenames), (seen, loss) in zip(
        record_calls["collate"], record_calls["loss"], strict=True
    ):
        assert seen is targets and targets.shape == (8, encoder.dim)
        expected = encoder.encode([captions[name] for name in filenames])
        torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(loss)
    assert result.metrics["loss"] == pytest.approx(record_calls["loss"][-1][1].item())


def test_supcon_with_class_folders_trains_an_epoch(
    class_folder: Path, in_tmp: Path, record_calls: dict[str, list[Any]]
) -> None:
    # A multi-GPU config (gather_distributed) also runs on a single device.
    with pytest.warns(UserWarning, match="gather_distributed=true has no effect"):
        result = train(
            load_config(
                [
                    f"input_dir={class_folder}",
                    "loader.batch_size=8",
                    *FAST,
                    "criterion.name=supcon",
                    "criterion.gather_distributed=true",
                ]
            )
        )
    assert Path(result.checkpoint).is_file()
    assert np.isfinite(result.metrics["loss"])
    assert len(record_calls["loss"]) == 2
    for (targets, filenames), (seen, loss) in zip(
        record_calls["collate"], record_calls["loss"], strict=True
    ):
        assert seen is targets and targets.dtype == torch.int64
        assert targets.tolist() == [
            CLASSES.index(name.split("/")[0]) for name in filenames
        ]
        assert torch.isfinite(loss)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_cpu_ddp_with_xclr(
    flat_folder: Path, tmp_path: Path, encoder: TextEncoder
) -> None:
    """``xclr-train`` as a command: Lightning DDP, 2 CPU processes (gloo), gathered X-CLR."""
    from xclr_plugin.cache import build_caption_cache
    from xclr_plugin.captions import read_folder_captions

    # A finished cache: the DDP processes open it instead of loading the encoder.
    cache_dir = tmp_path / "cache"
    build_caption_cache(
        read_folder_captions(flat_folder), cache_dir, encoder, progress=False
    )
    script = Path(sysconfig.get_path("scripts")) / "xclr-train"
    command = (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-m", lightly_train.__name__]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = subprocess.run(
        [
            *command,
            f"input_dir={flat_folder}",
            "loader.batch_size=4",
            *FAST,
            "criterion.name=xclr",
            "criterion.gather_distributed=true",
            f"captions.cache_dir={cache_dir}",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
        ],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "Embedding captions" not in log  # nobody re-embedded
    final = [
        line for line in log.splitlines() if line.startswith("Final training loss")
    ]
    assert len(final) == 1 and np.isfinite(float(final[0].rsplit(":", 1)[1]))
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu")
    # 16 images over 2 processes, batches of 4: 2 steps per process.
    assert checkpoint["global_step"] == 2


# -- bad configs: clear errors before any model is built ------------------------------


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a run gets as far as building the model."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the config error was not raised before training")

    monkeypatch.setattr(lightly_train, "_build_model", fail)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["criterion.name=xclr_clip"], ValueError, r"Did you mean 'xclr-clip'\?"),
        (["criterion.name=simclr"], ValueError, "Available losses: .*ntxent"),
        (["criterion.name=clip"], ValueError, "image-text loss"),
        (
            ["+criterion.margin=1"],
            TypeError,
            "Loss 'ntxent' .* It accepts: temperature",
        ),
        (["criterion.name=xclr", "criterion.temperature=0"], ValueError, "temperature"),
        (["criterion.name=xclr"], ValueError, "needs a caption for every image"),
        (
            ["criterion.name=xclr", "captions.format=jsonl"],
            ValueError,
            "captions.source",
        ),
        (["criterion.name=supcon"], ValueError, "class folder"),
        (
            ["criterion.name=xclr", "captions.format=classes"],
            ValueError,
            "no class subfolders",
        ),
    ],
)
def test_bad_config_fails_before_training(
    tmp_path: Path,
    no_training: None,
    overrides: list[str],
    error: type[Exception],
    match: str,
) -> None:
    folder = tmp_path / "images"  # flat, no captions.csv
    _write_images(folder, 4, seed=1)
    with pytest.raises(error, match=match):
        train(load_config([f"input_dir={folder}", *FAST, *overrides]))


def test_captions_not_covering_the_images(tmp_path: Path, no_training: None) -> None:
    folder = tmp_path / "images"
    names = _write_images(folder, 4, seed=2)
    tsv = tmp_path / "train.tsv"  # open_clip CSV naming only 3 of the 4 images
    tsv.write_text(
        "filepath\ttitle\n" + "".join(f"{folder / n}\tcaption {n}\n" for n in names[:3])
    )
    with pytest.raises(
        ValueError, match=r"do not cover the images: 1 of 4 .* '03\.png'"
    ):
        train(
            load_config(
                [
                    f"input_dir={folder}",
                    *FAST,
                    "criterion.name=xclr",
                    f"captions.source={tsv}",
                ]
            )
        )
    sidecar = tmp_path / "side.csv"  # a sidecar with a typo in one name
    sidecar.write_text(
        "filename,caption\n" + "".join(f"{n},c {n}\n" for n in [*names[:3], "3.png"])
    )
    with pytest.raises(ValueError, match=r"'03\.png' .* has no caption"):
        train(
            load_config(
                [
                    f"input_dir={folder}",
                    *FAST,
                    "criterion.name=xclr",
                    f"captions.source={sidecar}",
                ]
            )
        )


def test_caption_files_map_to_the_image_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSV paths (absolute, relative to the cwd or to input_dir) all find their images."""
    from xclr_plugin.cache import CaptionTable

    class FakeEncoder:
        """Stands in for the sentence encoder: one-hot by caption."""

        name, dim = "fake", 4

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def encode(self, texts: list[str]) -> torch.Tensor:
            return torch.eye(4)[[int(t[-1]) for t in texts]]

    monkeypatch.setattr("xclr_plugin.text.TextEncoder", FakeEncoder)
    folder = tmp_path / "data" / "images"
    names = _write_images(folder, 4, seed=3)
    monkeypatch.chdir(tmp_path)
    paths = [
        str(folder / names[0]),
        f"data/images/{names[1]}",
        names[2],
        f"./{names[3]}",
    ]
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "filepath\ttitle\n"
        + "".join(f"{p}\tcaption {i}\n" for i, p in enumerate(paths))
    )
    collate, kind = prepare_targets(
        load_config(
            [f"input_dir={folder}", "criterion.name=xclr", f"captions.source={tsv}"]
        )
    )
    assert kind == "captions" and isinstance(collate, XCLRCollate)
    assert isinstance(collate.captions, CaptionTable)
    torch.testing.assert_close(collate.captions.lookup(names), torch.eye(4))


def test_class_folder_captions_and_python_configs(
    class_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """captions.format=classes captions each image from its folder name; plain dicts
    and the criterion node work as Python configs."""
    from xclr_plugin.registry import build_criterion

    seen: list[str] = []

    class FakeEncoder:
        """Records the captions it embeds."""

        name, dim = "fake", 3

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def encode(self, texts: list[str]) -> torch.Tensor:
            seen.extend(texts)
            return torch.ones(len(texts), 3)

    monkeypatch.setattr("xclr_plugin.text.TextEncoder", FakeEncoder)
    cfg = load_config(
        [
            f"input_dir={class_folder}",
            "criterion.name=xclr",
            "captions.format=classes",
            "captions.template='an image of a {}'",
        ]
    )
    _, kind = prepare_targets(cfg)
    assert kind == "captions"
    assert seen == [
        f"an image of a {name.replace('_', ' ')}" for name in CLASSES for _ in range(4)
    ]

    # The criterion node is a code config: null keys fall back to the loss's defaults.
    loss = build_criterion(cfg.criterion)
    assert isinstance(loss, XCLRLoss)
    assert (loss.temperature, loss.target_temperature) == (0.5, 0.1)
    # A plain nested dict is merged onto the defaults.
    collate, kind = prepare_targets(
        {"input_dir": str(class_folder), "criterion": {"name": "supcon"}}
    )
    assert kind == "labels" and collate.use_labels
