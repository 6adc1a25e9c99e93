"""xclr-train's caption sources and image files (issue 21, wrong 4-6): every captioned
image is trained on under one spelling, or the run is refused before training.

The one-line command errors of the same layouts are cases of ``CLI_ERRORS`` in
test_lightly_train.py; these tests check what a run is built from.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _image_modes import ATOL, MODES, WIDE, mean_of, write_mode_images
from lightly.data._image_loaders import pil_loader
from PIL import Image

from xclr_plugin.cache import CaptionLookup
from xclr_plugin.captions import CaptionRecord, match_images
from xclr_plugin.data import XCLRCollate
from xclr_plugin.integrations.lightly_train import load_config, prepare_targets
from xclr_plugin.integrations.lightly_train.targets import list_images, verify_images


class OneHot:
    """Stands in for the sentence encoder: caption ``"caption <k>"`` -> row k of I."""

    name, dim = "fake", 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.eye(16)[[int(t.split()[-1]) for t in texts]]


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", OneHot)


def _images(folder: Path, names: list[str]) -> list[str]:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return names


def _targets(folder: Path, source: Path | None = None) -> CaptionLookup:
    """The caption embeddings xclr-train would train on (by image file name)."""
    overrides = [f"input_dir={folder}", "criterion.name=xclr"]
    if source is not None:
        overrides.append(f"captions.source={source}")
    collate, kind = prepare_targets(load_config(overrides))
    assert kind == "captions" and isinstance(collate, XCLRCollate)
    assert collate.captions is not None
    return collate.captions


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def test_one_image_under_two_spellings_is_refused_naming_both_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong 4: the second caption of an image was dropped silently (first wins)."""
    folder = tmp_path / "images"
    names = _images(folder, ["00.png", "01.png", "02.png"])
    monkeypatch.chdir(tmp_path)
    rows = [f"images/{n}\tcaption {i}" for i, n in enumerate(names)]
    tsv = _write(tmp_path / "a.tsv", "filepath\ttitle", [*rows, "./images/00.png\tcaption 5"])  # fmt: skip
    with pytest.raises(ValueError, match=r"a\.tsv, line 5: duplicate file name './images/00\.png' \(first at line 2, as 'images/00\.png'\)"):  # fmt: skip
        _targets(folder, tsv)
    absolute = f"{folder / '00.png'}\tcaption 5"
    tsv = _write(tmp_path / "b.tsv", "filepath\ttitle", [*rows, absolute])
    with pytest.raises(ValueError, match=rf"caption rows 1 and 4 \(as 'images/00\.png' and '{folder}/00\.png'\) both name the image '00\.png'"):  # fmt: skip
        _targets(folder, tsv)
    # A sidecar: names relative to the folder, or absolute.
    sidecar = [f"{n},caption {i}" for i, n in enumerate(names)]
    side = _write(tmp_path / "side.csv", "filename,caption", [*sidecar, f"{folder / '01.png'},caption 7"])  # fmt: skip
    with pytest.raises(ValueError, match=r"caption rows 2 and 4 .* '01\.png'"):
        _targets(folder, side)
    # Each image once, under any of these spellings: the captions of exactly its rows.
    spelled = [f"{folder / '00.png'},caption 3", "./01.png,caption 4", "02.png,caption 5"]  # fmt: skip
    lookup = _targets(folder, _write(tmp_path / "ok.csv", "filename,caption", spelled))
    torch.testing.assert_close(lookup.lookup(names), torch.eye(16)[3:6])


def test_captions_of_images_lightly_does_not_list_are_refused(tmp_path: Path) -> None:
    """Wrong 5, the other way round: LightlyDataset skips folders named
    lightly_outputs and lists only the 4 top-level images; the captions name 8."""
    folder = tmp_path / "images"
    top = _images(folder, [f"{i:02d}.png" for i in range(4)])
    skipped = _images(folder, [f"lightly_outputs/{i}.png" for i in range(4)])
    assert list_images(str(folder)).get_filenames() == top
    rows = [f"{folder / n}\tcaption {i}" for i, n in enumerate(top + skipped)]
    tsv = _write(tmp_path / "all.tsv", "filepath\ttitle", rows)
    with pytest.raises(ValueError, match=rf"names 4 image\(s\) that are not among the 4 images LightlyDataset lists in {folder}, e\.g\. '{folder}/lightly_outputs/0\.png': the file exists"):  # fmt: skip
        _targets(folder, tsv)
    # The captions of exactly the listed images: all trained on, each its own caption.
    lookup = _targets(folder, _write(tmp_path / "top.tsv", "filepath\ttitle", rows[:4]))
    torch.testing.assert_close(lookup.lookup(top), torch.eye(16)[:4])


