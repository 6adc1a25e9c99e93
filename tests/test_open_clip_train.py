"""xclr-openclip-train: open_clip's own trainer on a tiny model with --loss NAME.

Every run trains a tiny ViT/transformer CLIP for one epoch on 24 drawn PNG images with
varied captions (about 2 s each on CPU). A probe wraps open_clip's
``train_one_epoch`` to record what the loss receives and returns at every step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import open_clip_train.data as ocd
import open_clip_train.main as ocm
import pytest
import torch
from _clip_helpers import dense_xclr_clip
from _openclip_helpers import (
    COLORS,
    SHAPES,
    TINY,
    TINY_CFG,
    Probe,
    assert_loads_back,
    draw,
    install_probe,
    rows_of,
    state_dict,
)
from open_clip.loss import ClipLoss, SigLipLoss

from xclr_plugin.cache import CaptionCache, build_caption_cache
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.cli.openclip_train import main
from xclr_plugin.clip_loss import XCLRClipLoss
from xclr_plugin.integrations.open_clip_train.data import (
    TARGETS_KEY,
    attach_target_hooks,
    pack,
    targets_csv_dataset,
)
from xclr_plugin.integrations.open_clip_train.loss import CaptionTargets
from xclr_plugin.integrations.open_clip_train.patch import preserve_logging
from xclr_plugin.text import TextEncoder

TINY_BIAS = "xclr-test-tiny-bias"


@dataclass
class Data:
    root: Path
    train: Path
    images: list[str]
    captions: list[str]
    cache: Path


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, encoder: TextEncoder) -> Data:
    """24 PNGs (6 colours x 4 shapes), a TSV as open_clip reads it, tiny configs, a cache."""
    root = tmp_path_factory.mktemp("openclip")
    images, captions = [], []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        path = root / f"img{i:02d}.png"
        draw(shape, color).save(path)
        images.append(str(path))
        captions.append(f"a {color} {shape} on a white background")
    train = root / "train.tsv"
    lines = ["filepath\ttitle"] + [
        f"{p}\t{c}" for p, c in zip(images, captions, strict=True)
    ]
    train.write_text("\n".join(lines) + "\n")
    configs = root / "configs"
    configs.mkdir()
    (configs / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    (configs / f"{TINY_BIAS}.json").write_text(
        json.dumps({**TINY_CFG, "init_logit_bias": -10.0})
    )
    open_clip.add_model_config(configs)
    records = [CaptionRecord(p, c) for p, c in zip(images, captions, strict=True)]
    cache = root / "cache"
    build_caption_cache(records, cache, encoder, progress=False)
    return Data(root, train, images, captions, cache)


def train_args(data: Data, name: str, *extra: str, model: str = TINY) -> list[str]:
    return [
        "--train-data", str(data.train), "--dataset-type", "csv",
        "--model", model, "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
        "--seed", "0", "--log-every-n-steps", "1", "--report-to", "",
        "--logs", str(data.root / "logs"), "--name", name, *extra,
    ]  # fmt: skip


def checkpoint(data: Data, name: str) -> Path:
    return data.root / "logs" / name / "checkpoints" / "epoch_1.pt"


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    return install_probe(monkeypatch)


@pytest.fixture(scope="module")
def pretrained(data: Data) -> dict[str, Any]:
    """A plain open_clip_train.main run: the parity baseline and the checkpoint to tune."""
    calls: list[torch.Tensor] = []
    original = ocm.train_one_epoch

    def train_one_epoch(
        model: torch.nn.Module, d: Any, loss: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> Any:
        handle = loss.register_forward_hook(
            lambda m, a, out: calls.append(out["contrastive_loss"].detach().clone())
        )
        try:
            return original(model, d, loss, *args, **kwargs)
        finally:
            handle.remove()

    ocm.train_one_epoch = train_one_epoch
    try:
        with preserve_logging():
            assert ocm.main(train_args(data, "plain")) is None
    finally:
        ocm.train_one_epoch = original
    return {"losses": calls, "checkpoint": checkpoint(data, "plain")}


def test_loss_clip_matches_plain_open_clip(
    data: Data, pretrained: dict[str, Any], probe: Probe
) -> None:
    originals = (
        ocm.parse_args,
        ocm.create_loss,
        ocm.create_model_and_transforms,
        ocd.CsvDataset,
    )
    assert main([*train_args(data, "loss-clip"), "--loss", "clip"]) is None
    assert probe.loss.__class__ is ClipLoss
    got = [call["loss"] for call in probe.calls]
    assert len(got) == len(pretrained["losses"]) == 6
    for step, (a, b) in enumerate(zip(got, pretrained["losses"], strict=True)):
        assert torch.equal(a, b), f"step {step}: {a} != {b}"
    plain, ours = (
        state_dict(pretrained["checkpoint"]),
        state_dict(checkpoint(data, "loss-clip")),
    )
    assert plain.keys() == ours.keys()
    assert all(torch.equal(plain[k], ours[k]) for k in plain)
    params = (data.root / "logs" / "loss-clip" / "params.txt").read_text()
    assert "loss: clip" in params
    assert (
        ocm.parse_args,
        ocm.create_loss,
        ocm.create_model_and_transforms,
        ocd.CsvDataset,
    ) == originals


def test_finetune_captions_from_cache_with_accum_freq(
    data: Data, pretrained: dict[str, Any], probe: Probe
) -> None:
    """Each sample's caption reaches the loss, also across accumulated micro-batches."""
    tokenizer = open_clip.get_tokenizer(TINY)
    cache = CaptionCache.open(data.cache)
    table = cache[:]

    def check_text_features_belong_to_indices(model: Any, kw: dict[str, Any]) -> None:
        indices = rows_of(kw[TARGETS_KEY], table)
        with torch.no_grad():
            expected = model.encode_text(
                tokenizer([data.captions[i] for i in indices]), normalize=True
            )
        torch.testing.assert_close(
            kw["text_features"].detach(), expected, rtol=1e-4, atol=1e-5
        )

    probe.on_call = check_text_features_belong_to_indices
    args = train_args(
        data,
        "ft-captions",
        "--pretrained",
        str(pretrained["checkpoint"]),
        "--accum-freq",
        "2",
        "--val-data",  # the patched CSV dataset also serves open_clip's evaluation
        str(data.train),
    )
    args += [
        "--loss",
        "xclr-clip",
        "--xclr-caption-cache",
        str(data.cache),
        "--xclr-target-temperature",
        "0.2",
    ]
    assert main(args) is None

    assert isinstance(probe.loss, CaptionTargets)
    assert isinstance(probe.loss.loss, XCLRClipLoss)
    assert len(probe.calls) == 6  # 3 optimizer steps x 2 micro-batches
    seen: list[int] = []
    for call in probe.calls:
        indices = rows_of(call[TARGETS_KEY], table)
        assert len(set(indices)) == 8
        seen += indices
        want = dense_xclr_clip(
            call["image_features"].double(),
            call["text_features"].double(),
            call["logit_scale"].double(),
            descriptions=cache[indices].double(),
            target_temperature=0.2,
        )
        torch.testing.assert_close(call["loss"].double(), want, rtol=1e-5, atol=1e-6)
    assert sorted(set(seen)) == list(range(24))
    tuned = assert_loads_back(TINY, checkpoint(data, "ft-captions"))
    start = state_dict(pretrained["checkpoint"])
    assert not torch.equal(
        tuned.state_dict()["text_projection"], start["text_projection"]
    )


