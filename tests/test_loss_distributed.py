"""Property 5 (and property 1 distributed): gloo processes on CPU equal one process.

Each world size spawns its processes once; every rank runs all cases on its slice of
the same global batch and returns values and gradients, which the tests compare with a
single-process run on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightly.loss import NTXentLoss
from torch.nn.parallel import DistributedDataParallel

from xclr_plugin import XCLRLoss

from _dist_helpers import run_gloo

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 8
ATOL = 1e-10  # float64: the special cases are exact up to rounding
TEMPERATURE, TARGET_TEMPERATURE = 0.2, 0.3


def _global_batch() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "out0": torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64),
        "out1": torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64),
        "inputs0": torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64),
        "inputs1": torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64),
        "targets": {
            "none": None,
            "captions": torch.randn(
                GLOBAL_BATCH, 4, generator=gen, dtype=torch.float64
            ),
            "labels": torch.tensor([0, 1, 0, 2, 1, 1, 3, 0]),
        },
    }


def _value_and_grads(
    loss_fn: torch.nn.Module,
    out0: torch.Tensor,
    out1: torch.Tensor,
    targets: torch.Tensor | None,
) -> list[torch.Tensor]:
    out0 = out0.clone().requires_grad_(True)
    out1 = out1.clone().requires_grad_(True)
    loss = loss_fn(out0, out1) if targets is None else loss_fn(out0, out1, targets)
    return [loss.detach(), *torch.autograd.grad(loss, [out0, out1])]


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(5, 6).double()


def _model_grads(
    model: torch.nn.Module,
    batch: dict[str, Any],
    sl: slice,
    targets: torch.Tensor | None,
    gather: bool,
) -> list[torch.Tensor]:
    loss_fn = XCLRLoss(TEMPERATURE, TARGET_TEMPERATURE, gather_distributed=gather)
    out0, out1 = model(batch["inputs0"][sl]), model(batch["inputs1"][sl])
    loss = loss_fn(out0, out1) if targets is None else loss_fn(out0, out1, targets[sl])
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def _rank_results(rank: int, world_size: int, batch: dict[str, Any]) -> dict[str, Any]:
    n = GLOBAL_BATCH // world_size
    sl = slice(rank * n, (rank + 1) * n)
    results: dict[str, Any] = {}
    for kind, targets in batch["targets"].items():
        local_targets = None if targets is None else targets[sl]
        loss_fn = XCLRLoss(TEMPERATURE, TARGET_TEMPERATURE, gather_distributed=True)
        results[kind] = _value_and_grads(
            loss_fn, batch["out0"][sl], batch["out1"][sl], local_targets
        )
        ddp = DistributedDataParallel(_model())
        results[f"ddp-{kind}"] = _model_grads(ddp, batch, sl, targets, gather=True)
        chunked = XCLRLoss(
            TEMPERATURE, TARGET_TEMPERATURE, gather_distributed=True, chunk_size=1
        )
        results[f"chunked-{kind}"] = _value_and_grads(
            chunked, batch["out0"][sl], batch["out1"][sl], local_targets
        )
    ntxent = NTXentLoss(TEMPERATURE, gather_distributed=True)
    results["ntxent"] = _value_and_grads(
        ntxent, batch["out0"][sl], batch["out1"][sl], None
    )
    results.update(_refusals(rank, world_size, batch["out0"][sl], batch["out1"][sl]))
    return results


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return str(err)
    return ""


def _refusals(
    rank: int, world_size: int, out0: torch.Tensor, out1: torch.Tensor
) -> dict[str, str]:
    """Issue 21: what every rank is told (on d50eea5 gloo aborted, naming nothing)."""
    short = len(out0) - (rank == world_size - 1)  # the last rank's batch is smaller
    gathered = XCLRLoss(TEMPERATURE, gather_distributed=True)
    a = out0.clone().requires_grad_(True)
    return {
        "uneven": _error(lambda: gathered(out0[:short], out1[:short])),
        "uneven-bank": _error(
            lambda: XCLRLoss(memory_bank_size=(32, 6), gather_distributed=True)(
                a[:short], out1[:short]
            )
        ),
        "double-backward": _error(
            lambda: torch.autograd.grad(gathered(a, out1), a, create_graph=True)
        ),
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def distributed_run(
    request: pytest.FixtureRequest,
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    world_size: int = request.param
    batch = _global_batch()
    return world_size, batch, run_gloo(_rank_results, world_size, batch)


def _single_process(batch: dict[str, Any], kind: str) -> list[torch.Tensor]:
    loss_fn = XCLRLoss(TEMPERATURE, TARGET_TEMPERATURE)
    return _value_and_grads(
        loss_fn, batch["out0"], batch["out1"], batch["targets"][kind]
    )


@pytest.mark.parametrize("kind", ["none", "captions", "labels"])
def test_mean_of_rank_losses_equals_single_process_loss(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]], kind: str
) -> None:
    _, batch, ranks = distributed_run
    expected_loss = _single_process(batch, kind)[0]
    mean_loss = torch.stack([r[kind][0] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, expected_loss, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["none", "captions", "labels"])
def test_rank_gradients_equal_single_process_gradients(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]], kind: str
) -> None:
    """Each rank's input gradient, averaged as DDP does (1/W), is its slice of the global gradient."""
    world_size, batch, ranks = distributed_run
    _, grad0, grad1 = _single_process(batch, kind)
    n = GLOBAL_BATCH // world_size
    for rank, result in enumerate(ranks):
        sl = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(
            result[kind][1] / world_size, grad0[sl], atol=ATOL, rtol=ATOL
        )
        torch.testing.assert_close(
            result[kind][2] / world_size, grad1[sl], atol=ATOL, rtol=ATOL
        )


