"""The upstream patches (upstream/): no drift, and the generator's transforms.

The full check (apply to the installed releases, run the hosts' tests without
xclr_plugin, one open_clip_train epoch) is ``upstream/check``, run by CI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_upstream_generate", ROOT / "upstream" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_patches_match_the_sources(capsys: pytest.CaptureFixture[str]) -> None:
    """Fails when xclr_plugin changed and `python upstream/generate.py` was not rerun."""
    assert _generator().main(["--check"]) == 0, capsys.readouterr().err


def test_pep604_annotations_become_typing_forms() -> None:
    generate = _generator()
    source = (
        "def f(a: int | None, b: tuple[Tensor | None, ...], c: A | B = x | y)"
        " -> Tensor | dict[str, Tensor]:\n"
        "    d: int | None = a | b\n"
    )
    converted = generate.pep604_to_typing(source)
    assert converted == (
        "def f(a: Optional[int], b: tuple[Optional[Tensor], ...], c: Union[A, B] = x | y)"
        " -> Union[Tensor, dict[str, Tensor]]:\n"
        "    d: Optional[int] = a | b\n"
    )


def test_open_clip_block_is_self_contained() -> None:
    """The generated class uses nothing from lightly or xclr_plugin, and nothing that
    Python 3.9 (open_clip's minimum) cannot evaluate in a signature."""
    generate = _generator()
    block, stdlib, typing_names = generate.open_clip_loss_block()
    assert "lightly" not in block and "xclr_plugin" not in block
    assert "class XCLRClipLoss(ClipLoss):" in block
    assert stdlib <= set(sys.stdlib_module_names)
    assert {"Optional"} <= typing_names
    generate._check_no_pep604(block)


def _upstream_xclr_loss() -> ModuleType:
    path = ROOT / "upstream" / "lightly" / "files" / "lightly" / "loss" / "xclr_loss.py"
    spec = importlib.util.spec_from_file_location("_upstream_xclr_loss", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bank", [0, (16, 5)])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["none", "embeddings", "labels"])
def test_plugin_loss_equals_the_upstream_lightly_loss(
    bank: int | tuple[int, int], gather: bool, mode: str
) -> None:
    """One definition of the loss: xclr_plugin's fast kernel equals the plain upstream
    module (values and gradients, float64, three steps so the bank fills and wraps)."""
    import torch

    from xclr_plugin import XCLRLoss

    upstream = _upstream_xclr_loss()
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, 3, 8, 5, dtype=torch.float64, generator=gen)
    targets = {
        "none": [None] * 3,
        "embeddings": list(torch.randn(3, 8, 7, dtype=torch.float64, generator=gen)),
        "labels": list(torch.randint(0, 3, (3, 8), generator=gen)),
    }[mode]
    results = []
    for cls in (XCLRLoss, upstream.XCLRLoss):
        torch.manual_seed(1)  # the memory bank starts random
        loss_fn = cls(0.2, 0.3, memory_bank_size=bank, gather_distributed=gather)
        loss_fn = loss_fn.double()
        steps = []
        for step in range(3):
            out0 = views[0, step].clone().requires_grad_()
            out1 = views[1, step].clone().requires_grad_()
            loss = loss_fn(out0, out1, targets[step])
            loss.backward()
            steps.append((loss.detach(), out0.grad, out1.grad))
        results.append(steps)
    for fast, plain in zip(*results, strict=True):
        for got, want in zip(fast, plain, strict=True):
            assert got is not None and want is not None
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
