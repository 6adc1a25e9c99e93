"""Issue 10: XCLRClipLoss without targets behaves as open_clip's ClipLoss.

open_clip 3.3 ships no unit test of ``ClipLoss`` (its ``tests/`` hold training runs;
``xclr-openclip-train``'s tests run those with our loss). Its current master adds
``tests/test_loss.py``, which checks the feature gathering with gradient by replacing
the collective with a fake 2-rank gather. Every scenario here runs the host class and
ours on the same inputs and compares values and gradients: single process and a faked
2-rank gather (as open_clip's own test fakes it; no process group), every
``local_loss``/``gather_with_grad`` layout, ``cache_labels``, ``logit_bias``,
``output_dict``, batches of 1, float32/float64 and bf16/fp16 autocast. Where
``ClipLoss`` gives garbage (NaN for an empty batch) or a raw matmul error (integer
features, mixed dtypes), XCLRClipLoss refuses with a ``ValueError`` naming the problem
(before this change it computed integer features silently and gave NaN for an empty
batch).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from xclr_plugin.clip_loss import XCLRClipLoss

LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]


def _batch(n: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image_features": F.normalize(torch.randn(n, 6, generator=gen), dim=1).to(
            dtype
        ),
        "text_features": F.normalize(torch.randn(n, 6, generator=gen), dim=1).to(dtype),
        "logit_scale": torch.tensor(10.0, dtype=dtype),
        "logit_bias": torch.tensor(-1.5, dtype=dtype),
    }


def _other_rank(x: torch.Tensor) -> torch.Tensor:
    """What the fake second rank contributes: a fixed function of the local tensor."""
    return (x.detach().flip(0) * 0.5 + 0.1).contiguous()


@pytest.fixture
def fake_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2, as open_clip's tests fake the collective (no process group)."""

    def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x, _other_rank(x))

    def all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
        parts[0].copy_(x)
        parts[1].copy_(_other_rank(x))

    import torch.distributed.nn

    monkeypatch.setattr(torch.distributed.nn, "all_gather", all_gather_with_grad)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)


def _run(
    loss_fn: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any
) -> list[torch.Tensor]:
    inputs = {k: v.clone().requires_grad_(True) for k, v in batch.items()}
    out = loss_fn(**inputs, **kwargs)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return [loss.detach()] + [
        torch.zeros_like(v) if g is None else g
        for g, v in zip(grads, inputs.values(), strict=True)
    ]


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to the last bit of float32 (autograd may sum gradient paths in
    another order); float64 to 1e-12."""
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        tol = 1e-12 if g.dtype == torch.float64 else 2e-7
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 7])
@pytest.mark.parametrize(("local_loss", "gather_with_grad"), LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2])
def test_same_values_and_gradients(
    request: pytest.FixtureRequest,
    world_size: int,
    local_loss: bool,
    gather_with_grad: bool,
    batch_size: int,
    bias: bool,
    dtype: torch.dtype,
) -> None:
    if world_size == 2:
        request.getfixturevalue("fake_two_ranks")
    batch = _batch(batch_size, dtype)
    if not bias:
        del batch["logit_bias"]
    opts: dict[str, Any] = {
        "local_loss": local_loss,
        "gather_with_grad": gather_with_grad,
        "rank": 0,
        "world_size": world_size,
    }
    want = _run(ClipLoss(**opts), batch)
    _assert_equal(_run(XCLRClipLoss(**opts), batch), want)
    # The chunked path: same loss and gradients up to rounding.
    for g, w in zip(_run(XCLRClipLoss(**opts, chunk_size=2), batch), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("cache_labels", [False, True])
def test_output_dict_and_cached_labels_over_calls(
    output_dict: bool, cache_labels: bool
) -> None:
    host, ours = (
        ClipLoss(cache_labels=cache_labels),
        XCLRClipLoss(cache_labels=cache_labels),
    )
    for batch_size in (4, 4, 3, 4):  # the label cache is keyed by device and size
        batch = _batch(batch_size, torch.float32, seed=batch_size)
        got = ours(**batch, output_dict=output_dict)
        want = host(**batch, output_dict=output_dict)
        assert type(got) is type(want)
        if isinstance(want, dict):
            assert isinstance(got, dict) and got.keys() == want.keys()
            got, want = got["contrastive_loss"], want["contrastive_loss"]
        assert torch.equal(got, want)
    assert ours.labels.keys() == host.labels.keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_under_autocast(dtype: torch.dtype) -> None:
    """Issue 13: the products follow autocast as in ClipLoss, so the values are equal."""
    batch = _batch(16, torch.float32, seed=3)
    with torch.autocast("cpu", dtype=dtype):
        want = _run(ClipLoss(), batch)
        got = _run(XCLRClipLoss(), batch)
    _assert_equal(got, want)


def test_mixed_dtypes_under_autocast_work_as_in_clip_loss() -> None:
    batch = _batch(5, torch.float32, seed=4)
    batch["text_features"] = batch["text_features"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(ClipLoss(), batch)
        got = _run(XCLRClipLoss(), batch)
    _assert_equal(got, want)


# -- where ClipLoss gives garbage or a raw error, we refuse clearly ------------------


def test_integer_features() -> None:
    batch = _batch(4, torch.float32)
    ints = {**batch, "image_features": torch.ones(4, 6, dtype=torch.long)}
    ints["text_features"] = torch.ones(4, 6, dtype=torch.long)
    with pytest.raises(RuntimeError):  # a raw matmul dtype error
        ClipLoss()(**ints)
    with pytest.raises(
        ValueError,
        match=r"image_features must be a floating point tensor, got torch\.int64",
    ):
        XCLRClipLoss()(**ints)


def test_empty_batch() -> None:
    batch = _batch(0, torch.float32)
    assert torch.isnan(ClipLoss()(**batch))
    with pytest.raises(
        ValueError, match=r"at least 1 sample and 1 feature, got shape \(0, 6\)"
    ):
        XCLRClipLoss()(**batch)


def test_zero_feature_dimension() -> None:
    batch = {**_batch(3, torch.float32)}
    batch["image_features"] = torch.zeros(3, 0)
    batch["text_features"] = torch.zeros(3, 0)
    with pytest.raises(
        ValueError, match=r"at least 1 sample and 1 feature, got shape \(3, 0\)"
    ):
        XCLRClipLoss()(**batch)


def test_mixed_dtypes_without_autocast() -> None:
    batch = _batch(4, torch.float32)
    batch["text_features"] = batch["text_features"].double()
    with pytest.raises(RuntimeError):
        ClipLoss()(**batch)
    with pytest.raises(RuntimeError), torch.autocast("cpu", dtype=torch.bfloat16):
        ClipLoss()(**batch)  # autocast leaves float64 alone
    with (
        pytest.raises(ValueError, match="must have the same dtype"),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        XCLRClipLoss()(**batch)
    with pytest.raises(
        ValueError,
        match=r"must have the same dtype, got torch\.float32 and torch\.float64",
    ):
        XCLRClipLoss()(**batch)