@pytest.mark.parametrize("kind", ["none", "captions", "labels"])
def test_ddp_parameter_gradients_equal_single_process(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]], kind: str
) -> None:
    _, batch, ranks = distributed_run
    expected = _model_grads(
        _model(), batch, slice(None), batch["targets"][kind], gather=False
    )
    for result in ranks:
        for actual, want in zip(result[f"ddp-{kind}"], expected, strict=True):
            torch.testing.assert_close(actual, want, atol=ATOL, rtol=ATOL)


def test_identity_graph_equals_distributed_ntxent(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]],
) -> None:
    """Property 1, distributed: per rank, values and gradients equal lightly's NTXentLoss."""
    _, _, ranks = distributed_run
    for result in ranks:
        for actual, expected in zip(result["none"], result["ntxent"], strict=True):
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["none", "captions", "labels"])
def test_chunked_equals_whole_batch_per_rank(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]], kind: str
) -> None:
    """Issue 7: chunk_size under gather_distributed gives the same values and gradients."""
    _, _, ranks = distributed_run
    for result in ranks:
        for actual, expected in zip(
            result[f"chunked-{kind}"], result[kind], strict=True
        ):
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", ["uneven", "uneven-bank"])
def test_uneven_batch_sizes_are_named_on_every_rank(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]], case: str
) -> None:
    world_size, _, ranks = distributed_run
    n = GLOBAL_BATCH // world_size
    sizes = [n] * (world_size - 1) + [n - 1]
    for result in ranks:
        assert result[case].startswith("gather_distributed needs"), result[case]
        assert (
            f"needs the same batch size on every process, got {sizes}" in result[case]
        )


def test_double_backward_under_gathering_is_refused(
    distributed_run: tuple[int, dict[str, Any], list[dict[str, Any]]],
) -> None:
    """lightly's gather passes no second derivatives: refused, never a wrong number."""
    _, _, ranks = distributed_run
    for result in ranks:
        assert "supports one backward only" in result["double-backward"]
