"""Tests of caption sources, the captioned dataset and the X-CLR collate (real images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _image_modes import ATOL, MODES, WIDE, mean_of, write_mode_images
from lightly.data import LightlyDataset
from lightly.transforms import SimCLRTransform
from PIL import Image
from torch.utils.data import DataLoader

from xclr_plugin.cache import CaptionCache, CaptionTable, build_caption_cache
from xclr_plugin.captions import (
    CaptionRecord,
    detect_format,
    read_captions,
    read_class_captions,
    read_csv_captions,
    read_folder_captions,
    read_jsonl_captions,
)
from xclr_plugin.data import NO_LABEL, CaptionedImageDataset, XCLRCollate
from xclr_plugin.text import TextEncoder

FP16_ATOL = 2e-3
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "yellow": (230, 230, 20),
    "purple": (130, 20, 160),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}


def _write_image(path: Path, color: str, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), RGB[color])
    image.paste((128, 128, 128), (size // 4, size // 4, size // 2, size // 2))
    image.save(path)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture()
def flat_folder(tmp_path: Path) -> Path:
    """8 PNGs and a sidecar captions.csv (in reverse order, with a comma in a caption)."""
    folder = tmp_path / "images"
    for i, color in enumerate(COLORS):
        _write_image(folder / f"{i}_{color}.png", color)
    rows = [
        f'{i}_{c}.png,"a {c} square, with a grey patch"' for i, c in enumerate(COLORS)
    ]
    (folder / "captions.csv").write_text(
        "filename,caption\n" + "\n".join(rows[::-1]) + "\n"
    )
    return folder


@pytest.fixture(scope="module")
def mode_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, float]]:
    """One image per PIL mode and its hand-computed mean."""
    folder = tmp_path_factory.mktemp("modes")
    return folder, write_mode_images(folder)


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "classes"
    for cls, colors in {
        "red_fruit": ["red", "orange"],
        "sky": ["blue", "white"],
    }.items():
        for i, color in enumerate(colors):
            _write_image(folder / cls / f"{i}.png", color)
    return folder


@pytest.fixture()
def tsv(tmp_path: Path, flat_folder: Path) -> Path:
    path = tmp_path / "train.tsv"
    lines = [
        f"{flat_folder / f'{i}_{c}.png'}\ta {c} square\t{i % 2}"
        for i, c in enumerate(COLORS)
    ]
    path.write_text("filepath\ttitle\tlabel\n" + "\n".join(lines) + "\n")
    return path


# -- caption sources ------------------------------------------------------------------


def test_open_clip_tsv_defaults(tsv: Path) -> None:
    records = read_csv_captions(tsv)
    assert len(records) == 8
    assert records[2] == CaptionRecord(
        str(tsv.parent / "images" / "2_blue.png"), "a blue square"
    )
    labelled = read_csv_captions(tsv, label_key="label")
    assert [r.label for r in labelled] == [0, 1] * 4


def test_csv_with_custom_separator_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    path.write_text(
        '\ufeffimg;text\na.png;"a cat; sleeping"\nb.png;a dog\n'
    )  # BOM, quoting
    records = read_csv_captions(path, sep=";", img_key="img", caption_key="text")
    assert records == [
        CaptionRecord("a.png", "a cat; sleeping"),
        CaptionRecord("b.png", "a dog"),
    ]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text(
        json.dumps({"filename": "a.png", "caption": "a cat", "label": 1})
        + "\n\n"
        + json.dumps({"filename": "b.png", "caption": "a dog", "label": 0})
        + "\n"
    )
    assert read_jsonl_captions(path, label_key="label") == [
        CaptionRecord("a.png", "a cat", 1),
        CaptionRecord("b.png", "a dog", 0),
    ]
    assert read_captions(path)[1].caption == "a dog"


def test_sidecar_folder_follows_lightly_dataset(flat_folder: Path) -> None:
    records = read_folder_captions(flat_folder)
    assert [r.filename for r in records] == LightlyDataset(
        str(flat_folder)
    ).get_filenames()
    assert records[0] == CaptionRecord(
        "0_red.png", "a red square, with a grey patch", None
    )


def test_sidecar_folder_with_subfolders(class_folder: Path) -> None:
    names = LightlyDataset(str(class_folder)).get_filenames()
    assert names == ["red_fruit/0.png", "red_fruit/1.png", "sky/0.png", "sky/1.png"]
    sidecar = class_folder.parent / "sidecar.csv"
    sidecar.write_text(
        "filename,caption\n" + "".join(f"{n},photo {n}\n" for n in names)
    )
    records = read_folder_captions(class_folder, sidecar)
    assert [(r.filename, r.label) for r in records] == list(
        zip(names, [0, 0, 1, 1], strict=True)
    )


def test_class_names_as_captions(class_folder: Path) -> None:
    records = read_class_captions(class_folder)
    lightly_ds = LightlyDataset(str(class_folder))
    assert [r.filename for r in records] == lightly_ds.get_filenames()
    assert [r.label for r in records] == [
        lightly_ds[i][1] for i in range(len(lightly_ds))
    ]
    assert [r.caption for r in records] == ["a photo of a red fruit"] * 2 + [
        "a photo of a sky"
    ] * 2
    custom = read_class_captions(
        class_folder, template="{} picture", class_names={"sky": "blue sky"}
    )
    assert custom[3].caption == "blue sky picture"
    assert read_captions(class_folder)[0].caption == "a photo of a red fruit"


def test_detect_format(tmp_path: Path, flat_folder: Path, class_folder: Path) -> None:
    assert detect_format(flat_folder) == "folder"
    assert detect_format(class_folder) == "classes"
    assert detect_format(tmp_path / "x.jsonl") == "jsonl"
    assert detect_format(tmp_path / "x.tsv") == "csv"
    with pytest.raises(ValueError, match="Unknown captions format"):
        read_captions(flat_folder, fmt="parquet")


# -- bad inputs -----------------------------------------------------------------------


def test_error_missing_image(tsv: Path, flat_folder: Path) -> None:
    (flat_folder / "3_yellow.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"3_yellow\.png"):
        CaptionedImageDataset.from_source(tsv)
    # a sidecar naming an image that is not in the folder
    with pytest.raises(
        ValueError, match=r"names 1 image.* '3_yellow\.png': there is no such"
    ):
        read_folder_captions(flat_folder)


def test_error_image_without_caption(flat_folder: Path) -> None:
    _write_image(flat_folder / "9_extra.png", "red")
    with pytest.raises(
        ValueError, match=r"1 of 9 image\(s\) in .* no caption, e.g\. '9_extra"
    ):
        read_folder_captions(flat_folder)


def test_error_empty_caption(tmp_path: Path) -> None:
    path = tmp_path / "caps.tsv"
    path.write_text("filepath\ttitle\na.png\ta cat\nb.png\t  \n")
    with pytest.raises(
        ValueError, match=r"caps\.tsv, line 3: image 'b\.png' has an empty caption"
    ):
        read_csv_captions(path)
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"filename": "a.png", "caption": ""}\n')
    with pytest.raises(
        ValueError, match=r"line 1: image 'a\.png' has an empty caption"
    ):
        read_jsonl_captions(jsonl)


def test_error_duplicate_file_names(tmp_path: Path) -> None:
    path = tmp_path / "caps.tsv"
    path.write_text("filepath\ttitle\na.png\ta cat\nb.png\ta dog\na.png\tanother cat\n")
    with pytest.raises(
        ValueError, match=r"line 4: duplicate file name 'a\.png' \(first at line 2\)"
    ):
        read_csv_captions(path)
    jsonl = tmp_path / "caps.jsonl"  # one image, two spellings (issue 21, wrong 4)
    jsonl.write_text(
        json.dumps({"filename": "a.png", "caption": "a cat"})
        + "\n"
        + json.dumps({"filename": "./a.png", "caption": "a dog"})
        + "\n"
    )
    with pytest.raises(
        ValueError,
        match=r"line 2: duplicate file name '\./a\.png' \(first at line 1, as",
    ):
        read_jsonl_captions(jsonl)
    with pytest.raises(ValueError, match="duplicate file name"):
        CaptionedImageDataset(
            [CaptionRecord("a.png", "x"), CaptionRecord("a.png", "y")],
            check_files=False,
        )


def test_error_unreadable_captions_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Captions file not found"):
        read_csv_captions(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="is a directory"):
        read_csv_captions(tmp_path)
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"filepath\ttitle\n\xff\xfe\x00bad\tcaption\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_csv_captions(binary)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_csv_captions(empty)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"filename": "a.png", "caption": "a cat"}\n{"filename": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        read_jsonl_captions(bad_json)


def test_error_wrong_or_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "caps.tsv"
    path.write_text("image\ttext\na.png\ta cat\n")
    with pytest.raises(
        ValueError,
        match=r"missing column\(s\) \['filepath', 'title'\]; the header has \['image', 'text'\]",
    ):
        read_csv_captions(path)
    comma = tmp_path / "comma.csv"
    comma.write_text("filepath,title\na.png,a cat\n")
    with pytest.raises(ValueError, match="Is the separator right"):
        read_csv_captions(comma)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("filepath\ttitle\na.png\ta cat\nb.png\ta dog\textra\n")
    with pytest.raises(ValueError, match="Expected 2 fields in line 3, saw 3"):
        read_csv_captions(ragged)
    shifted = tmp_path / "shifted.tsv"
    shifted.write_text("filepath\ttitle\na.png\ta cat\textra\n")
    with pytest.raises(ValueError, match="more fields than the header"):
        read_csv_captions(shifted)
    short = tmp_path / "short.tsv"
    short.write_text("filepath\ttitle\na.png\n")
    with pytest.raises(ValueError, match=r"line 2: image 'a\.png' has no caption"):
        read_csv_captions(short)
    labels = tmp_path / "labels.tsv"
    labels.write_text("filepath\ttitle\tlabel\na.png\ta cat\tcat\n")
    with pytest.raises(
        ValueError, match="line 2: label column 'label' is not an integer"
    ):
        read_csv_captions(labels, label_key="label")
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"file": "a.png", "caption": "a cat"}\n')
    with pytest.raises(ValueError, match=r"line 1: missing key\(s\) \['filename'\]"):
        read_jsonl_captions(jsonl)
    _write_image(tmp_path / "flat" / "a.png", "red")
    with pytest.raises(ValueError, match="no class subfolders"):
        read_class_captions(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found"):
        read_class_captions(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        read_class_captions(tmp_path / "missing")


# -- dataset and collate ----------------------------------------------------------------


def test_dataset_items_follow_lightly(flat_folder: Path) -> None:
    dataset = CaptionedImageDataset.from_source(
        flat_folder, transform=SimCLRTransform(input_size=16)
    )
    assert len(dataset) == 8 and dataset.root == str(flat_folder)
    views, target, filename = dataset[1]
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (3, 16, 16) for v in views)
    assert (target, filename) == (NO_LABEL, "1_green.png")
    assert dataset.get_filenames() == LightlyDataset(str(flat_folder)).get_filenames()
    assert dataset.captions[1] == "a green square, with a grey patch"
    plain = CaptionedImageDataset.from_source(flat_folder)
    image, _, _ = plain[0]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == RGB["red"]


def test_dataset_relative_paths_and_vanished_image(
    tmp_path: Path, flat_folder: Path
) -> None:
    records = [CaptionRecord("0_red.png", "a red square", 3)]
    dataset = CaptionedImageDataset(records, root=flat_folder)
    assert dataset[0][1:] == (3, "0_red.png")
    (flat_folder / "0_red.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"0_red\.png \(item 0\)"):
        dataset[0]


def test_collate_with_cache_labels_or_nothing(
    tmp_path: Path, tsv: Path, encoder: TextEncoder
) -> None:
    dataset = CaptionedImageDataset(
        read_csv_captions(tsv, label_key="label"),
        transform=SimCLRTransform(input_size=16),
    )
    cache = build_caption_cache(
        dataset.records, tmp_path / "cache", encoder, progress=False
    )
    batch = [dataset[i] for i in (5, 0, 2)]

    views, targets, filenames = XCLRCollate(cache)(batch)
    assert [v.shape for v in views] == [(3, 3, 16, 16)] * 2
    assert filenames == [dataset.records[i].filename for i in (5, 0, 2)]
    assert (
        targets is not None
        and targets.shape == (3, 384)
        and targets.dtype == torch.float32
    )
    expected = encoder.encode([dataset.records[i].caption for i in (5, 0, 2)])
    torch.testing.assert_close(targets, expected, atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(targets, cache[[5, 0, 2]])  # by file name == by index

    _, labels, _ = XCLRCollate(use_labels=True)(batch)
    assert (
        labels is not None
        and labels.tolist() == [1, 0, 0]
        and labels.dtype == torch.long
    )
    _, nothing, _ = XCLRCollate()(batch)
    assert nothing is None

    table = CaptionTable.from_records(dataset.records, encoder)
    _, on_the_fly, _ = XCLRCollate(table)(batch)
    torch.testing.assert_close(on_the_fly, expected)


def test_collate_errors(flat_folder: Path, encoder: TextEncoder) -> None:
    dataset = CaptionedImageDataset.from_source(
        flat_folder, transform=SimCLRTransform(input_size=16)
    )
    table = CaptionTable.from_records(dataset.records[:2], encoder)
    with pytest.raises(
        ValueError, match=r"No caption embedding for image '2_blue\.png'"
    ):
        XCLRCollate(table)([dataset[0], dataset[2]])
    with pytest.raises(ValueError, match=r"Image '0_red\.png' has no label"):
        XCLRCollate(use_labels=True)([dataset[0]])
    with pytest.raises(ValueError, match="not both"):
        XCLRCollate(table, use_labels=True)
    single_view = CaptionedImageDataset(
        dataset.records, root=flat_folder, transform=lambda im: torch.zeros(3, 4, 4)
    )
    with pytest.raises(TypeError, match="expected a list of views"):
        XCLRCollate()([single_view[0]])


def test_dataloader_with_workers_and_loss(
    tmp_path: Path, class_folder: Path, encoder: TextEncoder
) -> None:
    records = read_class_captions(class_folder)
    cache = build_caption_cache(records, tmp_path / "cache", encoder, progress=False)
    cache = CaptionCache.open(cache.path, encoder=encoder, records=records)
    # Plain lightly dataset: the collate finds the captions by lightly's file names.
    dataset = LightlyDataset(
        str(class_folder), transform=SimCLRTransform(input_size=16)
    )
    loader = DataLoader(
        dataset, batch_size=3, num_workers=2, collate_fn=XCLRCollate(cache)
    )
    expected = dict(
        zip(
            [r.filename for r in records],
            encoder.encode([r.caption for r in records]),
            strict=True,
        )
    )
    seen: list[str] = []
    for views, targets, filenames in loader:
        assert len(views) == 2 and views[0].shape[1:] == (3, 16, 16)
        torch.testing.assert_close(
            targets,
            torch.stack([expected[f] for f in filenames]),
            atol=FP16_ATOL,
            rtol=0,
        )
        seen += filenames
    assert sorted(seen) == sorted(expected)
    assert cache._array is None  # the main process never mapped the vectors

    from xclr_plugin.loss import XCLRLoss

    views, targets, _ = next(iter(loader))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    loss = XCLRLoss()(model(views[0]), model(views[1]), targets)
    loss.backward()
    assert torch.isfinite(loss)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    """PIL's errors for a corrupt or truncated PNG name no file (issue 12, #7/#12)."""
    _write_image(tmp_path / "good.png", "red")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    truncated = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    records = [
        CaptionRecord("corrupt.png", "a"),
        CaptionRecord("truncated.png", "b"),
    ]
    dataset = CaptionedImageDataset(
        records, root=tmp_path, transform=lambda image: image.convert("L")
    )
    for index, name in enumerate(["corrupt.png", "truncated.png"]):
        with pytest.raises(
            OSError, match=rf"Cannot read image .*{name} \(item {index}\)"
        ):
            dataset[index]


