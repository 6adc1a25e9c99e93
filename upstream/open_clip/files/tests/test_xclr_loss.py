import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import open_clip
from open_clip.loss import ClipLoss, XCLRClipLoss
from open_clip_train.main import main

os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _features(batch_size=8, dim=16, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch_size, dim, generator=generator, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(batch_size, dim, generator=generator, dtype=dtype), dim=1)
    return image, text


def _loss_and_grads(loss_fn, image, text, logit_scale, logit_bias=None, **kwargs):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    loss = loss_fn(image, text, logit_scale, logit_bias, **kwargs)
    loss.backward()
    return loss, image.grad, text.grad


def _soft_clip_loss(image, text, logit_scale, descriptions, target_temperature, logit_bias=None):
    """Dense reference: cross-entropy with soft targets in both directions."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    descriptions = F.normalize(descriptions, dim=1)
    targets = torch.softmax(descriptions @ descriptions.T / target_temperature, dim=1)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@pytest.mark.parametrize("logit_bias", [None, -2.0])
def test_xclr_without_targets_equals_clip(logit_bias):
    image, text = _features()
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    bias = None if logit_bias is None else torch.tensor(logit_bias, dtype=torch.float64)
    expected = _loss_and_grads(ClipLoss(), image, text, logit_scale, bias)
    result = _loss_and_grads(XCLRClipLoss(), image, text, logit_scale, bias)
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target_temperature", [0.05, 0.1, 1.0])
def test_xclr_caption_targets(target_temperature):
    image, text = _features()
    captions = torch.randn(8, 5, dtype=torch.float64)
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    loss_fn = XCLRClipLoss(target_temperature=target_temperature)
    loss = loss_fn(image, text, logit_scale, targets=captions)
    expected = _soft_clip_loss(image, text, logit_scale, captions, target_temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_xclr_clip_text_targets():
    image, text = _features()
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    loss_fn = XCLRClipLoss(target_mode="clip-text", target_temperature=0.1)
    loss, image_grad, text_grad = _loss_and_grads(loss_fn, image, text, logit_scale, bias)
    # The targets come from the detached text features: no gradient through them.
    image_ref = image.clone().requires_grad_()
    text_ref = text.clone().requires_grad_()
    expected = _soft_clip_loss(image_ref, text_ref, logit_scale, text.clone(), 0.1, bias)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(image_grad, image_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(text_grad, text_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_xclr_chunked_equals_dense(chunk_size):
    image, text = _features(batch_size=7)
    captions = torch.randn(7, 5, dtype=torch.float64)
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    dense = _loss_and_grads(XCLRClipLoss(), image, text, logit_scale, targets=captions)
    chunked = _loss_and_grads(
        XCLRClipLoss(chunk_size=chunk_size), image, text, logit_scale, targets=captions
    )
    for got, want in zip(chunked, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_xclr_second_derivatives_match_dense(chunk_size):
    # create_graph=True (gradient penalties): the Hessian term is kept.
    image, text = _features(batch_size=5)
    image.requires_grad_()
    captions = torch.randn(5, 4, dtype=torch.float64)
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    penalties = []
    for loss_fn in (
        lambda i: XCLRClipLoss(chunk_size=chunk_size)(i, text, logit_scale, targets=captions),
        lambda i: _soft_clip_loss(i, text, logit_scale, captions, 0.1),
    ):
        (grad,) = torch.autograd.grad(loss_fn(image), image, create_graph=True)
        penalties.append(torch.autograd.grad(grad.pow(2).sum(), image)[0])
    torch.testing.assert_close(*penalties, rtol=1e-10, atol=1e-10)


def test_xclr_output_dict():
    image, text = _features()
    out = XCLRClipLoss(target_mode="clip-text")(image, text, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_xclr_invalid_arguments():
    with pytest.raises(ValueError):
        XCLRClipLoss(target_temperature=0.0)
    with pytest.raises(ValueError):
        XCLRClipLoss(target_mode="unknown")
    image, text = _features()
    with pytest.raises(ValueError):
        XCLRClipLoss(target_mode="clip-text")(image, text, torch.tensor(10.0), targets=torch.randn(8, 5))


@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_xclr(tmp_path):
    # A tiny model keeps the test fast on CPU.
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    config_path = tmp_path / "xclr-test-tiny.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    main([
        '--save-frequency', '1',
        '--dataset-type', "synthetic",
        '--train-num-samples', '16',
        '--warmup', '1',
        '--batch-size', '4',
        '--lr', '1e-3',
        '--wd', '0.1',
        '--epochs', '1',
        '--workers', '0',
        '--precision', 'fp32',
        '--device', 'cpu',
        '--model', 'xclr-test-tiny',
        '--xclr',
        '--xclr-target-temperature', '0.1',
        '--logs', str(tmp_path / "logs"),
        '--name', 'xclr',
    ])
    assert (tmp_path / "logs" / "xclr" / "checkpoints" / "epoch_1.pt").exists()
