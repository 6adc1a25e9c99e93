"""XCLRLoss against the spec's properties (XCLR_SPEC.md section 1), single process."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightly.loss import NTXentLoss

from xclr_plugin import XCLRLoss
from xclr_plugin.functional import soft_cross_entropy_dense, xclr_clip_loss_chunked
from xclr_plugin.two_view import xclr_loss

import _xclr_reference as ref

ATOL = 1e-10  # float64: the special cases are exact up to rounding


def _views(
    batch_size: int, dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out0 = torch.randn(
        batch_size, dim, generator=gen, dtype=torch.float64, requires_grad=True
    )
    out1 = torch.randn(
        batch_size, dim, generator=gen, dtype=torch.float64, requires_grad=True
    )
    return out0, out1


def _value_and_grads(
    loss_fn: torch.nn.Module,
    out0: torch.Tensor,
    out1: torch.Tensor,
    *targets: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    loss = loss_fn(out0, out1, *targets)
    return (loss.detach(), *torch.autograd.grad(loss, [out0, out1]))


def _assert_all_close(
    actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]
) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=ATOL)


class TestNTXentIsASpecialCase:
    """Property 1: with the identity graph XCLRLoss is lightly's NTXentLoss."""

    @pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
    @pytest.mark.parametrize("batch_size", [2, 7, 32])
    def test_values_and_gradients_match(
        self, temperature: float, batch_size: int
    ) -> None:
        out0, out1 = _views(batch_size, 16)
        expected = _value_and_grads(NTXentLoss(temperature=temperature), out0, out1)
        actual = _value_and_grads(XCLRLoss(temperature=temperature), out0, out1)
        _assert_all_close(actual, expected)

    def test_memory_bank_matches_over_several_updates(self) -> None:
        # 3 steps of 4 samples wrap a bank of 10 entries around.
        torch.manual_seed(0)
        ntxent = NTXentLoss(temperature=0.2, memory_bank_size=(10, 8)).double()
        torch.manual_seed(0)
        xclr = XCLRLoss(temperature=0.2, memory_bank_size=(10, 8)).double()
        for step in range(4):
            out0, out1 = _views(4, 8, seed=step)
            _assert_all_close(
                _value_and_grads(xclr, out0, out1), _value_and_grads(ntxent, out0, out1)
            )
        torch.testing.assert_close(
            xclr.memory_bank.bank, ntxent.memory_bank.bank, atol=ATOL, rtol=ATOL
        )

    def test_memory_bank_is_not_updated_without_grad(self) -> None:
        xclr = XCLRLoss(memory_bank_size=(8, 4))
        before = xclr.memory_bank.bank.clone()
        with torch.no_grad():
            xclr(torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 3))
        torch.testing.assert_close(xclr.memory_bank.bank, before)
        assert xclr.bank_description_valid is not None
        assert not xclr.bank_description_valid.any()


