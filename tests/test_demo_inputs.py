"""``xclr-demo`` on bad or unusual input: one-line errors before any training.

The first cases were wrong at 93d1533 (issue 12, items 10-14), the last at 22a96da
(issue 21: image modes, stale results, memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _image_modes import ATOL, MODES, mean_of, write_mode_images
from PIL import Image

from xclr_plugin import demo
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.demo.data import _read_image

pytest.importorskip("sklearn")

FAST = ["--methods", "simclr", "--epochs", "1", "--batch-size", "8",
        "--image-size", "16", "--width", "8", "--knn-k", "3", "--no-progress"]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if any method starts training."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("xclr_plugin.demo.cli.train_method", fail)


def _tsv(tmp_path: Path, labels: list[int], n: int = 10) -> Path:
    """A TSV of n noisy images per label, coloured by label, paths relative to it."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["filepath\ttitle\tlabel"]
    for k, label in enumerate(labels):
        colour = np.array([(80 * k) % 256, 200 - 60 * k, 40 + 90 * k]) % 256
        for i in range(n):
            pixels = np.clip(colour + rng.normal(0, 25, (12, 12, 3)), 0, 255)
            name = f"img/{k}_{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / name)
            lines.append(f"{name}\tsquare {k} number {i}\t{label}")
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("xclr-demo: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.usefixtures("no_training")
def test_unwritable_output_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _tsv(tmp_path, [0, 1])
    rc = demo.main(["--data", str(tsv), *FAST, "--output", "/proc/xclr-demo-out"])
    assert rc == 2
    assert "/proc/xclr-demo-out" in _one_line_error(capsys)


@pytest.mark.usefixtures("no_training")
def test_output_that_is_a_file_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _tsv(tmp_path, [0, 1])
    existing = tmp_path / "results"
    existing.write_text("keep me", encoding="utf-8")
    rc = demo.main(["--data", str(tsv), *FAST, "--output", str(existing)])
    assert rc == 2
    assert "existing file" in _one_line_error(capsys)
    assert existing.read_text(encoding="utf-8") == "keep me"


@pytest.mark.usefixtures("no_training")
def test_corrupt_png_is_named_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = _tsv(tmp_path, [0, 1])
    broken = tmp_path / "img" / "1_3.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated inside the image data
    rc = demo.main(["--data", str(tsv), *FAST, "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "1_3.png" in _one_line_error(capsys)


def test_huge_labels_are_mapped_to_a_dense_index() -> None:
    records = [CaptionRecord(f"{i}.png", "x", label) for i, label in
               enumerate([10**9, 0, 10**9, 0])]  # fmt: skip
    dense, names = demo.dense_labels(records)
    assert names == ["0", "1000000000"]
    assert [r.label for r in dense] == [1, 0, 1, 0]


def test_negative_labels_keep_their_names() -> None:
    records = [CaptionRecord(f"{i}.png", "x", label) for i, label in
               enumerate([1, -1, 0, -1])]  # fmt: skip
    dense, names = demo.dense_labels(records)
    assert names == ["-1", "0", "1"]
    assert [r.label for r in dense] == [2, 0, 1, 0]


@pytest.mark.slow
def test_labels_minus_one_zero_one_end_to_end(tmp_path: Path) -> None:
    tsv = _tsv(tmp_path, [-1, 0, 10**9])
    out = tmp_path / "out"
    rc = demo.main(["--data", str(tsv), *FAST, "--output", str(out)])
    assert rc == 0
    result = json.loads((out / demo.RESULTS_JSON).read_text(encoding="utf-8"))
    data = result["data"][str(tsv)]
    assert data["classes"] == ["-1", "0", "1000000000"]
    assert data["images_per_class"] == {"-1": 10, "0": 10, "1000000000": 10}
    assert data["regime"] == "one caption per image"
    # Colour decides the class: even random features separate the three colours.
    assert result["references"][str(tsv)]["random_init"]["linear_top1"] > 0.6


def test_csv_without_labels_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "captions.csv"
    csv.write_text("filepath,title\na.png,a cat\n", encoding="utf-8")
    rc = demo.main(
        ["--data", str(csv), "--no-progress", "--output", str(tmp_path / "o")]
    )
    assert rc == 2
    err = _one_line_error(capsys)
    assert "label" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "simclr,byol"], "--methods"),
        (["--epochs", "0"], "--epochs"),
        (["--test-fraction", "1.5"], "--test-fraction"),
        (["--target-temperature", "0"], "--target-temperature"),
        (["--caption-template", "no slot"], "--caption-template"),
        (["--animals-images", "0"], "--animals-images"),
        (["--probe-labels-per-class", "0"], "--probe-labels-per-class"),
        (["--probe-draws", "-1"], "--probe-draws"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert message in _one_line_error(capsys)
    # The Python API checks the same values when the config is made.
    with pytest.raises(ValueError, match=message):
        demo.config_from_args(demo.build_parser().parse_args(argv))


def test_every_option_defaults_to_the_config_default() -> None:
    assert (
        demo.config_from_args(demo.build_parser().parse_args([])) == demo.DemoConfig()
    )


def test_non_finite_loss_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from xclr_plugin.errors import NonFiniteLossError

    def diverge(*args: Any, **kwargs: Any) -> None:
        raise NonFiniteLossError("SimCLR: the loss became nan at epoch 1; lower --lr.")

    monkeypatch.setattr("xclr_plugin.demo.cli.train_method", diverge)
    tsv = _tsv(tmp_path, [0, 1])
    rc = demo.main(["--data", str(tsv), *FAST, "--output", str(tmp_path / "o")])
    assert rc == 1
    assert "lower --lr" in _one_line_error(capsys)


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_image_mode_reads_with_its_hand_computed_mean(
    tmp_path: Path, name: str
) -> None:
    """Issue 21, wrong 6: a mid-grey 16-bit image read as white (mean 1.0)."""
    means = write_mode_images(tmp_path)
    image = _read_image(str(tmp_path / name), 8)
    assert mean_of(image) == pytest.approx(means[name], abs=ATOL)


class HashEncoder:
    """Stands in for the sentence encoder: a fixed random unit vector per caption."""

    name, dim = "hash", 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [
            torch.randn(
                8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))
            )
            for t in texts
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_images_are_kept_as_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rough (memory): 3 * S * S bytes per image, no float copies (were 4x, twice);
    a warning above the documented size."""
    tsv = _tsv(tmp_path, [0, 1])
    config = demo.DemoConfig(data=str(tsv), image_size=16, min_class_size=2)
    monkeypatch.setattr("xclr_plugin.demo.data.MEMORY_WARNING_BYTES", 20 * 768 - 1)
    with pytest.warns(UserWarning, match="20 images of 16 px take 0.0 GiB"):
        data = demo.load_task(str(tsv), config, HashEncoder(), progress=False)
    assert data.pixels.dtype == torch.uint8 and data.pixels.shape == (20, 3, 16, 16)
    assert [f.name for f in dataclasses.fields(data) if isinstance(getattr(data, f.name), torch.Tensor) and getattr(data, f.name).shape[-2:] == (16, 16)] == ["pixels"]  # fmt: skip


def test_changed_data_retrains_and_unchanged_data_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21, wrong 7: a re-run after the CSV or an image changed printed
    "reusing" and reported the old data's scores."""
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", HashEncoder)
    monkeypatch.setattr("xclr_plugin.demo.cli.report", lambda *args: "no figure")
    tsv = _tsv(tmp_path, [0, 1])
    argv = ["--data", str(tsv), *FAST, "--min-class-size", "2", "--probe-draws", "1",
            "--output", str(tmp_path / "o")]  # fmt: skip
    assert demo.main(argv) == 0
    capsys.readouterr()

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr("xclr_plugin.demo.cli.train_method", no_training)
    image = tmp_path / "img" / "1_3.png"
    os.utime(image, (1, 1))  # touched, same content: the same data
    assert demo.main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    text = tsv.read_text(encoding="utf-8")
    tsv.write_text(text.replace("square 0 number 0", "a new caption"), encoding="utf-8")
    with pytest.raises(AssertionError, match="trained again"):
        demo.main(argv)
    tsv.write_text(text, encoding="utf-8")
    with Image.open(image) as im:  # one pixel changed
        changed = im.copy()
    changed.putpixel((0, 0), (0, 0, 0))
    changed.save(image)
    with pytest.raises(AssertionError, match="trained again"):
        demo.main(argv)


def test_float_and_transparent_16_bit_images(tmp_path: Path) -> None:
    """Found in the adversarial round: a [0, 1] float image read as black, a 16-bit
    grey PNG with a transparent grey level as white."""
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"Cannot read image .*f\.tif: a 32-bit float image \(PIL mode F\)"):  # fmt: skip
        _read_image(str(tmp_path / "f.tif"), 8)
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    grey.save(tmp_path / "t.png", transparency=0)
    with Image.open(tmp_path / "t.png") as image:
        assert image.mode == "I;16" and "transparency" in image.info
    assert mean_of(_read_image(str(tmp_path / "t.png"), 8)) == pytest.approx(32768 / 65535, abs=ATOL)  # fmt: skip