def test_finetune_clip_text_with_lock_image(
    data: Data, pretrained: dict[str, Any], probe: Probe
) -> None:
    args = train_args(
        data,
        "ft-clip-text",
        "--pretrained",
        str(pretrained["checkpoint"]),
        "--lock-image",
    )
    assert (
        main([*args, "--loss", "xclr-clip", "--xclr-target-mode", "clip-text"]) is None
    )
    assert (
        isinstance(probe.loss, XCLRClipLoss) and probe.loss.target_mode == "clip-text"
    )
    for call in probe.calls:
        want = dense_xclr_clip(
            call["image_features"].double(),
            call["text_features"].double(),
            call["logit_scale"].double(),
            descriptions=call["text_features"].double(),
            target_temperature=0.1,
        )
        torch.testing.assert_close(call["loss"].double(), want, rtol=1e-5, atol=1e-6)
    tuned = assert_loads_back(TINY, checkpoint(data, "ft-clip-text")).state_dict()
    start = state_dict(pretrained["checkpoint"])
    assert all(
        torch.equal(tuned[k], start[k]) for k in start if k.startswith("visual.")
    )
    assert not torch.equal(tuned["text_projection"], start["text_projection"])


def test_model_with_logit_bias_and_captions_embedded_at_start_up(
    data: Data, probe: Probe, encoder: TextEncoder
) -> None:
    args = train_args(data, "bias", model=TINY_BIAS)
    assert main([*args, "--loss", "xclr-clip"]) is None
    assert isinstance(probe.loss, CaptionTargets)
    first = probe.calls[0]
    assert first["logit_bias"].item() == -10.0
    table = encoder.encode(data.captions)
    descriptions = table[rows_of(first[TARGETS_KEY], table)]
    want = dense_xclr_clip(
        first["image_features"].double(),
        first["text_features"].double(),
        first["logit_scale"].double(),
        logit_bias=first["logit_bias"].double(),
        descriptions=descriptions.double(),
        target_temperature=0.1,
    )
    torch.testing.assert_close(first["loss"].double(), want, rtol=1e-5, atol=1e-6)
    loaded = assert_loads_back(TINY_BIAS, checkpoint(data, "bias"))
    assert loaded.logit_bias is not None