class TestSoftTargets:
    """Caption and label targets against the dense transcription of the spec."""

    @pytest.mark.parametrize("kind", ["captions", "labels"])
    def test_matches_dense_reference(self, kind: str) -> None:
        out0, out1 = _views(12, 8)
        targets = (
            torch.randn(12, 5, dtype=torch.float64)
            if kind == "captions"
            else torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 5, 5, 1])
        )
        loss_fn = XCLRLoss(temperature=0.3, target_temperature=0.2)
        expected = ref.xclr(out0, out1, targets, 0.3, 0.2)
        expected_grads = torch.autograd.grad(expected, [out0, out1])
        _assert_all_close(
            _value_and_grads(loss_fn, out0, out1, targets),
            (expected.detach(), *expected_grads),
        )

    def test_supcon_is_the_small_target_temperature_limit(self) -> None:
        """Property 2: labels and tau_s -> 0 give the soft-label SupCon loss."""
        out0, out1 = _views(10, 6)
        labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
        expected = ref.supcon(out0, out1, labels, temperature=0.1)
        actual = XCLRLoss(temperature=0.1, target_temperature=1e-4)(out0, out1, labels)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)

    def test_identical_captions_are_like_identical_labels(self) -> None:
        out0, out1 = _views(6, 6)
        labels = torch.tensor([0, 1, 0, 2, 1, 0])
        captions = F.one_hot(labels, 3).double()
        loss_fn = XCLRLoss(target_temperature=0.05)
        torch.testing.assert_close(
            loss_fn(out0, out1, captions),
            loss_fn(out0, out1, labels),
            atol=ATOL,
            rtol=ATOL,
        )

    def test_distinct_labels_with_tiny_target_temperature_are_ntxent(self) -> None:
        out0, out1 = _views(8, 6)
        expected = NTXentLoss(temperature=0.1)(out0, out1)
        actual = XCLRLoss(temperature=0.1, target_temperature=1e-3)(
            out0, out1, torch.arange(8)
        )
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)

    def test_memory_bank_targets_use_stored_descriptions(self) -> None:
        loss_fn = XCLRLoss(
            temperature=0.2, target_temperature=0.5, memory_bank_size=(6, 4)
        ).double()
        first0, first1 = _views(4, 4, seed=1)
        first_captions = torch.randn(4, 3, dtype=torch.float64)
        loss_fn(first0, first1, first_captions)  # fills entries 0..3
        out0, out1 = _views(4, 4, seed=2)
        captions = torch.randn(4, 3, dtype=torch.float64)
        bank = loss_fn.memory_bank.bank.clone()
        loss = loss_fn(out0, out1, captions)

        z0, z1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        logits = torch.cat([(z0 * z1).sum(1, keepdim=True), z0 @ bank.T], dim=1) / 0.2
        sim_bank = F.normalize(captions, dim=1) @ F.normalize(first_captions, dim=1).T
        sim = torch.cat(
            [
                torch.ones(4, 1, dtype=torch.float64),
                sim_bank,
                torch.full((4, 2), -math.inf, dtype=torch.float64),
            ],
            dim=1,
        )
        expected = soft_cross_entropy_dense(logits, torch.softmax(sim / 0.5, dim=1))
        torch.testing.assert_close(loss, expected, atol=ATOL, rtol=ATOL)
        # The second batch wrapped: entries 4, 5 hold its first two captions, 0..3 the first batch.
        assert loss_fn.bank_descriptions is not None
        torch.testing.assert_close(loss_fn.bank_descriptions[4:], captions[:2])
        torch.testing.assert_close(loss_fn.bank_descriptions[:4], first_captions)


class TestBound:
    """Property 3: loss_a = H(G_a) + KL(G_a || P_a) >= H(G_a)."""

    def test_rows_decompose_into_entropy_plus_kl(self) -> None:
        out0, out1 = _views(9, 5)
        captions = torch.randn(9, 4, dtype=torch.float64)
        target = ref.dense_target(captions, 9, 0.1)
        log_probs = ref.dense_log_probs(out0, out1, 0.1)
        positive = target > 0
        entropy = -torch.where(positive, target * target.log(), 0.0).sum(1)
        kl = torch.where(positive, target * (target.log() - log_probs), 0.0).sum(1)
        rows = ref.xclr_rows(out0, out1, captions, 0.1, 0.1)
        torch.testing.assert_close(rows, entropy + kl, atol=ATOL, rtol=ATOL)
        assert bool((kl >= -1e-12).all())
        assert XCLRLoss()(out0, out1, captions) >= entropy.mean() - 1e-12

    def test_equality_when_prediction_equals_target(self) -> None:
        target = torch.softmax(torch.randn(5, 7, dtype=torch.float64) / 0.3, dim=1)
        entropy = -(target * target.log()).sum(1).mean()
        torch.testing.assert_close(
            soft_cross_entropy_dense(target.log() + 3.0, target),
            entropy,
            atol=ATOL,
            rtol=ATOL,
        )


class TestSymmetryAndEquivariance:
    """Property 4."""

    @pytest.mark.parametrize("kind", ["none", "captions", "labels"])
    def test_swapping_views_and_permuting_samples(self, kind: str) -> None:
        out0, out1 = _views(11, 7)
        targets = {
            "none": None,
            "captions": torch.randn(11, 6, dtype=torch.float64),
            "labels": torch.randint(0, 3, (11,)),
        }[kind]
        extra = () if targets is None else (targets,)
        loss_fn = XCLRLoss(temperature=0.2, target_temperature=0.3)
        loss = loss_fn(out0, out1, *extra)
        torch.testing.assert_close(
            loss_fn(out1, out0, *extra), loss, atol=ATOL, rtol=ATOL
        )
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
        permuted = () if targets is None else (targets[perm],)
        torch.testing.assert_close(
            loss_fn(out0[perm], out1[perm], *permuted), loss, atol=ATOL, rtol=ATOL
        )