def test_collate_refuses_a_captions_object_without_lookup() -> None:
    with pytest.raises(
        TypeError, match="captions must be a CaptionCache or CaptionTable"
    ):
        XCLRCollate({"a.png": [1.0]})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_image_mode_loads_with_its_hand_computed_mean(
    mode_folder: tuple[Path, dict[str, float]], name: str
) -> None:
    """Issue 21, wrong 6: 16- and 32-bit grey images are scaled, not clipped white."""
    folder, means = mode_folder
    dataset = CaptionedImageDataset([CaptionRecord(name, "a flat colour")], root=folder)
    image, _, _ = dataset[0]
    assert mean_of(image) == pytest.approx(means[name], abs=ATOL)
    if name in WIDE:  # what PIL's own conversion (torchvision's loader) gives
        with Image.open(folder / name) as raw:
            assert mean_of(raw.convert("RGB")) == 1.0


def test_float_images_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Found in the adversarial round: PIL reads a [0, 1] float image as black."""
    Image.fromarray(torch.full((8, 8), 0.5).numpy()).save(tmp_path / "f.tif")
    dataset = CaptionedImageDataset([CaptionRecord("f.tif", "grey")], root=tmp_path)
    with pytest.raises(OSError, match=r"f\.tif \(item 0\): ValueError: a 32-bit float image \(PIL mode F\)"):  # fmt: skip
        dataset[0]