def test_nfd_names_on_disk_match_nfc_captions(tmp_path: Path) -> None:
    """Rough: a file saved on macOS (NFD) was "café.png has no caption" for a CSV
    typed with NFC; both sides are compared in NFC, the run uses the names on disk."""
    folder = tmp_path / "images"
    nfc, nfd = "café.png", unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    _images(folder, [nfd, "b.png"])
    _write(folder / "captions.csv", "filename,caption", [f"{nfc},caption 1", "b.png,caption 2"])  # fmt: skip
    names = list_images(str(folder)).get_filenames()
    assert sorted(names) == sorted([nfd, "b.png"])
    lookup = _targets(folder)
    torch.testing.assert_close(lookup.lookup([nfd, "b.png"]), torch.eye(16)[1:3])


def test_16_bit_images_are_not_white_in_xclr_train(tmp_path: Path) -> None:
    """Wrong 6: lightly's loader converts with PIL, which clips 16-bit grey to white;
    xclr-train's LightlyDataset loads every mode with its hand-computed mean."""
    means = write_mode_images(tmp_path / "modes")
    dataset = list_images(str(tmp_path / "modes"))
    assert sorted(dataset.get_filenames()) == sorted(MODES)
    for i, name in enumerate(dataset.get_filenames()):
        image, _, _ = dataset[i]
        assert mean_of(image) == pytest.approx(means[name], abs=ATOL), name
        lightly_mean = mean_of(pil_loader(str(tmp_path / "modes" / name)))
        assert (lightly_mean == 1.0) == (name in WIDE), name


def test_names_through_links_nfc_twins_and_backslashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in the adversarial round: input_dir through a link, captions naming the
    real paths, matched (were "no caption"); two files on disk whose names differ only
    in Unicode normalisation refused (both got one caption); a Windows-style path
    named as such."""
    real = tmp_path / "real"
    names = _images(real, ["a.png", "b.png"])
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    rows = [f"{real / n}\tcaption {i}" for i, n in enumerate(names)]
    tsv = _write(tmp_path / "real.tsv", "filepath\ttitle", rows)
    lookup = _targets(tmp_path / "link", tsv)
    torch.testing.assert_close(lookup.lookup(names), torch.eye(16)[:2])

    twins = tmp_path / "twins"
    _images(twins, ["café.png", unicodedata.normalize("NFD", "café.png")])
    _write(twins / "captions.csv", "filename,caption", ["café.png,caption 1"])
    with pytest.raises(ValueError, match=r"holds '(caf\\xe9|cafe\\u0301)\.png' and '(caf\\xe9|cafe\\u0301)\.png', one name in two Unicode normalisations"):  # fmt: skip
        _targets(twins)

    nested = tmp_path / "nested"
    _images(nested, ["s/a.png", "t/b.png"])
    _write(nested / "captions.csv", "filename,caption", ["s\\a.png,caption 1", "t/b.png,caption 2"])  # fmt: skip
    with pytest.raises(ValueError, match=r"'s\\\\a\.png': there is no such file .*'\\' is not a folder separator here: use '/'"):  # fmt: skip
        _targets(nested)


def test_top_level_images_beside_class_folders_are_named(tmp_path: Path) -> None:
    """Found in the adversarial round: with subfolders, LightlyDataset (and so
    lightly-ssl-train) trains on none of the top-level images, without a word."""
    _images(tmp_path, ["top.png", "cat/a.png", "dog/b.png"])
    with pytest.warns(UserWarning, match=r"1 image\(s\) at the top of .* \(e\.g\. 'top\.png'\) are not trained on"):  # fmt: skip
        assert list_images(str(tmp_path)).get_filenames() == ["cat/a.png", "dog/b.png"]


def test_float_images_are_refused_before_training(tmp_path: Path) -> None:
    """Found in the adversarial round: a [0, 1] float image (PIL mode F) trained as
    black; the image check names it before training."""
    _images(tmp_path, ["a.png", "b.png"])
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    names = list_images(str(tmp_path)).get_filenames()
    with pytest.raises(ValueError, match=r"f\.tif cannot be read: ValueError: a 32-bit float image \(PIL mode F\)"):  # fmt: skip
        verify_images(str(tmp_path), names)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("../outside.png", "it lies outside the image folder"),
        ("1", "there is no such file"),  # pandas read '0001' as a number, as open_clip
        ("notes.txt", "LightlyDataset reads only .jpg"),
    ],
)
def test_each_extra_row_is_named_with_its_reason(
    tmp_path: Path, row: str, reason: str
) -> None:
    folder = tmp_path / "images"
    names = _images(folder, ["a.png", "b.png"])
    _images(tmp_path, ["outside.png"])
    (folder / "notes.txt").write_text("not an image")
    records = [CaptionRecord(n, f"caption {n}") for n in [*names, row]]
    with pytest.raises(ValueError, match=rf"src names 1 image\(s\) that are not among the 2 images LightlyDataset lists in .*, e\.g\. '{re.escape(row)}': {reason}"):  # fmt: skip
        match_images(records, names, folder, source="src", base=folder)