def _batch_strategy() -> st.SearchStrategy[
    tuple[int, int, int, float, float, str, int]
]:
    return st.tuples(
        st.integers(1, 12),  # batch size
        st.integers(1, 9),  # embedding dim
        st.integers(2, 6),  # caption dim / number of classes
        st.floats(0.02, 3.0),  # temperature
        st.floats(0.01, 3.0),  # target temperature
        st.sampled_from(["none", "captions", "labels", "zero-captions"]),
        st.integers(0, 2**31 - 1),  # seed
    )


@settings(max_examples=60, deadline=None)
@given(_batch_strategy())
def test_property_random_batches_match_dense_reference(
    case: tuple[int, int, int, float, float, str, int],
) -> None:
    batch_size, dim, width, tau, tau_s, kind, seed = case
    gen = torch.Generator().manual_seed(seed)
    out0, out1 = _views(batch_size, dim, seed)
    targets: torch.Tensor | None
    if kind == "captions":
        targets = torch.randn(batch_size, width, generator=gen, dtype=torch.float64)
    elif kind == "zero-captions":
        targets = torch.zeros(batch_size, width, dtype=torch.float64)
    elif kind == "labels":
        targets = torch.randint(0, width, (batch_size,), generator=gen)
    else:
        targets = None
    expected = ref.xclr(out0, out1, targets, tau, tau_s)
    expected_grads = torch.autograd.grad(expected, [out0, out1])
    extra = () if targets is None else (targets,)
    actual = _value_and_grads(XCLRLoss(tau, tau_s), out0, out1, *extra)
    _assert_all_close(actual, (expected.detach(), *expected_grads))
    assert torch.isfinite(actual[0])


class TestGradcheck:
    @pytest.mark.parametrize("kind", ["none", "captions", "labels"])
    def test_functional_core(self, kind: str) -> None:
        out0, out1 = _views(5, 4)
        targets = {
            "none": None,
            "captions": torch.randn(5, 3, dtype=torch.float64),
            "labels": torch.tensor([0, 1, 0, 2, 1]),
        }[kind]

        def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return xclr_loss(
                F.normalize(a, dim=1),
                F.normalize(b, dim=1),
                targets,
                temperature=0.3,
                target_temperature=0.2,
            )

        assert torch.autograd.gradcheck(loss, (out0, out1))

    def test_functional_core_with_foreign_columns(self) -> None:
        """Rows of one rank against columns of the global batch, as under gathering."""
        gen = torch.Generator().manual_seed(0)
        rows0, rows1, cols0, cols1 = (
            torch.randn(n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            for n in (3, 3, 6, 6)
        )
        captions = torch.randn(6, 5, generator=gen, dtype=torch.float64)

        def loss(
            a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
        ) -> torch.Tensor:
            return xclr_loss(
                a,
                b,
                captions[3:],
                temperature=0.5,
                out0_all=c,
                out1_all=d,
                targets_all=captions,
                rank_offset=3,
            )

        assert torch.autograd.gradcheck(loss, (rows0, rows1, cols0, cols1))


class TestNumerics:
    def test_zero_vectors_do_not_give_nan(self) -> None:
        out0 = torch.zeros(4, 3, requires_grad=True)
        out1 = torch.zeros(4, 3, requires_grad=True)
        loss = XCLRLoss()(out0, out1, torch.zeros(4, 5))
        loss.backward()
        assert torch.isfinite(loss)
        assert out0.grad is not None and torch.isfinite(out0.grad).all()
        torch.testing.assert_close(loss, torch.tensor(math.log(7.0)))

    @pytest.mark.parametrize("temperature", [0.01, 0.1])
    def test_bf16_autocast_computes_in_float32(self, temperature: float) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        x0, x1 = torch.randn(32, 16), torch.randn(32, 16)
        captions = torch.randn(32, 12)
        loss_fn = XCLRLoss(temperature=temperature)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out0, out1 = model(x0), model(x1)
            assert out0.dtype == torch.bfloat16
            loss = loss_fn(out0, out1, captions.bfloat16())
        assert loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(loss)
        assert all(
            torch.isfinite(p.grad).all()
            for p in model.parameters()
            if p.grad is not None
        )
        expected = loss_fn(
            out0.float().detach(), out1.float().detach(), captions.bfloat16().float()
        )
        torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)

    def test_large_logits_stay_finite(self) -> None:
        out0, out1 = _views(64, 3)
        loss = XCLRLoss(temperature=1e-3, target_temperature=1e-3)(
            out0, out1, torch.randn(64, 4, dtype=torch.float64)
        )
        assert torch.isfinite(loss)


