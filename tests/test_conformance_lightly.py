"""Issue 10: XCLRLoss passes lightly's own NTXentLoss test module, import swapped.

``tests/vendored/`` holds lightly's ``tests/loss/test_ntx_ent_loss.py`` verbatim (MIT,
see ``tests/vendored/README.md``) at two revisions:

- ``26f99dce``: memory banks as ``(K, D)``, as lightly 1.6 requires;
- ``master_e8d317fc``: bare integer ``memory_bank_size`` (lightly 1.6 refuses those).

Each module is written to a temporary folder twice, unchanged (the control: lightly's
``NTXentLoss``) and with only its import line swapped for
``from xclr_plugin import XCLRLoss as NTXentLoss``, and run with pytest in a subprocess.
Nothing is downloaded. The one expected difference is ``test_forward_pass_neg_temp``:
XCLRLoss refuses a temperature <= 0 (documented in docs/XCLR_SPEC.md). A conftest.py
beside the modules seeds torch and numpy before every test, so both runs see the same
inputs: unseeded, ``test_forward_pass_1d`` fails now and then even for lightly's own
class (float32 symmetry on random 1-d inputs).

The second half runs every scenario of that module with explicit arguments against
``NTXentLoss`` on the same inputs: values and gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from lightly.loss import NTXentLoss

from xclr_plugin import XCLRLoss

VENDORED = Path(__file__).parent / "vendored"
HOST_IMPORT = "from lightly.loss import NTXentLoss\n"
OUR_IMPORT = "from xclr_plugin import XCLRLoss as NTXentLoss\n"
NEG_TEMP = "TestNTXentLoss::test_forward_pass_neg_temp"

Outcomes = dict[str, tuple[str, str]]  # test id -> (outcome, message)

#: Seed of every vendored test. Seeds 0-9 all pass for host and ours; unseeded,
#: lightly's own test_forward_pass_1d fails for about 1 seed in 27 (31, 83, ...).
SEED = 0
SEEDING_CONFTEST = """
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed({seed})
    np.random.seed({seed})
"""


REVISIONS = {
    "kd": "lightly_test_ntx_ent_loss_26f99dce.py.txt",
    "master": "lightly_test_ntx_ent_loss_master_e8d317fc.py.txt",
}


def _run_modules(
    texts: dict[str, str], folder: Path, seed: int = SEED
) -> dict[str, Outcomes]:
    """Runs test modules in one fresh pytest process; per-module test outcomes."""
    folder.mkdir()
    (folder / "conftest.py").write_text(SEEDING_CONFTEST.format(seed=seed))
    for rev, text in texts.items():
        (folder / f"test_ntx_ent_loss_{rev}.py").write_text(text)
    report = folder / "report.xml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--rootdir",
            str(folder),
            f"--junitxml={report}",
            str(folder),
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), proc.stdout + proc.stderr
    outcomes: dict[str, Outcomes] = {rev: {} for rev in texts}
    for case in ET.parse(report).getroot().iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        rev = module.removeprefix("test_ntx_ent_loss_")
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = kind, node.get("message", "")
        outcomes[rev][f"{cls}::{case.get('name')}"] = (outcome, message)
    return outcomes


def _vendored(name: str) -> str:
    text = (VENDORED / name).read_text()
    assert text.count(HOST_IMPORT) == 1, "the host import line must occur exactly once"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcomes]:
    """Both revisions, with the host class and with ours: two pytest processes."""
    texts = {rev: _vendored(name) for rev, name in REVISIONS.items()}
    base = tmp_path_factory.mktemp("lightly")
    host = _run_modules(texts, base / "host")
    swapped = {rev: t.replace(HOST_IMPORT, OUR_IMPORT) for rev, t in texts.items()}
    ours = _run_modules(swapped, base / "ours")
    results = {f"{rev}-host": host[rev] for rev in texts}
    results.update({f"{rev}-ours": ours[rev] for rev in texts})
    return results


def test_kd_revision_passes_except_negative_temperature(
    runs: dict[str, Outcomes],
) -> None:
    host, ours = runs["kd-host"], runs["kd-ours"]
    assert host.keys() == ours.keys()
    assert len(host) == 248  # 246 cases + 2 CUDA cases
    # Control: the vendored module passes against lightly 1.6's NTXentLoss.
    assert {k for k, (o, _) in host.items() if o not in ("passed", "skipped")} == set()
    failed = {k: m for k, (o, m) in ours.items() if o not in ("passed", "skipped")}
    assert list(failed) == [NEG_TEMP], failed
    assert "temperature must be a finite number > 0, got -1.0" in failed[NEG_TEMP]
    assert (
        sum(o == "passed" for o, _ in ours.values())
        == sum(o == "passed" for o, _ in host.values()) - 1
    )


def test_master_revision_has_the_host_outcome_for_every_case(
    runs: dict[str, Outcomes],
) -> None:
    """Bare integer banks: lightly 1.6's NTXentLoss refuses them, and so do we."""
    host, ours = runs["master-host"], runs["master-ours"]
    assert host.keys() == ours.keys()
    refused = 0
    for test_id, (outcome, message) in host.items():
        if test_id == NEG_TEMP:
            assert outcome == "passed" and ours[test_id][0] == "failure"
            continue
        assert ours[test_id][0] == outcome, (test_id, ours[test_id], message)
        if outcome == "failure":
            refused += 1
            assert "does not specify the feature dimension" in message
            assert "ValueError: memory_bank_size=" in ours[test_id][1]
            assert "does not specify the feature dimension" in ours[test_id][1]
    assert refused > 0


