"""Tests of xclr-train, the drop-in for lightly-ssl-train with a choice of loss."""

from __future__ import annotations

import csv
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightly.cli.config.get_config import get_lightly_config
from lightly.loss import NTXentLoss
from omegaconf import OmegaConf
from PIL import Image

from xclr_plugin.cli import train as cli_train
from xclr_plugin.data import XCLRCollate
from xclr_plugin.integrations.lightly_train import (
    load_config,
    parse_config,
    prepare_targets,
    train,
    training,
)
from xclr_plugin.integrations.lightly_train.config import (
    CriterionConfig,
    ModelConfig,
)
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
    """Records what XCLRCollate returns and what XCLRLoss receives and returns.

    Only training steps: the trial step xclr-train runs before training (under
    ``torch.no_grad``) is left out.
    """
    calls: dict[str, list[Any]] = {"collate": [], "loss": []}
    collate, forward = XCLRCollate.__call__, XCLRLoss.forward

    def recording_collate(self: XCLRCollate, batch: Any) -> Any:
        out = collate(self, batch)
        if torch.is_grad_enabled():
            calls["collate"].append((out[1], out[2]))
        return out

    def recording_forward(
        self: XCLRLoss, out0: Any, out1: Any, targets: Any = None
    ) -> Any:
        loss = forward(self, out0, out1, targets)
        if torch.is_grad_enabled():
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
    assert set(ours) - set(theirs) == {"captions", "check_images"}
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
    # registry): record every loss value of a training step (xclr-train's trial step
    # before training runs under no_grad, with its own model).
    losses: list[float] = []
    forward = NTXentLoss.forward

    def recording_forward(self: NTXentLoss, out0: Any, out1: Any) -> Any:
        loss = forward(self, out0, out1)
        if torch.is_grad_enabled():
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(NTXentLoss, "forward", recording_forward)
    lightly_cli = importlib.import_module("lightly.cli.train_cli")
    _run_hydra_entry(lightly_cli.entry, argv, tmp_path / "lightly", monkeypatch)
    theirs, losses[:] = list(losses), []
    _run_hydra_entry(
        cli_train.main,
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


# -- bad configs: clear errors before any model is built ------------------------------


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a run gets past the checks (to seeding and training)."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the config error was not raised before training")

    monkeypatch.setattr(training, "fit", fail)
    monkeypatch.setattr(cli_train, "fit", fail)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["criterion.name=xclr_clip"], ValueError, r"Did you mean 'xclr-clip'\?"),
        (["criterion.name=simclr"], ValueError, "Available losses: .*ntxent"),
        (["criterion.name=clip"], ValueError, "image-text loss"),
        (
            ["+criterion.margin=1"],
            TypeError,
            r"ntxent .* does not take criterion\.margin\. It accepts: criterion\.temp",
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
    with pytest.raises(ValueError, match=r"no caption, e\.g\. '03\.png'"):
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


# -- the command: one line, status 2, before training ---------------------------------


def _folder_with(tmp_path: Path, name: str, count: int) -> Path:
    """A flat folder of ``count`` images with a covering captions.csv."""
    folder = tmp_path / name
    names = _write_images(folder, count, seed=4)
    (folder / "captions.csv").write_text(
        "filename,caption\n" + "".join(f"{n},a caption of {n}\n" for n in names)
    )
    return folder


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """Folders a new user might point xclr-train at by mistake."""
    good = _folder_with(tmp_path, "good", 4)
    corrupt = _folder_with(tmp_path, "corrupt", 4)
    (corrupt / "02.png").write_bytes(b"this is not a png" * 8)
    truncated = _folder_with(tmp_path, "truncated", 4)
    data = (truncated / "01.png").read_bytes()
    (truncated / "01.png").write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("no images here")
    partial = tmp_path / "partial"  # captions for 3 of 4 images
    names = _write_images(partial, 4, seed=5)
    (partial / "captions.csv").write_text(
        "filename,caption\n" + "".join(f"{n},c\n" for n in names[:3])
    )
    one_class = tmp_path / "one_class"
    _write_images(one_class / "cat", 4, seed=6)
    loop = _folder_with(tmp_path, "loop", 4)  # torchvision would read 4 images 40 times
    (loop / "again").symlink_to(loop, target_is_directory=True)
    dangling = _folder_with(tmp_path, "dangling", 4)
    (dangling / "04.png").symlink_to(tmp_path / "nowhere.png")
    zero = _folder_with(tmp_path, "zero", 4)
    (zero / "04.png").write_bytes(b"")
    # Issue 21, wrong 5: 4 top-level images and 12 in subfolders, all captioned;
    # LightlyDataset lists only the 12 (torchvision's ImageFolder).
    nested = tmp_path / "nested"
    names = [*_write_images(nested, 4, seed=7)]
    for sub in ("a", "b", "c"):
        names += [f"{sub}/{n}" for n in _write_images(nested / sub, 4, seed=8)]
    rows = "".join(f"{n},a caption of {n}\n" for n in names)
    (nested / "captions.csv").write_text("filename,caption\n" + rows)
    (tmp_path / "nested.tsv").write_text(
        "filepath\ttitle\n" + "".join(f"{nested / n}\tcaption {n}\n" for n in names)
    )
    deleted = _folder_with(tmp_path, "deleted", 4)  # a row for a deleted image
    with open(deleted / "captions.csv", "a") as handle:
        handle.write("gone.png,a caption of a deleted image\n")
    twice = _folder_with(tmp_path, "twice", 4)  # wrong 4: one image, two spellings
    with open(twice / "captions.csv", "a") as handle:
        handle.write("./00.png,a second caption\n")
    other = ModelConfig(width=0.5, num_ftrs=16, out_dim=16)  # FAST's is 0.25 wide
    weights = training.build_model(other).state_dict()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in weights.items()}},
        tmp_path / "other.ckpt",
    )
    return {
        "good": good,
        "corrupt": corrupt,
        "truncated": truncated,
        "empty": empty,
        "texts": texts,
        "partial": partial,
        "one_class": one_class,
        "one": _folder_with(tmp_path, "one", 1),
        "loop": loop,
        "dangling": dangling,
        "zero": zero,
        "missing": tmp_path / "missing",
        "nested": nested,
        "deleted": deleted,
        "twice": twice,
    }