class TestBadInput:
    @pytest.mark.parametrize("name", ["temperature", "target_temperature"])
    @pytest.mark.parametrize(
        "value", [0.0, -0.1, math.inf, math.nan, "0.1", None, True]
    )
    def test_temperatures(self, name: str, value: object) -> None:
        with pytest.raises(
            ValueError, match=rf"{name} must be a finite number > 0, got {value!r}"
        ):
            XCLRLoss(**{name: value})  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("out0", "out1", "targets", "message"),
        [
            (
                torch.randn(4, 3),
                torch.randn(5, 3),
                None,
                r"out0 and out1 must have the same shape, got \(4, 3\) and \(5, 3\)",
            ),
            (
                torch.randn(4),
                torch.randn(4),
                None,
                r"out0 must be 2-D \(batch_size, dim\), got shape \(4,\)",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3, 1),
                None,
                r"out1 must be 2-D \(batch_size, dim\), got shape \(4, 3, 1\)",
            ),
            (
                torch.randn(0, 3),
                torch.randn(0, 3),
                None,
                r"need at least 1 sample and 1 feature, got shape \(0, 3\)",
            ),
            (
                torch.randn(4, 0),
                torch.randn(4, 0),
                None,
                r"need at least 1 sample and 1 feature, got shape \(4, 0\)",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.randn(4, 1),
                r"Caption embeddings need text_dim >= 2, got targets of shape \(4, 1\).*"
                r"If these are class labels, pass them as a 1-D integer tensor",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.randn(4, 0),
                r"Caption embeddings need text_dim >= 2, got targets of shape \(4, 0\)",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.ones(4, 1, dtype=torch.long),
                r"must be floating point, got torch.int64. For class labels pass a 1-D "
                r"tensor: targets.squeeze\(1\)",
            ),
            (
                torch.ones(4, 3, dtype=torch.long),
                torch.ones(4, 3, dtype=torch.long),
                None,
                r"out0 must have a floating point dtype, got torch.int64",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.randn(5, 8),
                r"targets must have batch size 4 like out0, got shape \(5, 8\)",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.tensor([0.0, 1.0, 0.0, 1.0]),
                r"1-D targets are class labels and must have an integer dtype, got torch.float32",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.ones(4, 2, dtype=torch.long),
                r"2-D targets are caption embeddings and must be floating point, got torch.int64",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.randn(4, 2, 2),
                r"targets must be caption embeddings .* got shape \(4, 2, 2\)",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3, device="meta"),
                None,
                r"out0 and out1 must be on the same device, got cpu and meta",
            ),
            (
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.randn(4, 2, device="meta"),
                r"targets must be on the device of out0 \(cpu\), got meta",
            ),
        ],
    )
    def test_forward_inputs(
        self,
        out0: torch.Tensor,
        out1: torch.Tensor,
        targets: torch.Tensor | None,
        message: str,
    ) -> None:
        with pytest.raises(ValueError, match=message):
            XCLRLoss()(out0, out1, targets)

    def test_memory_bank_size_must_name_the_dimension(self) -> None:
        # As lightly 1.6's MemoryBankModule, from our own check (any lightly version).
        with pytest.raises(
            ValueError,
            match=r"memory_bank_size=128 does not specify the feature dimension\. "
            r"Set it with memory_bank_size=\(128, dim\), or pass memory_bank_size=0",
        ):
            XCLRLoss(memory_bank_size=128)

    @pytest.mark.parametrize(
        ("size", "error", "message"),
        [
            (2.5, TypeError, r"got 2\.5 \(float\)"),
            ("16", TypeError, r"got '16' \(str\)"),
            (None, TypeError, r"got None \(NoneType\)"),
            ((16,), TypeError, r"got \(16,\)"),
            ((16, 2.5), TypeError, r"got \(16, 2\.5\)"),
            (("16", "8"), TypeError, r"got \('16', '8'\)"),
            ((16, 8, 1), TypeError, r"got \(16, 8, 1\)"),
            ((-1, 8), ValueError, r"non-negative, got \(-1, 8\)"),
            (True, ValueError, r"memory_bank_size=True does not specify"),
        ],
    )
    def test_memory_bank_size_type_and_value(
        self, size: object, error: type[Exception], message: str
    ) -> None:
        with pytest.raises(error, match=r"memory_bank_size"):
            XCLRLoss(memory_bank_size=size)  # type: ignore[arg-type]
        with pytest.raises(error, match=message):
            XCLRLoss(memory_bank_size=size)  # type: ignore[arg-type]

    def test_memory_bank_size_accepts_lists_and_numpy(self) -> None:
        import numpy as np

        size: Any = [np.int64(8), 3]
        assert XCLRLoss(memory_bank_size=size).memory_bank.size == (8, 3)
        assert XCLRLoss(memory_bank_size=0).memory_bank.size == (0,)

    @pytest.mark.parametrize("name", ["temperature", "target_temperature"])
    @pytest.mark.parametrize("value", [1e-320, 1e-39, 2e-39])
    def test_temperature_whose_inverse_overflows(self, name: str, value: float) -> None:
        # 1/1e-320 is inf: the loss would be NaN. Refused at construction.
        with pytest.raises(
            ValueError,
            match=rf"{name} must be a finite number > 0 whose inverse is finite",
        ):
            XCLRLoss(**{name: value})  # type: ignore[arg-type]

    def test_tiny_accepted_temperatures(self) -> None:
        assert XCLRLoss(temperature=3e-39).temperature == 3e-39
        out0, out1 = _views(4, 3)
        loss = XCLRLoss(temperature=1e-30, target_temperature=1e-30)(
            out0.float(), out1.float(), torch.randn(4, 2)
        )
        assert torch.isfinite(loss)

    def test_targets_and_labels_together(self) -> None:
        with pytest.raises(ValueError, match="as targets or as labels, not both"):
            XCLRLoss()(
                torch.randn(4, 3),
                torch.randn(4, 3),
                torch.arange(4),
                labels=torch.arange(4),
            )

    def test_memory_bank_refuses_other_target_kinds(self) -> None:
        loss_fn = XCLRLoss(memory_bank_size=(8, 3))
        out0 = torch.randn(4, 3, requires_grad=True)
        loss_fn(out0, torch.randn(4, 3), torch.randn(4, 5))
        with pytest.raises(
            ValueError, match="same kind as those stored in the memory bank"
        ):
            loss_fn(out0, torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


class TestChunked:
    """Issue 7: chunk_size changes memory, not values or gradients."""

    @pytest.mark.parametrize("kind", ["none", "captions", "labels"])
    @pytest.mark.parametrize("chunk_size", [1, 3, 16, 100])
    def test_float64_matches_whole_batch(self, kind: str, chunk_size: int) -> None:
        out0, out1 = _views(16, 8)
        targets = {
            "none": None,
            "captions": torch.randn(16, 5, dtype=torch.float64),
            "labels": torch.randint(0, 4, (16,)),
        }[kind]
        extra = () if targets is None else (targets,)
        dense = _value_and_grads(XCLRLoss(0.2, 0.3), out0, out1, *extra)
        chunked = _value_and_grads(
            XCLRLoss(0.2, 0.3, chunk_size=chunk_size), out0, out1, *extra
        )
        _assert_all_close(chunked, dense)
        _assert_all_close(
            dense, (ref.xclr(out0, out1, targets, 0.2, 0.3).detach(), *dense[1:])
        )

    def test_float32_matches_whole_batch(self) -> None:
        gen = torch.Generator().manual_seed(0)
        out0 = torch.randn(300, 32, generator=gen, requires_grad=True)
        out1 = torch.randn(300, 32, generator=gen, requires_grad=True)
        captions = torch.randn(300, 24, generator=gen)
        dense = _value_and_grads(XCLRLoss(), out0, out1, captions)
        chunked = _value_and_grads(XCLRLoss(chunk_size=64), out0, out1, captions)
        for a, e in zip(chunked, dense, strict=True):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)

    def test_gradcheck(self) -> None:
        out0, out1 = _views(5, 4)
        captions = torch.randn(5, 3, dtype=torch.float64)

        def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            value: torch.Tensor = XCLRLoss(0.3, 0.2, chunk_size=2)(a, b, captions)
            return value

        assert torch.autograd.gradcheck(loss, (out0, out1))

    def test_without_grad_matches(self) -> None:
        out0, out1 = _views(10, 4)
        captions = torch.randn(10, 3, dtype=torch.float64)
        with torch.no_grad():
            value = XCLRLoss(chunk_size=3)(out0, out1, captions)
        torch.testing.assert_close(
            value, ref.xclr(out0, out1, captions), atol=ATOL, rtol=ATOL
        )

    @pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
    def test_bad_chunk_size(self, chunk_size: object) -> None:
        with pytest.raises(
            ValueError,
            match=rf"chunk_size must be a positive integer or None, got {chunk_size!r}",
        ):
            XCLRLoss(chunk_size=chunk_size)  # type: ignore[arg-type]


