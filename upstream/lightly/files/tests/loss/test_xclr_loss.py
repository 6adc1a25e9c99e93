import math
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from pytest_mock import MockerFixture
from torch import Tensor
from torch import distributed as dist

from lightly.loss.ntx_ent_loss import NTXentLoss
from lightly.loss.xclr_loss import XCLRLoss
from tests.ddp_helpers import NUM_PROCESSES, USE_PYTEST_POOL


def _make_targets(kind: str, *shape: int) -> Tensor:
    # Caption embeddings or class labels for a batch of the given shape.
    if kind == "embeddings":
        return torch.randn(*shape, 5, dtype=torch.float64)
    return torch.randint(0, 3, shape)


def _similarity(a: Tensor, b: Tensor) -> float:
    if a.is_floating_point():
        return float(F.cosine_similarity(a, b, dim=0))
    return float(a == b)


def _assert_close_with_grads(
    loss: Tensor, expected: Tensor, inputs: Sequence[Tensor], tol: float = 1e-10
) -> None:
    torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
    grads = torch.autograd.grad(loss, inputs)
    for grad, grad_expected in zip(grads, torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(grad, grad_expected, rtol=tol, atol=tol)


def _calc_xclr_loss_manual(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor,
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """Dense X-CLR: builds the 2n x 2n logits and target matrices explicitly."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool)
    # Both views of a sample share its description.
    rows = torch.cat([targets, targets])
    similarity = torch.tensor(
        [[_similarity(a, b) for b in rows] for a in rows], dtype=z.dtype
    )
    target_probs = torch.softmax(
        (similarity / target_temperature).masked_fill(self_mask, -math.inf), dim=1
    )
    logits = (z @ z.T / temperature).masked_fill(self_mask, -math.inf)
    log_probs = torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
    return -(target_probs * log_probs).sum(dim=1).mean()


def _calc_xclr_loss_memory_bank_manual(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor,
    bank: Tensor,
    bank_targets: Sequence[Optional[Tensor]],
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """X-CLR with a memory bank from the bank's entries and their descriptions."""
    # Bank entries without a description are negatives with no target probability.
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    sim_pos = (out0 * out1).sum(dim=1, keepdim=True)
    logits = torch.cat([sim_pos, out0 @ bank.T], dim=1) / temperature
    similarity = torch.tensor(
        [
            [1.0]
            + [-math.inf if t is None else _similarity(row, t) for t in bank_targets]
            for row in targets
        ],
        dtype=out0.dtype,
    )
    target_probs = torch.softmax(similarity / target_temperature, dim=1)
    log_probs = torch.log_softmax(logits, dim=1)
    return -(target_probs * log_probs).sum(dim=1).mean()


def _ddp_worker(
    rank: int,
    world_size: int,
    out0: Tensor,
    out1: Tensor,
    targets: Optional[Tensor],
    memory_bank_size: Tuple[int, int],
) -> Tuple[Tensor, Tensor, Tensor]:
    # Pool worker: one step per entry of out0 on this rank's slice of the batch.
    # Returns the loss and the input gradients of the last step. See #1982.
    torch.manual_seed(0)  # The same initial memory bank on all ranks.
    loss_fn = XCLRLoss(memory_bank_size=memory_bank_size, gather_distributed=True)
    n = out0.shape[1] // world_size
    local = slice(rank * n, (rank + 1) * n)
    for step in range(len(out0)):
        x0 = out0[step, local].clone().requires_grad_()
        x1 = out1[step, local].clone().requires_grad_()
        loss = loss_fn(x0, x1, None if targets is None else targets[step, local])
        loss.backward()
    assert x0.grad is not None and x1.grad is not None
    return loss.detach(), x0.grad, x1.grad


class TestXCLRLoss:
    def test__gather_distributed(self, mocker: MockerFixture) -> None:
        mock_is_available = mocker.patch.object(dist, "is_available", return_value=True)
        XCLRLoss(gather_distributed=True)
        mock_is_available.assert_called_once()

    def test__gather_distributed_dist_not_available(
        self, mocker: MockerFixture
    ) -> None:
        mocker.patch.object(dist, "is_available", return_value=False)
        with pytest.raises(ValueError, match="gather_distributed"):
            XCLRLoss(gather_distributed=True)

    @pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
    def test__invalid_temperature(self, value: float) -> None:
        with pytest.raises(ValueError, match="Illegal temperature"):
            XCLRLoss(temperature=value)
        with pytest.raises(ValueError, match="Illegal target_temperature"):
            XCLRLoss(target_temperature=value)

    @pytest.mark.parametrize("n_samples", [1, 2, 8])
    @pytest.mark.parametrize("memory_bank_size", [0, 1, 17])
    @pytest.mark.parametrize("temperature", [0.1, 1, 10])
    @pytest.mark.parametrize("unique_labels", [False, True])
    @pytest.mark.parametrize("gather_distributed", [False, True])
    def test__equals_ntxent(
        self,
        n_samples: int,
        memory_bank_size: int,
        temperature: float,
        unique_labels: bool,
        gather_distributed: bool,
    ) -> None:
        # No targets, or labels that make only the other view of a sample positive.
        # The banks start from random entries: the same seed gives the same ones.
        size = (memory_bank_size, 4)
        torch.manual_seed(0)
        ntxent = NTXentLoss(temperature, size, gather_distributed).double()
        torch.manual_seed(0)
        xclr = XCLRLoss(temperature, 0.01, size, gather_distributed).double()
        # Several steps, so that the bank fills and wraps around.
        for step in range(memory_bank_size // n_samples + 2):
            out0 = torch.randn(n_samples, 4, dtype=torch.float64, requires_grad=True)
            out1 = torch.randn(n_samples, 4, dtype=torch.float64, requires_grad=True)
            labels = torch.arange(n_samples) + step * n_samples
            loss = xclr(out0, out1, labels if unique_labels else None)
            _assert_close_with_grads(loss, ntxent(out0, out1), (out0, out1))

    @pytest.mark.parametrize("n_samples", [1, 2, 5])
    @pytest.mark.parametrize("temperature", [0.1, 0.5])
    @pytest.mark.parametrize("target_temperature", [0.05, 1.0])
    @pytest.mark.parametrize("targets_kind", ["embeddings", "labels"])
    def test__equals_manual(
        self,
        n_samples: int,
        temperature: float,
        target_temperature: float,
        targets_kind: str,
    ) -> None:
        torch.manual_seed(0)
        out0 = torch.randn(n_samples, 8, dtype=torch.float64, requires_grad=True)
        out1 = torch.randn(n_samples, 8, dtype=torch.float64, requires_grad=True)
        targets = _make_targets(targets_kind, n_samples)
        loss = XCLRLoss(temperature, target_temperature)(out0, out1, targets)
        expected = _calc_xclr_loss_manual(
            out0, out1, targets, temperature, target_temperature
        )
        _assert_close_with_grads(loss, expected, (out0, out1))

    @pytest.mark.parametrize("memory_bank_size", [3, 8, 13])
    @pytest.mark.parametrize("targets_kind", ["embeddings", "labels"])
    def test__memory_bank_with_targets(
        self, memory_bank_size: int, targets_kind: str
    ) -> None:
        torch.manual_seed(0)
        n_samples, dim = 4, 6
        loss_fn = XCLRLoss(0.2, 0.5, (memory_bank_size, dim)).double()
        # The descriptions the bank should hold, tracked as lightly's bank fills:
        # from the pointer on, truncated at the end of the bank.
        bank_targets: List[Optional[Tensor]] = [None] * memory_bank_size
        ptr = 0
        for step in range(memory_bank_size // n_samples + 3):
            # Every third step is an evaluation step: no gradient, no bank update.
            update = step % 3 != 2
            out0 = torch.randn(n_samples, dim, dtype=torch.float64)
            out0.requires_grad_(update)
            out1 = torch.randn(n_samples, dim, dtype=torch.float64)
            targets = _make_targets(targets_kind, n_samples)
            bank = loss_fn.memory_bank.bank.clone()
            loss = loss_fn(out0, out1, targets)
            expected = _calc_xclr_loss_memory_bank_manual(
                out0, out1, targets, bank, bank_targets, 0.2, 0.5
            )
            if not update:
                torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
                continue
            _assert_close_with_grads(loss, expected, (out0,))
            end = min(memory_bank_size, ptr + n_samples)
            bank_targets[ptr:end] = list(targets[: end - ptr])
            # The bank's entries are the keys that belong to these descriptions.
            keys = F.normalize(out1[: end - ptr], dim=1)
            torch.testing.assert_close(loss_fn.memory_bank.bank[ptr:end], keys)
            ptr = end if end < memory_bank_size else 0

    def test__memory_bank_with_targets_size_without_dim(self) -> None:
        # Deprecated on lightly master, an error in lightly 1.6: the bank is
        # initialized in the first forward pass.
        try:
            loss_fn = XCLRLoss(memory_bank_size=8)
        except ValueError:
            pytest.skip("memory_bank_size needs the feature dimension")
        # Until then the bank's pointer is uninitialized memory.
        loss_fn.memory_bank.bank_ptr.fill_(3)
        for step in range(3):
            out0 = torch.randn(4, 6, requires_grad=True)
            out1 = torch.randn(4, 6)
            labels = torch.arange(4) + 4 * step
            loss_fn(out0, out1, labels)
            ptr = 4 * step % 8
            assert loss_fn.bank_targets is not None
            assert torch.equal(loss_fn.bank_targets[ptr : ptr + 4], labels)
            bank = loss_fn.memory_bank.bank[ptr : ptr + 4]
            torch.testing.assert_close(bank, F.normalize(out1, dim=1))

    @pytest.mark.DDP
    @pytest.mark.skipif(not USE_PYTEST_POOL, reason="DDP pool is not available")
    @pytest.mark.parametrize("kind", [None, "embeddings", "labels"])
    @pytest.mark.parametrize("memory_bank_size", [(0, 8), (10, 8)])
    def test__gather_distributed_matches_non_distributed(
        self, kind: Optional[str], memory_bank_size: Tuple[int, int]
    ) -> None:
        # Two steps (the second one reads the bank the first one filled) on a global
        # batch of 2 * 3 samples, split over the processes.
        torch.manual_seed(0)
        batch_size = 3 * NUM_PROCESSES
        out0 = torch.randn(2, batch_size, 8, dtype=torch.float64)
        out1 = torch.randn(2, batch_size, 8, dtype=torch.float64)
        targets = None if kind is None else _make_targets(kind, 2, batch_size)
        results = pytest.pool.starmap(  # type: ignore[attr-defined]
            _ddp_worker,
            [
                (rank, NUM_PROCESSES, out0, out1, targets, memory_bank_size)
                for rank in range(NUM_PROCESSES)
            ],
        )
        # Without a process group the worker is a single process.
        expected = _ddp_worker(0, 1, out0, out1, targets, memory_bank_size)

        # The mean of the processes' losses is the loss of the global batch. DDP
        # averages gradients over processes: each process holds world_size times
        # the gradient of the global loss with respect to its inputs.
        losses = torch.stack([result[0] for result in results])
        torch.testing.assert_close(losses.mean(), expected[0], rtol=1e-10, atol=1e-10)
        for i in (1, 2):
            grad = torch.cat([result[i] for result in results]) / NUM_PROCESSES
            torch.testing.assert_close(grad, expected[i], rtol=1e-10, atol=1e-10)