# (folder, overrides, words the one error line must hold)
CLI_ERRORS: list[tuple[str | None, list[str], list[str]]] = [
    (None, [], ["input_dir is not set"]),
    ("missing", [], ["input_dir", "missing", "does not exist"]),
    ("empty", [], ["input_dir", "holds no image files"]),
    ("texts", [], ["input_dir", "holds no image files"]),
    ("corrupt", [], ["02.png", "cannot be read", "UnidentifiedImageError"]),
    ("truncated", [], ["01.png", "cannot be read"]),
    ("good", ["criterion.name=xclr_clip"], ["Did you mean 'xclr-clip'?"]),
    ("good", ["criterion.name=clip"], ["image-text loss"]),
    ("texts", ["criterion.name=xclr"], ["holds no image files"]),
    ("one_class", ["criterion.name=xclr"], ["needs a caption for every image"]),
    ("partial", ["criterion.name=xclr"], ["'03.png'", "have no caption"]),
    ("one_class", ["criterion.name=supcon"], ["1 class folder(s)", "at least 2"]),
    ("good", ["criterion.temperature=abc"], ["criterion.temperature", "'abc'"]),
    ("good", ["criterion.temperature=0"], ["criterion", "temperature"]),
    ("good", ["+criterion.foo=1"], ["does not take criterion.foo."]),
    ("good", ["trainer.max_epochs=abc"], ["trainer.max_epochs", "'abc'"]),
    ("good", ["trainer.max_epochs=0"], ["trainer.max_epochs", "got 0"]),
    ("good", ["trainer.max_epochs=-3"], ["trainer.max_epochs", "got -3"]),
    ("good", ["loader.batch_size=1"], ["loader.batch_size=1", "at least 2"]),
    ("good", ["loader.batch_size=2.5"], ["loader.batch_size", "2.5"]),
    ("good", ["loader.num_workers=many"], ["loader.num_workers", "'many'"]),
    ("one", [], ["holds 1 image", "at least 2"]),
    ("good", ["optimizer.lr=-1"], ["optimizer.lr", "got -1"]),
    ("good", ["+optimizer.momentum=-1"], ["optimizer:", "momentum"]),
    ("good", ["model.name=resnet-7"], ["model.name", "resnet-7"]),
    ("good", ["model.width=0"], ["model.width", "got 0"]),
    ("good", ["collate.input_size=-4"], ["collate.input_size", "got -4"]),
    ("good", ["collate.cj_prob=abc"], ["collate:", "trial step"]),
    ("good", ["+collate.foo=1"], ["collate:", "foo"]),
    ("good", ["seed=abc"], ["seed", "'abc'"]),
    ("good", ["+trainer.foo=1"], ["trainer:", "foo"]),
    ("good", ["trainer.accelerator=tpux"], ["trainer:", "tpux"]),
    ("good", ["+checkpoint_callback.foo=1"], ["checkpoint_callback:", "foo"]),
    ("good", ["criterion.memory_bank_size=16"], ["criterion.memory_bank_size"]),
    ("good", ["captions.format=yaml", "criterion.name=xclr"], ["captions.format"]),
    # Found beyond the list.
    ("loop", [], ["again leads to", "read more than once"]),
    ("dangling", [], ["04.png", "cannot be read", "FileNotFoundError"]),
    ("zero", [], ["04.png", "cannot be read"]),
    ("good", ["seed=-1"], ["seed", "got -1"]),
    ("good", ["checkpoint=/nonexistent.ckpt"], ["checkpoint", "nonexistent.ckpt"]),
    ("good", ["checkpoint_callback.dirpath=/proc/x"], ["dirpath=/proc/x", "cannot be"]),
    ("good", ["+loader.foo=1"], ["loader:", "foo"]),
    ("good", ["trainer.devices=abc"], ["trainer:", "devices"]),
    ("good", ["trainer.precision=17"], ["trainer:", "Precision 17"]),
    ("good", ["criterion.temperature=nan"], ["criterion.temperature", "nan"]),
    (
        "good",
        ["criterion.name=xclr", "captions.encoder=/nonexistent"],
        ["captions: embedding the captions failed", "/nonexistent"],
    ),
    # Issue 21 (the runs' cwd is tmp_path/run<i>, so ../ is tmp_path).
    (
        "nested",
        ["criterion.name=xclr"],
        ["captions.csv names 4 image(s)", "'00.png'", "the file exists", "subfolders"],
    ),
    (
        "nested",
        ["criterion.name=xclr", "captions.source=../nested.tsv"],
        ["names 4 image(s)", "nested/00.png'", "lists only the images inside them"],
    ),
    ("deleted", ["criterion.name=xclr"], ["'gone.png'", "there is no such file"]),
    (
        "twice",
        ["criterion.name=xclr"],
        ["'./00.png'", "(first at line 2, as '00.png')"],
    ),
    ("good", ["checkpoint=../other.ckpt"], ["checkpoint=", "do not fit the model"]),
]