def test_loss_siglip_gets_the_siglip_model_init(data: Data, probe: Probe) -> None:
    reference: Any = SigLipLoss()  # recomputes the recorded step
    assert main([*train_args(data, "loss-siglip"), "--loss", "siglip"]) is None
    assert probe.loss.__class__ is SigLipLoss
    first = probe.calls[0]
    assert first["logit_bias"].item() == -10.0  # as open_clip_train --siglip
    torch.testing.assert_close(first["logit_scale"], torch.tensor(10.0))
    inputs = {
        k: first[k]
        for k in ("image_features", "text_features", "logit_scale", "logit_bias")
    }
    torch.testing.assert_close(first["loss"], reference(**inputs))


def test_target_hooks_and_dataset(data: Data) -> None:
    """Targets travel bit for bit in the token rows; the model sees plain tokens."""
    tokenizer = open_clip.get_tokenizer(TINY)
    model, preprocess, _ = open_clip.create_model_and_transforms(TINY, output_dict=True)
    table = torch.randn(len(data.captions), 5)
    dataset = targets_csv_dataset(ocd.CsvDataset, table)(
        str(data.train), preprocess, "filepath", "title", tokenizer=tokenizer
    )
    image, tokens = dataset[5]
    plain = tokenizer([data.captions[5]])[0]
    assert torch.equal(tokens, pack(plain, table[5])) and torch.equal(
        tokens[:32], plain
    )
    images = torch.stack([image, dataset[7][0]])
    texts = torch.stack([tokens, dataset[7][1]])
    attach_target_hooks(model, dim=5)
    want = model(images, texts[:, :32])
    got = model(images, texts)
    assert torch.equal(got[TARGETS_KEY], table[[5, 7]])
    torch.testing.assert_close(
        got["text_features"], want["text_features"], rtol=0, atol=0
    )
    assert TARGETS_KEY not in model(images, texts[:, :32])  # rows without targets
    model.eval()  # evaluation on the patched CSV dataset: stripped, not carried
    evaluated = model(images, texts)
    assert TARGETS_KEY not in evaluated
    assert torch.equal(
        evaluated["text_features"], model(images, texts[:, :32])["text_features"]
    )


def test_packed_targets_keep_every_float32_bit() -> None:
    special = torch.tensor([0.0, -0.0, 1e-45, -3.4e38, float("inf"), 1.0 / 3.0])
    from xclr_plugin.integrations.open_clip_train.data import unpack

    packed = torch.stack([pack(torch.arange(4), special)] * 2)
    tokens, targets = unpack(packed, dim=6)  # type: ignore[misc]
    assert torch.equal(tokens, torch.arange(4).expand(2, 4))
    assert torch.equal(
        targets.view(torch.int32), special.expand(2, 6).view(torch.int32)
    )
    assert unpack(packed[:, :-1], dim=6) is None  # the marker is not where dim says


# -- errors before training -------------------------------------------------------------


@pytest.fixture(scope="module")
def other_cache(data: Data, encoder: TextEncoder) -> Path:
    """A cache of a different CSV: the same images, one caption changed."""
    records = [
        CaptionRecord(p, c) for p, c in zip(data.images, data.captions, strict=True)
    ]
    records[3] = CaptionRecord(records[3].filename, "a dog")
    path = data.root / "other-cache"
    build_caption_cache(records, path, encoder, progress=False)
    return path