class TestFunctionalAndScalarInputs:
    """The functional core checks its arguments like the module does."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
            (
                {"target_temperature": -1.0},
                "target_temperature must be a finite number > 0, got -1.0",
            ),
            ({"chunk_size": 0}, "chunk_size must be a positive integer or None, got 0"),
            (
                {"chunk_size": -1},
                "chunk_size must be a positive integer or None, got -1",
            ),
        ],
    )
    def test_xclr_loss_arguments(self, kwargs: dict[str, float], message: str) -> None:
        out0, out1 = _views(4, 3)
        with pytest.raises(ValueError, match=message):
            xclr_loss(out0, out1, torch.randn(4, 2, dtype=torch.float64), **kwargs)  # type: ignore[arg-type]

    def test_chunked_clip_core_temperature(self) -> None:
        z = torch.zeros(2, 2)
        with pytest.raises(
            ValueError, match="target_temperature must be a finite number > 0"
        ):
            xclr_clip_loss_chunked(
                z,
                z,
                z,
                z,
                torch.tensor(1.0),
                None,
                z,
                z,
                target_temperature=0.0,
                rank_offset=0,
                chunk_size=1,
            )

    def test_numpy_scalars_are_accepted(self) -> None:
        import numpy as np

        temperature: Any = np.float32(0.2)
        chunk_size: Any = np.int64(2)
        loss_fn = XCLRLoss(temperature, np.float64(0.3), chunk_size=chunk_size)
        assert loss_fn.temperature == pytest.approx(0.2) and loss_fn.chunk_size == 2
        out0, out1 = _views(5, 3)
        torch.testing.assert_close(
            loss_fn(out0, out1), XCLRLoss(0.2, 0.3)(out0, out1), atol=1e-6, rtol=1e-6
        )

    def test_memory_bank_dimension_mismatch(self) -> None:
        with pytest.raises(
            ValueError,
            match=r"memory_bank_size=\(8, 4\) does not match the embedding dimension of out0/out1, 3",
        ):
            XCLRLoss(memory_bank_size=(8, 4))(torch.randn(4, 3), torch.randn(4, 3))


class TestLabelsKeyword:
    """Issue 12: lightly's supervised-loss users write ``labels=``."""

    def test_labels_keyword_is_targets(self) -> None:
        out0, out1 = _views(6, 4)
        labels = torch.tensor([0, 1, 0, 2, 1, 0])
        loss_fn = XCLRLoss(0.2, 0.05)
        torch.testing.assert_close(
            loss_fn(out0, out1, labels=labels), loss_fn(out0, out1, labels)
        )


class TestNaNInNaNOut:
    """Issue 12: a non-finite description gives a NaN loss, never a finite one."""

    @pytest.mark.parametrize("bad", [math.nan, math.inf])
    @pytest.mark.parametrize("bank", [False, True])
    def test_non_finite_caption(self, bad: float, bank: bool) -> None:
        out0, out1 = _views(4, 3)
        captions = torch.randn(4, 5, dtype=torch.float64)
        captions[1, 2] = bad
        loss_fn = XCLRLoss(memory_bank_size=(8, 3) if bank else 0).double()
        # With gradient a bank refuses it (issue 21: tests/test_loss_inputs.py).
        assert torch.isnan(loss_fn(out0.detach(), out1.detach(), captions))
        if not bank:
            assert torch.isnan(loss_fn(out0, out1, captions))
