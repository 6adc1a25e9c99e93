"""Inputs both losses refuse or accept alike (issue 21, rough loss cases).

Descriptions of the wrong kind, float64 mixed with another precision, and a NaN caption
that would stay in a memory bank: each is refused with a message that names it, as
lightly's NTXentLoss / torch refuse what they cannot compute.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from xclr_plugin import XCLRLoss
from xclr_plugin.clip_loss import XCLRClipLoss

BAD_DESCRIPTIONS = {
    "bool labels": (torch.tensor([True, False, True, False]), "torch.bool"),
    "complex labels": (torch.zeros(4, dtype=torch.complex64), "torch.complex64"),
    "bool embeddings": (torch.ones(4, 3, dtype=torch.bool), "torch.bool"),
    "complex embeddings": (torch.ones(4, 3, dtype=torch.complex64), "torch.complex64"),
}


def _two_view(targets: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = XCLRLoss()(torch.randn(4, 3), torch.randn(4, 3), targets)
    return loss


def _image_text(targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    image, text = F.normalize(torch.randn(2, 4, 3), dim=2)
    loss_fn = XCLRClipLoss(chunk_size=chunk_size)
    loss: torch.Tensor = loss_fn(image, text, torch.tensor(10.0), targets=targets)
    return loss


@pytest.mark.parametrize("kind", BAD_DESCRIPTIONS)
def test_bool_and_complex_descriptions_are_refused_by_both_losses(kind: str) -> None:
    """On d50eea5 XCLRClipLoss computed a loss from bool and complex labels."""
    targets, dtype = BAD_DESCRIPTIONS[kind]
    for loss in (_two_view, _image_text, lambda t: _image_text(t, chunk_size=2)):
        with pytest.raises(ValueError, match=rf"targets .* got {dtype}"):
            loss(targets)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.float64),
        (torch.float64, torch.bfloat16),
    ],
)
def test_float64_mixed_with_another_precision_is_refused(
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    """Before: computed in out0's precision (float32 for a float32/float64 pair)."""
    out0, out1 = (torch.randn(4, 3, dtype=d) for d in dtypes)
    with pytest.raises(RuntimeError):  # the host refuses too
        NTXentLoss()(out0, out1)
    message = (
        rf"out0 and out1 must have the same dtype, got {dtypes[0]} and {dtypes[1]}"
    )
    with pytest.raises(ValueError, match=message):
        XCLRLoss()(out0, out1)
    with pytest.raises(ValueError, match="must have the same dtype"):
        XCLRClipLoss()(out0, out1, torch.tensor(10.0))


def test_other_mixes_are_computed_in_float32() -> None:
    """float16/bfloat16 with float32: both are cast to float32 exactly (as autocast)."""
    gen = torch.Generator().manual_seed(0)
    out0, out1 = torch.randn(2, 6, 4, generator=gen)
    half = out0.bfloat16()
    assert XCLRLoss()(half, out1) == XCLRLoss()(half.float(), out1)


def test_nan_caption_never_enters_the_memory_bank() -> None:
    """Before: no error, and the NaN row in the bank made the next 6 losses NaN."""
    loss_fn = XCLRLoss(memory_bank_size=(24, 3)).double()
    gen = torch.Generator().manual_seed(0)

    def batch() -> list[torch.Tensor]:
        return [
            torch.randn(4, d, generator=gen, dtype=torch.float64, requires_grad=r)
            for d, r in ((3, True), (3, True), (5, False))
        ]

    out0, out1, captions = batch()
    captions[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"targets row 2 \(of 4\) is NaN or infinite"):
        loss_fn(out0, out1, captions)
    captions[2, 1] = math.inf
    with pytest.raises(ValueError, match=r"targets row 2 \(of 4\) is NaN or infinite"):
        loss_fn(out0, out1, captions)
    for _ in range(7):  # more than the 24 / 4 = 6 batches the bank keeps
        assert torch.isfinite(loss_fn(*batch()))
    # Without gradient the bank is not updated: NaN in, NaN out, as without a bank.
    out0, out1, captions = (t.detach() for t in batch())
    captions[0, 0] = math.nan
    assert torch.isnan(loss_fn(out0, out1, captions))
