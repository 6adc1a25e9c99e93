import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch import distributed as dist

from lightly.loss import NTXentLoss, XCLRLoss


def _calc_xclr_loss_manual(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor,
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """Dense X-CLR: builds the 2B x 2B logits and target matrices explicitly."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    if targets.is_floating_point():
        t = F.normalize(targets, dim=1)
        similarity = t @ t.T
    else:
        similarity = (targets[:, None] == targets[None, :]).to(z.dtype)
    # Similarity between views: both views of a sample share its description.
    similarity = similarity.repeat(2, 2)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(self_mask, -math.inf)
    # A sample's other view is identical to it: similarity 1.
    similarity = similarity.clone()
    index = torch.arange(n)
    similarity[index, (index + n // 2) % n] = 1.0
    target_probs = torch.softmax(
        (similarity / target_temperature).masked_fill(self_mask, -math.inf), dim=1
    )
    log_probs = torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
    return -(target_probs * log_probs).sum(dim=1).mean()


class TestXCLRLoss:
    def test__gather_distributed_dist_not_available(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(dist, "is_available", lambda: False)
        with pytest.raises(ValueError):
            XCLRLoss(gather_distributed=True)

    @pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
    def test__invalid_temperature(self, temperature: float) -> None:
        with pytest.raises(ValueError, match="temperature"):
            XCLRLoss(temperature=temperature)
        with pytest.raises(ValueError, match="target_temperature"):
            XCLRLoss(target_temperature=temperature)

    @pytest.mark.parametrize("n_samples", [1, 2, 8])
    @pytest.mark.parametrize("dimension", [1, 16])
    @pytest.mark.parametrize("temperature", [0.1, 1, 10])
    @pytest.mark.parametrize("gather_distributed", [False, True])
    def test_no_targets_equals_ntxent(
        self,
        n_samples: int,
        dimension: int,
        temperature: float,
        gather_distributed: bool,
    ) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(n_samples, dimension, dtype=torch.float64)
        out1 = torch.randn(n_samples, dimension, dtype=torch.float64)
        grads = []
        losses = []
        for loss_cls in (NTXentLoss, XCLRLoss):
            x0 = out0.clone().requires_grad_()
            x1 = out1.clone().requires_grad_()
            loss_fn = loss_cls(
                temperature=temperature, gather_distributed=gather_distributed
            )
            loss = loss_fn(x0, x1)
            loss.backward()
            assert x0.grad is not None and x1.grad is not None
            losses.append(loss)
            grads.append((x0.grad, x1.grad))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-10)
        for grad_xclr, grad_ntxent in zip(grads[1], grads[0]):
            torch.testing.assert_close(grad_xclr, grad_ntxent, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("n_samples", [2, 8])
    @pytest.mark.parametrize("memory_bank_size", [1, 8, 17])
    def test_no_targets_equals_ntxent_memory_bank(
        self, n_samples: int, memory_bank_size: int
    ) -> None:
        # The banks start from random entries: the same seed gives the same ones.
        torch.manual_seed(0)
        ntxent = NTXentLoss(temperature=0.5, memory_bank_size=(memory_bank_size, 4))
        torch.manual_seed(0)
        xclr = XCLRLoss(temperature=0.5, memory_bank_size=(memory_bank_size, 4))
        # Several steps, so that the bank fills and wraps around.
        for _ in range(memory_bank_size // n_samples + 2):
            out0 = torch.randn(n_samples, 4, requires_grad=True)
            out1 = torch.randn(n_samples, 4)
            expected = ntxent(out0, out1)
            torch.testing.assert_close(xclr(out0, out1), expected)

    @pytest.mark.parametrize("n_samples", [2, 5, 16])
    @pytest.mark.parametrize("temperature", [0.1, 0.5])
    @pytest.mark.parametrize("target_temperature", [0.05, 1.0])
    def test_with_caption_embeddings(
        self, n_samples: int, temperature: float, target_temperature: float
    ) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(n_samples, 32, dtype=torch.float64)
        out1 = torch.randn(n_samples, 32, dtype=torch.float64)
        captions = torch.randn(n_samples, 8, dtype=torch.float64)
        loss_fn = XCLRLoss(
            temperature=temperature, target_temperature=target_temperature
        )
        loss = loss_fn(out0, out1, captions)
        expected = _calc_xclr_loss_manual(
            out0, out1, captions, temperature, target_temperature
        )
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("n_samples", [2, 6])
    def test_with_labels(self, n_samples: int) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(n_samples, 16, dtype=torch.float64)
        out1 = torch.randn(n_samples, 16, dtype=torch.float64)
        labels = torch.arange(n_samples) % 2
        loss = XCLRLoss(target_temperature=0.1)(out0, out1, labels)
        expected = _calc_xclr_loss_manual(out0, out1, labels, 0.1, 0.1)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)

    def test_gradient_matches_dense(self) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
        out1 = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
        captions = torch.randn(6, 4, dtype=torch.float64)
        XCLRLoss()(out0, out1, captions).backward()
        assert out0.grad is not None and out1.grad is not None
        grad0, grad1 = torch.autograd.grad(
            _calc_xclr_loss_manual(out0, out1, captions, 0.1, 0.1), (out0, out1)
        )
        torch.testing.assert_close(out0.grad, grad0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out1.grad, grad1, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("chunk_size", [None, 2])
    def test_second_derivatives_match_dense(self, chunk_size: Optional[int]) -> None:
        # create_graph=True (gradient penalties): the Hessian term is kept.
        torch.manual_seed(0)
        out0 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out1 = torch.randn(5, 4, dtype=torch.float64)
        captions = torch.randn(5, 3, dtype=torch.float64)
        penalties = []
        for loss_fn in (
            XCLRLoss(chunk_size=chunk_size),
            lambda a, b, c: _calc_xclr_loss_manual(a, b, c, 0.1, 0.1),
        ):
            (grad,) = torch.autograd.grad(
                loss_fn(out0, out1, captions), out0, create_graph=True
            )
            penalties.append(torch.autograd.grad(grad.pow(2).sum(), out0)[0])
        torch.testing.assert_close(*penalties, rtol=1e-10, atol=1e-10)

    def test_distinct_captions_low_target_temperature_equals_ntxent(self) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(8, 16, dtype=torch.float64)
        out1 = torch.randn(8, 16, dtype=torch.float64)
        # Orthogonal captions: only the other view is similar.
        captions = torch.eye(8, dtype=torch.float64)
        loss = XCLRLoss(temperature=0.5, target_temperature=1e-3)(out0, out1, captions)
        expected = NTXentLoss(temperature=0.5)(out0, out1)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("chunk_size", [1, 3, 8])
    def test_chunk_size(self, chunk_size: int) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(7, 8, dtype=torch.float64)
        out1 = torch.randn(7, 8, dtype=torch.float64)
        captions = torch.randn(7, 4, dtype=torch.float64)
        results = []
        for size in (None, chunk_size):
            x0 = out0.clone().requires_grad_()
            x1 = out1.clone().requires_grad_()
            loss = XCLRLoss(chunk_size=size)(x0, x1, captions)
            loss.backward()
            results.append((loss, x0.grad, x1.grad))
        for chunked, dense in zip(results[1], results[0]):
            torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-10)

    def test_forward_pass_symmetry(self) -> None:
        loss = XCLRLoss()
        for bsz in range(2, 20):
            batch_1 = torch.randn((bsz, 32))
            batch_2 = torch.randn((bsz, 32))
            captions = torch.randn((bsz, 8))
            l1 = loss(batch_1, batch_2, captions)
            l2 = loss(batch_2, batch_1, captions)
            assert float(l1) == pytest.approx(float(l2), abs=1e-5)

    def test__invalid_targets(self) -> None:
        loss = XCLRLoss()
        out0, out1 = torch.randn(4, 8), torch.randn(4, 8)
        with pytest.raises(ValueError, match="targets"):
            loss(out0, out1, torch.randn(3, 8))
        with pytest.raises(ValueError, match="targets"):
            loss(out0, out1, torch.rand(4))
