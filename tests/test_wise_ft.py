"""WiSE-FT interpolation (``interpolate``, ``xclr-wise-ft``) on a tiny open_clip model."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from _openclip_helpers import TINY, register_tiny

from xclr_plugin.cli.wise_ft import main
from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train.wise_ft import interpolate


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(open_clip.create_model(TINY).state_dict())


@pytest.fixture()
def pair(
    tmp_path: Path,
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    register_tiny(tmp_path)
    zero, fine = _weights(0), _weights(1)
    torch.save(zero, tmp_path / "zero.bin")
    # an open_clip_train checkpoint saved under DDP
    ddp = {f"module.{k}": v for k, v in fine.items()}
    torch.save({"epoch": 1, "name": "ft", "state_dict": ddp}, tmp_path / "epoch_1.pt")
    return tmp_path / "zero.bin", tmp_path / "epoch_1.pt", zero, fine


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


def test_alpha_0_and_1_give_the_inputs_bit_for_bit(pair: tuple, tmp_path: Path) -> None:
    zero_path, fine_path, zero, fine = pair
    for alpha, expected in ((0.0, zero), (1.0, fine)):
        out = _load(interpolate(zero_path, fine_path, alpha, tmp_path / "out.bin"))
        assert out.keys() == expected.keys()
        for key, value in expected.items():
            assert out[key].dtype == value.dtype and torch.equal(out[key], value), key


def test_alpha_half_is_the_midpoint_and_open_clip_loads_it(
    pair: tuple, tmp_path: Path
) -> None:
    zero_path, fine_path, zero, fine = pair
    out = interpolate(zero_path, fine_path, 0.5, tmp_path / "wise.bin")
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(out))
    loaded = model.state_dict()
    for key, value in zero.items():
        if value.is_floating_point():
            torch.testing.assert_close(
                loaded[key], (value + fine[key]) / 2, rtol=0, atol=0
            )
        else:
            assert torch.equal(loaded[key], fine[key])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_non_float_and_counters_come_from_one_side(tmp_path: Path) -> None:
    zero = {"bn.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(5)}
    fine = {"bn.weight": torch.full((2,), 3.0), "ids": torch.tensor([1, 2])}
    zero["ids"] = torch.tensor([7, 8])
    torch.save(zero, tmp_path / "a.bin")
    torch.save(fine, tmp_path / "b.bin")  # frozen BN: no counter saved
    out = _load(
        interpolate(tmp_path / "a.bin", tmp_path / "b.bin", 0.25, tmp_path / "o")
    )
    assert torch.equal(out["bn.weight"], torch.full((2,), 1.5))
    assert torch.equal(out["ids"], fine["ids"])
    assert torch.equal(out["bn.num_batches_tracked"], torch.tensor(5))


def test_mismatches_and_bad_alpha_are_refused(pair: tuple, tmp_path: Path) -> None:
    zero_path, _, zero, _ = pair
    other = dict(zero)
    del other["logit_scale"]
    torch.save(other, tmp_path / "other.bin")
    with pytest.raises(UsageError, match="'logit_scale' only in zero_shot"):
        interpolate(zero_path, tmp_path / "other.bin", 0.5, tmp_path / "o.bin")
    other = {**zero, "logit_scale": torch.ones(2)}
    torch.save(other, tmp_path / "other.bin")
    with pytest.raises(UsageError, match="'logit_scale' of"):
        interpolate(zero_path, tmp_path / "other.bin", 0.5, tmp_path / "o.bin")
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="alpha: expected a number in"):
            interpolate(zero_path, zero_path, alpha, tmp_path / "o.bin")
    assert not (tmp_path / "o.bin").exists()


def test_command_writes_and_errors_are_one_line(
    pair: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zero_path, fine_path, zero, _ = pair
    out = tmp_path / "cli.bin"
    args = [str(zero_path), str(fine_path), "-o", str(out)]
    assert main([*args, "--alpha", "0"]) == 0
    assert all(torch.equal(v, zero[k]) for k, v in _load(out).items())
    capsys.readouterr()
    assert main([*args, "--alpha", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "xclr-wise-ft: error: alpha: expected a number in [0, 1], got 2.0\n"
    with pytest.raises(SystemExit) as parse_error:
        main([*args, "--alpha", "x"])
    assert parse_error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("xclr-wise-ft: error:") and err.count("\n") == 1, err
    assert main([str(tmp_path / "missing.pt"), str(fine_path), "-o", str(out)]) == 2
    assert "zero_shot: cannot load" in capsys.readouterr().err