@pytest.fixture(scope="module")
def nan_cache(data: Data) -> Path:
    """The training CSV's cache with one NaN row (as a corrupted or bad encoder gives)."""
    path = data.root / "nan-cache"
    shutil.copytree(data.cache, path)
    array = np.load(path / CaptionCache.open(path).data_path.name, mmap_mode="r+")
    array[5, 3] = np.nan
    array.flush()
    del array
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--loss", "xclr-clipp"],
            "Unknown loss name 'xclr-clipp'. Did you mean 'xclr-clip'?",
        ),
        (["--loss", "ntxent"], "is a two-view (lightly-style) loss"),
        (
            ["--loss", "clip", "--xclr-target-mode", "clip-text"],
            "only apply to losses with caption targets",
        ),
        (["--xclr-target-temperature", "0.2"], "need --loss"),
        (
            ["--loss", "xclr-clip", "--dataset-type", "synthetic"],
            "needs each sample's caption",
        ),
        (
            ["--loss", "xclr-clip", "--xclr-caption-cache", "OTHER"],
            "does not belong to --train-data",
        ),
        (
            ["--loss", "xclr-clip", "--xclr-caption-cache", "MISSING"],
            "xclr-embed-captions",
        ),
        (
            ["--loss", "xclr-clip", "--xclr-target-temperature", "0"],
            "--xclr-target-temperature must be",
        ),
        (
            ["--loss", "xclr-clip", "--xclr-target-mode", "clip-text", "NOTRAIN"],
            "give --train-data",
        ),
        (
            ["--loss", "clip", "--dataset-type", "auto", "--train-data", "x.parquet"],
            "cannot tell its type from the extension 'parquet'",
        ),
        (["--loss", "xclr-clip", "--accum-freq", "0"], "--accum-freq must be >= 1"),
        (
            ["--loss", "clip", "--dataset-type", "csv", "--train-data", "MISSING"],
            "does not exist",
        ),
        (
            ["--loss", "xclr-clip", "--xclr-caption-cache", "NANCACHE"],
            "row(s) with NaN or infinite values",
        ),
        (["--loss", "clip", "--lock-text"], "needs --lock-text-freeze-layer-norm"),
        (
            ["--loss", "xclr-clip", "--xclr-text-device", "cuda:99"],
            "--xclr-text-device 'cuda:99': cannot load the encoder",
        ),
        (["--loss", "xclr-clip", "--batch-size", "25"], "fewer than one global batch"),
        (
            ["--loss", "clip", "--distill-model", TINY, "--distill-pretrained", "x"],
            "cannot be combined with --distill-model/--distill-pretrained",
        ),
        (["--loss", "clip", "--model", "coca_ViT-B-32"], "does not support CoCa"),
        (
            [
                "--loss",
                "xclr-clip",
                "--xclr-target-mode",
                "clip-text",
                "--xclr-caption-cache",
                "OTHER",
            ],
            "--xclr-caption-cache is only used with --xclr-target-mode captions",
        ),
    ],
)
def test_bad_input_fails_before_training(
    data: Data,
    other_cache: Path,
    nan_cache: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = "bad-" + "-".join(e.strip("-") for e in extra[:4])[:60]
    replace = {
        "OTHER": str(other_cache),
        "MISSING": str(data.root / "nothing"),
        "NANCACHE": str(nan_cache),
    }
    args = [*train_args(data, name), *[replace.get(e, e) for e in extra]]
    if "NOTRAIN" in args:
        args.remove("NOTRAIN")
        i = args.index("--train-data")
        del args[i : i + 2]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (
        data.root / "logs" / name
    ).exists()  # refused before open_clip wrote anything


def test_existing_run_name_fails_before_anything(
    data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    run = data.root / "logs" / "taken"
    run.mkdir(parents=True)
    (run / "out.log").write_text("an earlier run\n")
    assert main([*train_args(data, "taken"), "--loss", "clip"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("xclr-openclip-train: error: the experiment") and "--name" in err
    )
    assert sorted(p.name for p in run.iterdir()) == ["out.log"]


def test_other_open_clip_major_version_is_refused(
    data: Data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(open_clip, "__version__", "4.0.0")
    assert main([*train_args(data, "v4"), "--loss", "xclr-clip"]) == 2
    assert "supports open_clip_torch 3.x" in capsys.readouterr().err


def test_help_lists_both_flag_sets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "--loss NAME" in out and "--xclr-caption-cache" in out and "--train-data" in out
    )


# -- non-finite losses, torch.compile, bf16 autocast -----------------------------------


def test_non_finite_loss_stops_training_before_the_update(
    data: Data, probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    """open_clip alone logs a NaN loss, steps and saves NaN checkpoints; we stop."""

    def poison_logit_scale(model: Any, kw: dict[str, Any]) -> None:
        if len(probe.calls) == 1:  # the third loss call sees a NaN logit scale
            with torch.no_grad():
                model.logit_scale.fill_(float("nan"))

    probe.on_call = poison_logit_scale
    name = "nan-loss"
    args = [*train_args(data, name), "--loss", "xclr-clip", "--xclr-caption-cache"]
    assert main([*args, str(data.cache)]) == 1
    all_err = capsys.readouterr().err
    err = all_err.splitlines()[-1]  # after open_clip's log lines
    assert err.startswith("xclr-openclip-train: error: non-finite loss")
    assert "at loss call 3 (non-finite inputs: logit_scale)" in err
    assert "Traceback" not in all_err
    assert len(probe.calls) == 3
    assert not checkpoint(data, name).exists()


def test_torchcompile_captions_mode(
    data: Data, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--torchcompile: the sample-index hooks run inside the compiled model.

    The backend is ``eager``: dynamo captures the graphs (hooks included) as for
    inductor, whose C++ code generation took 188 s for this run on 2 busy CPU cores
    (``aot_eager``: 31 s); ``XCLR_TEST_COMPILE_BACKEND=inductor`` runs the real one.
    """
    compiled: list[Any] = []
    original = torch.compile

    backend = os.environ.get("XCLR_TEST_COMPILE_BACKEND", "eager")

    def compile_with_backend(model: Any, **kwargs: Any) -> Any:
        compiled.append(model)
        return original(model, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_backend)
    torch._dynamo.reset()
    name = "compile"
    args = [*train_args(data, name), "--torchcompile", "--loss", "xclr-clip"]
    assert main([*args, "--xclr-caption-cache", str(data.cache)]) is None
    assert len(compiled) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled
    cache = CaptionCache.open(data.cache)
    assert len(probe.calls) == 6
    for call in probe.calls:
        indices = rows_of(call[TARGETS_KEY], cache[:])
        assert len(indices) == 4
        want = dense_xclr_clip(
            call["image_features"].double(),
            call["text_features"].double(),
            call["logit_scale"].double(),
            descriptions=cache[indices].double(),
            target_temperature=0.1,
        )
        torch.testing.assert_close(call["loss"].double(), want, rtol=1e-5, atol=1e-6)
    assert_loads_back(TINY, checkpoint(data, name))


def test_amp_bf16_captions_mode(data: Data, probe: Probe) -> None:
    name = "bf16"
    args = train_args(data, name)
    args[args.index("--precision") + 1] = "amp_bf16"
    args += ["--loss", "xclr-clip", "--xclr-caption-cache", str(data.cache)]
    assert main(args) is None
    cache = CaptionCache.open(data.cache)
    assert len(probe.calls) == 6
    for call in probe.calls:
        assert torch.isfinite(call["loss"])
        want = dense_xclr_clip(
            call["image_features"].double(),
            call["text_features"].double(),
            call["logit_scale"].double(),
            descriptions=cache[rows_of(call[TARGETS_KEY], cache[:])].double(),
            target_temperature=0.1,
        )
        # products may follow autocast (bf16: 8 bits of mantissa)
        torch.testing.assert_close(call["loss"].double(), want, rtol=2e-2, atol=2e-2)
    tuned = state_dict(checkpoint(data, name))
    assert all(torch.isfinite(v).all() for v in tuned.values() if v.is_floating_point())
    assert_loads_back(TINY, checkpoint(data, name))


def test_a_batch_without_caption_targets_is_refused_by_name() -> None:
    """Captions mode never trains without targets: missing ones are a clear error."""
    wrapped = CaptionTargets(XCLRClipLoss())
    features = torch.randn(4, 8)
    with pytest.raises(
        RuntimeError, match="No 'xclr_caption_targets' reached the loss"
    ):
        wrapped(
            image_features=features,
            text_features=features,
            logit_scale=torch.tensor(1.0),
        )


def test_resume_latest_skips_a_cut_off_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed while saving leaves a truncated newest checkpoint: resume before it."""
    from xclr_plugin.integrations.open_clip_train.patch import complete_latest

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2, 10):
        torch.save({"epoch": epoch}, folder / f"epoch_{epoch}.pt")
    newest = folder / "epoch_10.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    latest = complete_latest(ocm.get_latest_checkpoint)
    assert ocm.get_latest_checkpoint(str(folder), remote=False).endswith("epoch_10.pt")
    assert latest(str(folder), remote=False) == str(folder / "epoch_2.pt")
    assert "skipping the checkpoint" in caplog.text and "epoch_10.pt" in caplog.text
    for epoch in (1, 2):
        (folder / f"epoch_{epoch}.pt").write_bytes(b"cut")
    assert latest(str(folder), remote=False) is None  # none left: start afresh


def test_open_clips_own_refusal_is_one_line_exit_2(
    data: Data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """open_clip returns -1 (e.g. a run of the same --name started meanwhile)."""
    monkeypatch.setattr(ocm, "main", lambda args: -1)
    assert main(train_args(data, "raced")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("xclr-openclip-train: error: open_clip_train stopped")
    assert "another run with this --name" in err
