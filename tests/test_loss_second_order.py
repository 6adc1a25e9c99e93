"""Second derivatives and torch.func through XCLRLoss and XCLRClipLoss (issue 21, wrong 3).

The fused autograd Functions keep first-order gradients only; under
``create_graph=True`` (double backward, gradient penalties, Hessian-vector products)
they differentiate a plain-torch copy of the loss, and under torch.func transforms they
run it. Oracles: lightly's NTXentLoss and open_clip's ClipLoss on identity targets, the
dense transcriptions of the spec (``_xclr_reference``, ``_clip_helpers``) with plain
autograd, and ``gradgradcheck`` (finite differences of the gradient) in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _clip_helpers import TARGET_TEMPERATURE, clip_batch, dense_xclr_clip
from lightly.loss import NTXentLoss
from open_clip.loss import ClipLoss

from xclr_plugin import XCLRLoss
from xclr_plugin.clip_loss import XCLRClipLoss

import _xclr_reference as ref

ATOL = 1e-10
TAU, TAU_S = 0.3, 0.2
TwoViewLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(  # type: ignore[return-value]
        torch.randn(n, d, generator=gen, dtype=torch.float64) for d in (5, 5, 4)
    )


def _gradient_penalty_grads(loss_fn: TwoViewLoss) -> list[torch.Tensor]:
    """d/dW of ||dL/dW||^2 for the weights W of a linear projection head."""
    x0, x1, _ = _inputs()
    torch.manual_seed(1)
    head = torch.nn.Linear(5, 3).double()
    loss = loss_fn(head(x0), head(x1))
    grads = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
    penalty = torch.stack([(g**2).sum() for g in grads]).sum()
    return list(torch.autograd.grad(penalty, list(head.parameters())))


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradient_penalty_equals_ntxent(chunk_size: int | None) -> None:
    """Before the fix: max difference 0.3 (the Hessian term was dropped)."""
    expected = _gradient_penalty_grads(NTXentLoss(TAU))
    _assert_close(
        _gradient_penalty_grads(XCLRLoss(TAU, chunk_size=chunk_size)), expected
    )


@pytest.mark.parametrize("kind", ["captions", "labels"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradient_penalty_with_targets_equals_dense_reference(
    kind: str, chunk_size: int | None
) -> None:
    captions = _inputs()[2]
    targets = captions if kind == "captions" else torch.tensor([0, 1, 0, 2, 1, 1])
    loss_fn = XCLRLoss(TAU, TAU_S, chunk_size=chunk_size)
    _assert_close(
        _gradient_penalty_grads(lambda a, b: loss_fn(a, b, targets)),
        _gradient_penalty_grads(lambda a, b: ref.xclr(a, b, targets, TAU, TAU_S)),
    )


def test_gradient_penalty_with_a_memory_bank_equals_ntxent() -> None:
    torch.manual_seed(0)
    ntxent = NTXentLoss(TAU, memory_bank_size=(8, 3)).double()
    torch.manual_seed(0)
    xclr = XCLRLoss(TAU, memory_bank_size=(8, 3)).double()
    for _ in range(2):  # the second round scores against a filled bank
        _assert_close(_gradient_penalty_grads(xclr), _gradient_penalty_grads(ntxent))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("kind", ["none", "captions"])
def test_gradgradcheck_two_view(chunk_size: int | None, kind: str) -> None:
    x0, x1, captions = (t[:3, :3] for t in _inputs())
    targets = [captions] if kind == "captions" else []
    loss_fn = XCLRLoss(TAU, TAU_S, chunk_size=chunk_size)
    inputs = (x0.requires_grad_(), x1.requires_grad_())
    assert torch.autograd.gradgradcheck(
        lambda a, b: loss_fn(a, b, *targets), inputs, fast_mode=True
    )


def _clip_penalty_grads(
    loss_fn: Callable[..., torch.Tensor], bias: bool
) -> list[torch.Tensor]:
    """The gradient penalty of both towers' weights and the logit scale and bias."""
    batch = clip_batch(6, bias=bias)
    torch.manual_seed(1)
    image_tower, text_tower = torch.nn.Linear(8, 4).double(), torch.nn.Linear(8, 4)
    text_tower = text_tower.double()
    scale = batch["logit_scale"].clone().requires_grad_()
    params = [image_tower.weight, text_tower.weight, scale]
    kwargs: dict[str, torch.Tensor] = {}
    if bias:
        params.append(kwargs.setdefault("logit_bias", batch["logit_bias"].clone()))
        params[-1].requires_grad_()
    image = F.normalize(image_tower(batch["image_features"]), dim=1)
    text = F.normalize(text_tower(batch["text_features"]), dim=1)
    loss = loss_fn(image, text, scale, **kwargs)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = torch.stack([(g**2).sum() for g in grads]).sum()
    return list(torch.autograd.grad(penalty, params))


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_clip_gradient_penalty_equals_references(
    chunk_size: int | None, bias: bool
) -> None:
    """Before the fix: dense, a tower-weight gradient norm of 6.1 instead of 15.1;
    chunked, "element 0 of tensors does not require grad"."""
    captions = clip_batch(6)["captions"]
    identity = XCLRClipLoss(chunk_size=chunk_size)
    _assert_close(
        _clip_penalty_grads(identity, bias), _clip_penalty_grads(ClipLoss(), bias)
    )
    soft = XCLRClipLoss(target_temperature=TARGET_TEMPERATURE, chunk_size=chunk_size)
    _assert_close(
        _clip_penalty_grads(lambda *a, **k: soft(*a, **k, targets=captions), bias),
        _clip_penalty_grads(
            lambda i, t, s, **k: dense_xclr_clip(
                i, t, s, captions, TARGET_TEMPERATURE, **k
            ),
            bias,
        ),
    )


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("kind", ["none", "captions"])
def test_gradgradcheck_image_text(chunk_size: int | None, kind: str) -> None:
    """(clip-text targets come from detached features: finite differences of the
    features would move them, so they are not an oracle there.)"""
    batch = clip_batch(3, dim=3, text_dim=3)
    targets = batch["captions"] if kind == "captions" else None
    loss_fn = XCLRClipLoss(target_temperature=0.5, chunk_size=chunk_size)
    inputs = tuple(
        batch[k].clone().requires_grad_()
        for k in ("image_features", "text_features", "logit_scale", "logit_bias")
    )
    assert torch.autograd.gradgradcheck(
        lambda i, t, s, b: loss_fn(i, t, s, b, targets=targets), inputs, fast_mode=True
    )


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_torch_func_grad_equals_ntxent(chunk_size: int | None) -> None:
    """Before the fix: torch's "must override the setup_context staticmethod"."""
    x0, x1, captions = _inputs()
    ours = torch.func.grad(lambda a: XCLRLoss(TAU, chunk_size=chunk_size)(a, x1))(x0)
    torch.testing.assert_close(
        ours,
        torch.func.grad(lambda a: NTXentLoss(TAU)(a, x1))(x0),
        atol=ATOL,
        rtol=ATOL,
    )
    loss_fn = XCLRLoss(TAU, TAU_S, chunk_size=chunk_size)
    hessian = torch.func.hessian(lambda a: loss_fn(a, x1[:3], captions[:3]))(x0[:3])
    expected = torch.autograd.functional.hessian(
        lambda a: ref.xclr(a, x1[:3], captions[:3], TAU, TAU_S), x0[:3]
    )
    torch.testing.assert_close(hessian, expected, atol=ATOL, rtol=ATOL)
    per_sample = torch.func.vmap(lambda a, b: loss_fn(a, b, captions))(
        torch.stack([x0, x1]), torch.stack([x1, x0])
    )
    torch.testing.assert_close(per_sample[0], loss_fn(x0, x1, captions))
    torch.testing.assert_close(per_sample[1], loss_fn(x1, x0, captions))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_torch_func_grad_image_text(chunk_size: int | None) -> None:
    batch = clip_batch(5)
    image, text, scale = (
        batch["image_features"],
        batch["text_features"],
        batch["logit_scale"],
    )
    ours = torch.func.grad(
        lambda i: XCLRClipLoss(chunk_size=chunk_size)(i, text, scale)
    )
    torch.testing.assert_close(
        ours(image), torch.func.grad(lambda i: ClipLoss()(i, text, scale))(image)
    )
    soft = XCLRClipLoss(target_temperature=TARGET_TEMPERATURE, chunk_size=chunk_size)
    captions = batch["captions"]
    torch.testing.assert_close(
        torch.func.grad(lambda i: soft(i, text, scale, targets=captions))(image),
        torch.func.grad(
            lambda i: dense_xclr_clip(i, text, scale, captions, TARGET_TEMPERATURE)
        )(image),
        atol=ATOL,
        rtol=ATOL,
    )


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_mode_ad_equals_the_hosts(chunk_size: int | None) -> None:
    """Before: "You must implement the jvp function" (NTXentLoss and ClipLoss work)."""
    x0, x1, captions = _inputs()
    batch = clip_batch(5)
    image, text, scale = (
        batch[k] for k in ("image_features", "text_features", "logit_scale")
    )

    def tangent(
        fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        with fwAD.dual_level():
            dual = fn(fwAD.make_dual(x, torch.ones_like(x)))
            out: torch.Tensor = fwAD.unpack_dual(dual).tangent
            return out

    pairs = [
        (
            lambda a: XCLRLoss(TAU, chunk_size=chunk_size)(a, x1),
            lambda a: NTXentLoss(TAU)(a, x1),
            x0,
        ),
        (
            lambda i: XCLRClipLoss(chunk_size=chunk_size)(i, text, scale),
            lambda i: ClipLoss()(i, text, scale),
            image,
        ),
    ]
    for ours, host, x in pairs:
        torch.testing.assert_close(
            tangent(ours, x), tangent(host, x), atol=ATOL, rtol=ATOL
        )
    soft = XCLRLoss(TAU, TAU_S, chunk_size=chunk_size)
    torch.testing.assert_close(
        tangent(lambda a: soft(a, x1, captions), x0),
        tangent(lambda a: ref.xclr(a, x1, captions, TAU, TAU_S), x0),
        atol=ATOL,
        rtol=ATOL,
    )