def test_cli_config_errors_are_one_line_and_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    """Every config error: one ``xclr-train: error:`` line, exit 2, nothing trained."""
    folders = _bad_inputs(tmp_path)
    failures = []
    for i, (folder, overrides, words) in enumerate(CLI_ERRORS):
        argv = [*FAST, *overrides]
        if folder is not None:
            argv.append(f"input_dir={folders[folder]}")
        with pytest.raises(SystemExit) as exit_info:
            _run_hydra_entry(cli_train.main, argv, tmp_path / f"run{i}", monkeypatch)
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        ok = (
            exit_info.value.code == 2
            and len(lines) == 1
            and lines[0].startswith("xclr-train: error: ")
            and all(word in lines[0] for word in words)
            and "Traceback" not in out + err
        )
        if not ok:
            failures.append((folder, overrides, exit_info.value.code, err))
    assert not failures, failures


def test_unknown_loss_argument_names_only_the_rejected_ones(no_training: None) -> None:
    with pytest.raises(TypeError) as info:
        train(load_config(["input_dir=.", "+criterion.foo=1", "+criterion.bar=2"]))
    rejected, accepted = str(info.value).split("It accepts:")
    assert "criterion.foo" in rejected and "criterion.bar" in rejected
    assert "temperature" not in rejected  # a key the loss takes is not "rejected"
    assert "criterion.temperature" in accepted


def test_check_images_false_skips_the_image_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder_with(tmp_path, "corrupt", 4)
    (folder / "02.png").write_bytes(b"not a png")
    plans: list[Any] = []
    monkeypatch.setattr(training, "fit", plans.append)
    built: list[str] = []
    create_loss = training.create_loss

    def counting_create_loss(name: str, **kwargs: Any) -> torch.nn.Module:
        built.append(name)
        return create_loss(name, **kwargs)

    monkeypatch.setattr(training, "create_loss", counting_create_loss)
    with pytest.raises(ValueError, match=r"02\.png cannot be read"):
        train(load_config([f"input_dir={folder}", *FAST]))
    # Skipped, the same file only fails inside the epoch, as lightly-ssl-train does.
    train(load_config([f"input_dir={folder}", *FAST, "check_images=false"]))
    assert len(plans) == 1
    assert built == ["ntxent"]  # the criterion is built once per run