# -- the same scenarios with explicit arguments: values and gradients ---------------


def _pair(
    n: int, dim: int, seed: int, correlated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if correlated:  # test_with_correlated_embedding: rows (x, 2x)
        base0, base1 = torch.rand(n, 1, generator=gen), torch.rand(n, 1, generator=gen)
        return torch.cat([base0, 2 * base0], 1), torch.cat([base1, 2 * base1], 1)
    return torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)


def _value_and_grads(
    loss_fn: torch.nn.Module, out0: torch.Tensor, out1: torch.Tensor
) -> list[torch.Tensor]:
    a = out0.detach().double().requires_grad_(True)
    b = out1.detach().double().requires_grad_(True)
    loss = loss_fn(a, b)
    return [loss.detach(), *torch.autograd.grad(loss, [a, b], allow_unused=True)]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gather_distributed", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 1, 10])
@pytest.mark.parametrize("dimension", [1, 2, 16, 64])
@pytest.mark.parametrize("n_samples", [1, 2, 4])
def test_with_values(
    n_samples: int, dimension: int, temperature: float, gather_distributed: bool
) -> None:
    """test_with_values: both view orders (symmetry), no process group."""
    out0, out1 = _pair(n_samples, dimension, seed=n_samples * 100 + dimension)
    kwargs: dict[str, Any] = {
        "temperature": temperature,
        "gather_distributed": gather_distributed,
    }
    for a, b in ((out0, out1), (out1, out0)):
        _assert_same(
            _value_and_grads(XCLRLoss(**kwargs), a, b),
            _value_and_grads(NTXentLoss(**kwargs), a, b),
        )


@pytest.mark.parametrize("gather_distributed", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 1, 7])
@pytest.mark.parametrize("memory_bank_size", [0, 1, 2, 8, 15, 16, 17])
@pytest.mark.parametrize("n_samples", [1, 2, 8, 16])
def test_with_correlated_embedding(
    n_samples: int, memory_bank_size: int, temperature: float, gather_distributed: bool
) -> None:
    """test_with_correlated_embedding: banks filled over several rounds, (K, 2) form."""
    out0, out1 = _pair(n_samples, 2, seed=n_samples, correlated=True)
    size = (memory_bank_size, 2) if memory_bank_size > 0 else 0
    kwargs = {
        "temperature": temperature,
        "memory_bank_size": size,
        "gather_distributed": gather_distributed,
    }
    torch.manual_seed(0)
    ours = XCLRLoss(**kwargs).double()  # type: ignore[arg-type]
    torch.manual_seed(0)
    host = NTXentLoss(**kwargs).double()  # type: ignore[arg-type]
    for _ in range(memory_bank_size // n_samples + 2 if memory_bank_size else 1):
        _assert_same(
            _value_and_grads(ours, out0, out1), _value_and_grads(host, out0, out1)
        )
    torch.testing.assert_close(ours.memory_bank.bank, host.memory_bank.bank)


@pytest.mark.parametrize("dim", [32, 1])
@pytest.mark.parametrize("memory_bank", [False, True])
def test_forward_pass_batch_sizes_1_to_19(dim: int, memory_bank: bool) -> None:
    """test_forward_pass, _1d and _memory_bank: default temperature, B = 1 .. 19."""
    size = (64, dim) if memory_bank else 0
    torch.manual_seed(0)
    ours = XCLRLoss(temperature=0.5, memory_bank_size=size).double()
    torch.manual_seed(0)
    host = NTXentLoss(memory_bank_size=size).double()
    for bsz in range(1, 20):
        out0, out1 = _pair(bsz, dim, seed=bsz)
        for a, b in ((out0, out1), (out1, out0)):
            _assert_same(_value_and_grads(ours, a, b), _value_and_grads(host, a, b))


@pytest.mark.parametrize("temperature", [-1.0, 0.0])
def test_non_positive_temperature_is_the_one_difference(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        XCLRLoss(temperature=temperature)


@pytest.mark.parametrize("world_size", [1])
def test_gather_with_a_one_process_group(world_size: int, tmp_path: Path) -> None:
    """gather_distributed=True with an initialised process group of world size 1."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=world_size
    )
    try:
        out0, out1 = _pair(5, 4, seed=0)
        _assert_same(
            _value_and_grads(XCLRLoss(0.3, gather_distributed=True), out0, out1),
            _value_and_grads(NTXentLoss(0.3, gather_distributed=True), out0, out1),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("available", [True, False])
def test_gather_distributed_availability_check(
    available: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test__gather_distributed(_dist_not_available): one is_available call, same error."""
    calls: list[None] = []

    def is_available() -> bool:
        calls.append(None)
        return available

    monkeypatch.setattr(torch.distributed, "is_available", is_available)
    for cls in (NTXentLoss, XCLRLoss):
        calls.clear()
        if available:
            cls(gather_distributed=True)
        else:
            with pytest.raises(
                ValueError, match=r"torch\.distributed is not available"
            ):
                cls(gather_distributed=True)
        assert len(calls) == 1