def test_batches_across_processes(flat_folder: Path) -> None:
    """The batch checks count the images each DDP process gets."""
    config = parse_config(
        load_config([f"input_dir={flat_folder}", "loader.batch_size=1"])
    )

    def check(criterion: CriterionConfig, count: int, world: int) -> None:
        config.criterion = criterion
        training.check_batches(config, count, world)

    gather = CriterionConfig(gather_distributed=True)
    check(gather, 16, 2)  # 1 per process, 2 gathered: legal
    with pytest.raises(ValueError, match=r"loader\.batch_size=1"):
        check(CriterionConfig(), 16, 2)  # not gathered: each contrasts 1 image
    bank = CriterionConfig(memory_bank_size=[64, 16])
    check(bank, 16, 1)  # the bank holds negatives
    config.loader = parse_config(
        load_config([f"input_dir={flat_folder}", "loader.batch_size=12"])
    ).loader
    with pytest.raises(ValueError, match=r"each of the 2 processes gets \(16 images"):
        check(gather, 16, 2)  # 8 per process: drop_last leaves no batch
    check(gather, 16, 1)


def test_no_checkpoint_is_said_not_an_empty_path(
    flat_folder: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train(
        load_config(
            [
                f"input_dir={flat_folder}",
                "loader.batch_size=8",
                *FAST,
                "checkpoint_callback.save_last=false",
                "checkpoint_callback.save_top_k=0",
            ]
        )
    )
    out = capsys.readouterr().out
    assert result.checkpoint == ""
    assert "No checkpoint was written" in out
    assert "Best model is stored at" not in out


def test_non_finite_loss_stops_before_the_update(
    flat_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A NaN loss at the second step: one error line, exit 1, weights still finite."""
    calls = []
    forward = NTXentLoss.forward

    def nan_on_second_call(self: NTXentLoss, out0: Any, out1: Any) -> Any:
        loss = forward(self, out0, out1)
        if not torch.is_grad_enabled():  # the trial step before training
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    models: list[torch.nn.Module] = []
    build = training.build_model

    def recording_build(cfg: Any) -> torch.nn.Module:
        models.append(build(cfg))
        return models[-1]

    monkeypatch.setattr(NTXentLoss, "forward", nan_on_second_call)
    monkeypatch.setattr(training, "build_model", recording_build)
    argv = [f"input_dir={flat_folder}", "loader.batch_size=4", *FAST]
    with pytest.raises(SystemExit) as exit_info:
        _run_hydra_entry(cli_train.main, argv, tmp_path / "run", monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    lines = [line for line in err.splitlines() if line.startswith("xclr-train: error")]
    assert len(lines) == 1, err[-3000:]
    assert "the ntxent loss is nan at epoch 0, step 1" in lines[0]
    assert "Traceback" not in err
    # Step 1 (NaN) was the last; the weights are those after step 0: finite (no NaN
    # gradient was applied).
    assert len(calls) == 2
    trained = models[-1]
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_non_finite_caption_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_training: None
) -> None:
    """A cache row of NaN (a corrupt or hand-edited cache) is named before training."""
    from xclr_plugin.cache import build_caption_cache
    from xclr_plugin.captions import read_folder_captions

    class FakeEncoder:
        """Stands in for the sentence encoder."""

        name, dim = "fake", 4

        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            return torch.randn(len(texts), 4)

    folder = _folder_with(tmp_path, "images", 4)
    cache_dir = tmp_path / "cache"
    cache = build_caption_cache(
        read_folder_captions(folder), cache_dir, FakeEncoder(), progress=False
    )
    array = np.load(cache.data_path, mmap_mode="r+")
    array[2] = np.nan
    array.flush()
    del array
    with pytest.raises(ValueError, match="finite"):
        train(
            load_config(
                [
                    f"input_dir={folder}",
                    *FAST,
                    "criterion.name=xclr",
                    f"captions.cache_dir={cache_dir}",
                    "captions.encoder=fake",
                ]
            )
        )
