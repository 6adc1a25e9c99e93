"""Tests of the loss registry: names from entry points, lazy imports, clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _registry_helpers import write_distribution
from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss
from omegaconf import OmegaConf

from xclr_plugin import registry
from xclr_plugin.errors import UsageError
from xclr_plugin.loss import XCLRLoss
from xclr_plugin.registry import (
    LossArgumentError,
    LossImportError,
    build_criterion,
    clear_cache,
    create_loss,
    list_losses,
    loss_info,
    parameter_names,
)

OUR_NAMES = ["clip", "dcl", "dclw", "ntxent", "siglip", "supcon", "xclr", "xclr-clip"]

TINY_PACKAGE = '''
    """A third-party package that registers its own losses."""
    import torch
    from torch import nn


    class MeanAbsLoss(nn.Module):
        """Two-view toy loss: scale * mean |out0 - out1|."""

        loss_targets = "none"

        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, out0, out1):
            return self.scale * (out0 - out1).abs().mean()


    def make_caption_loss(weight: float = 1.0) -> nn.Module:
        """A factory for a loss that wants captions."""
        loss = MeanAbsLoss(weight)
        return loss

    make_caption_loss.loss_targets = "captions"


    class BadKind(nn.Module):
        loss_inputs = "three-view"


    def not_a_module():
        return 42


    NOT_CALLABLE = 42
'''


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Forgets the cached names before and after a test that changes sys.path."""
    clear_cache()
    yield
    clear_cache()
    sys.modules.pop("tiny_losses", None)


@pytest.fixture
def tiny_dist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> Path:
    """A tiny package with a real dist-info installed into a folder on sys.path."""
    site = tmp_path / "site"
    dist_info = write_distribution(
        site,
        "tiny-losses",
        {"tiny_losses": TINY_PACKAGE},
        {
            "tiny-l1": "tiny_losses:MeanAbsLoss",
            "tiny-captions": "tiny_losses:make_caption_loss",
            "tiny-bad-kind": "tiny_losses:BadKind",
            "tiny-not-module": "tiny_losses:not_a_module",
            "tiny-missing": "tiny_losses_not_installed.losses:Loss",
            "tiny-no-attr": "tiny_losses:NoSuchLoss",
            "tiny-not-callable": "tiny_losses:NOT_CALLABLE",
        },
    )
    monkeypatch.syspath_prepend(str(site))
    return dist_info


def test_lists_our_names_sorted() -> None:
    names = list_losses()
    assert set(OUR_NAMES) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize(
    ("name", "cls", "kwargs"),
    [
        ("ntxent", NTXentLoss, {"temperature": 0.3, "memory_bank_size": (16, 8)}),
        ("dcl", DCLLoss, {"temperature": 0.2}),
        ("dclw", DCLWLoss, {"temperature": 0.7}),
        ("xclr", XCLRLoss, {"temperature": 0.2, "target_temperature": 0.3}),
    ],
)
def test_builds_host_and_own_two_view_losses(
    name: str, cls: type, kwargs: dict[str, object]
) -> None:
    loss = create_loss(name, **kwargs)
    assert type(loss) is cls
    for key, value in kwargs.items():
        if key != "memory_bank_size":
            assert getattr(loss, key) == value
    assert loss_info(name).inputs == "two-view"


def test_builds_open_clip_losses() -> None:
    from open_clip.loss import ClipLoss, SigLipLoss

    from xclr_plugin.clip_loss import XCLRClipLoss

    assert type(create_loss("clip", local_loss=True)) is ClipLoss
    assert type(create_loss("siglip")) is SigLipLoss
    xclip = create_loss("xclr-clip", target_temperature=0.2)
    assert type(xclip) is XCLRClipLoss
    for name in ("clip", "siglip", "xclr-clip"):
        assert loss_info(name).inputs == "image-text"


def test_specs_of_our_losses() -> None:
    targets = {name: loss_info(name).targets for name in OUR_NAMES}
    assert targets == {
        "clip": "none",
        "dcl": "none",
        "dclw": "none",
        "ntxent": "none",
        "siglip": "none",
        "supcon": "labels",
        "xclr": "captions",
        "xclr-clip": "captions",
    }
    spec = loss_info("ntxent")
    assert (spec.value, spec.module, spec.distribution) == (
        "lightly.loss:NTXentLoss",
        "lightly.loss",
        "xclr-plugin",
    )


def test_listing_and_two_view_losses_import_no_open_clip() -> None:
    code = (
        "import sys\n"
        "from xclr_plugin.registry import create_loss, list_losses, loss_info\n"
        "names = list_losses()\n"
        "[loss_info(n) for n in names]\n"
        "create_loss('ntxent'); create_loss('xclr'); create_loss('supcon')\n"
        "assert 'open_clip' not in sys.modules, 'open_clip imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_name_lists_names_and_closest_match() -> None:
    with pytest.raises(
        ValueError, match=r"'xclr_clip'\. Did you mean 'xclr-clip'\?"
    ) as err:
        create_loss("xclr_clip")
    for name in OUR_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="Did you mean 'ntxent'"):
        loss_info("ntxnet")
    with pytest.raises(
        ValueError, match=r"Unknown loss name 'zzzz'\. Available losses"
    ):
        create_loss("zzzz")


def test_bad_kwargs_name_the_loss_and_its_parameters() -> None:
    with pytest.raises(TypeError) as err:
        create_loss("ntxent", target_temperature=0.1)
    message = str(err.value)
    assert "Loss 'ntxent' (lightly.loss:NTXentLoss)" in message
    assert "target_temperature" in message
    assert "It accepts: temperature, memory_bank_size, gather_distributed." in message
    # A value error from inside the constructor is not disguised as a kwargs error.
    with pytest.raises(ValueError, match="temperature"):
        create_loss("xclr", temperature=-1.0)


def test_supcon_is_soft_label_supcon() -> None:
    """``supcon`` on labels equals a hand-written supervised contrastive loss."""
    gen = torch.Generator().manual_seed(0)
    n, dim, tau = 12, 5, 0.2
    out0 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    out1 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 3, 1, 2, 2])

    loss = create_loss("supcon", temperature=tau)(out0, out1, labels)

    z = F.normalize(torch.cat([out0, out1]), dim=1)
    y = torch.cat([labels, labels])
    eye = torch.eye(2 * n, dtype=torch.bool)
    logits = (z @ z.T / tau).masked_fill(eye, float("-inf"))
    log_prob = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    positives = (y[:, None] == y[None, :]) & ~eye
    per_row = -(log_prob * positives).sum(1) / positives.sum(1)
    torch.testing.assert_close(loss, per_row.mean(), rtol=1e-9, atol=1e-9)


def test_xclr_without_targets_matches_ntxent_through_registry() -> None:
    gen = torch.Generator().manual_seed(1)
    out0, out1 = torch.randn(2, 8, 6, generator=gen, dtype=torch.float64)
    ours = create_loss("xclr", temperature=0.5)(out0, out1)
    theirs = create_loss("ntxent", temperature=0.5)(out0, out1)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_build_criterion_from_mappings() -> None:
    loss = build_criterion(
        {"name": "ntxent", "temperature": 0.25, "gather_distributed": None}
    )
    assert isinstance(loss, NTXentLoss) and loss.temperature == 0.25
    cfg = OmegaConf.create(
        {
            "name": "xclr",
            "temperature": 0.3,
            "memory_bank_size": [32, 4],
            "target_temperature": None,
        }
    )
    loss = build_criterion(cfg)
    assert isinstance(loss, XCLRLoss)
    assert loss.temperature == 0.3 and loss.target_temperature == 0.1
    assert tuple(loss.memory_bank.size) == (32, 4)
    with pytest.raises(ValueError, match="needs a 'name' key"):
        build_criterion({"temperature": 0.1})
    with pytest.raises(TypeError, match="must be a mapping"):
        build_criterion(["xclr"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Did you mean 'supcon'"):
        build_criterion({"name": "supcn"})


def test_third_party_distribution_is_found_by_name(tiny_dist: Path) -> None:
    names = list_losses()
    assert {"tiny-l1", "tiny-captions"} <= set(names)
    assert set(OUR_NAMES) <= set(names)
    assert "tiny_losses" not in sys.modules  # listing imports nothing

    loss = create_loss("tiny-l1", scale=2.0)
    assert type(loss).__module__ == "tiny_losses"
    value = loss(torch.zeros(2, 3), torch.ones(2, 3))
    assert value.item() == pytest.approx(2.0)

    spec = loss_info("tiny-l1")
    assert (spec.distribution, spec.inputs, spec.targets) == (
        "tiny-losses",
        "two-view",
        "none",
    )
    assert loss_info("tiny-captions").targets == "captions"
    assert build_criterion({"name": "tiny-captions", "weight": 3.0}).scale == 3.0


def test_third_party_errors(tiny_dist: Path) -> None:
    with pytest.raises(TypeError, match=r"Loss 'tiny-l1' .* It accepts: scale\."):
        create_loss("tiny-l1", temperature=0.1)
    with pytest.raises(ValueError, match="loss_inputs='three-view'"):
        loss_info("tiny-bad-kind")
    with pytest.raises(TypeError, match=r"returned int, expected a torch\.nn\.Module"):
        create_loss("tiny-not-module")
    with pytest.raises(ImportError, match="Loss 'tiny-missing' is provided by"):
        create_loss("tiny-missing")
    with pytest.raises(ImportError, match="NoSuchLoss"):
        create_loss("tiny-no-attr")
    # Issue 21: every registry error is a UsageError, printed by the commands as one
    # line (before, these two were plain TypeErrors: a traceback in
    # xclr-openclip-train, whose command layer catches UsageError only).
    with pytest.raises(UsageError, match=r"returned int, expected a torch\.nn\.Module"):
        create_loss("tiny-not-module")
    with pytest.raises(
        LossImportError,
        match=r"'tiny_losses:NOT_CALLABLE' must name a class or factory",
    ):
        create_loss("tiny-not-callable")


def test_new_distribution_needs_clear_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    assert "tiny-l1" not in list_losses()
    site = tmp_path / "late"
    write_distribution(
        site,
        "tiny-losses",
        {"tiny_losses": TINY_PACKAGE},
        {"tiny-l1": "tiny_losses:MeanAbsLoss"},
    )
    monkeypatch.syspath_prepend(str(site))
    assert "tiny-l1" not in list_losses()  # cached
    registry.clear_cache()
    assert "tiny-l1" in list_losses()


def test_conflicting_registrations_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    site = tmp_path / "site"
    write_distribution(
        site,
        "tiny-losses",
        {"tiny_losses": TINY_PACKAGE},
        {"ntxent": "tiny_losses:MeanAbsLoss"},
    )
    monkeypatch.syspath_prepend(str(site))
    clear_cache()
    assert list_losses().count("ntxent") == 1
    with pytest.raises(ValueError) as err:
        create_loss("ntxent")
    # What differs: the objects, and the distributions (with version and folder).
    message = str(err.value)
    assert "Loss name 'ntxent' is registered 2 times for different objects: " in message
    assert f"'tiny_losses:MeanAbsLoss' by tiny-losses 0.1.0 (at {site})" in message
    assert "'lightly.loss:NTXentLoss' by xclr-plugin " in message
    assert "different targets" not in message  # issue 21: not what differs


def test_supcon_takes_chunk_size() -> None:
    from xclr_plugin.registry import create_loss

    loss_fn = create_loss("supcon", chunk_size=4)
    assert loss_fn.chunk_size == 4


def test_parameter_names_is_the_one_introspection_helper() -> None:
    """Keyword parameters in signature order; None where anything may be accepted."""

    def factory(a: int, /, b: int, *args: int, c: int = 0, **kwargs: int) -> None: ...

    def keyword_only(a: int, /, b: int, *args: int, c: int = 0) -> None: ...

    assert parameter_names(XCLRLoss) == [
        "temperature",
        "target_temperature",
        "memory_bank_size",
        "gather_distributed",
        "chunk_size",
    ]
    assert parameter_names(NTXentLoss) == [
        "temperature",
        "memory_bank_size",
        "gather_distributed",
    ]
    assert parameter_names(keyword_only) == ["b", "c"]
    assert parameter_names(factory) is None  # **kwargs
    assert parameter_names(max) is None  # a builtin without a signature


# -- issue 21: plugins that fail, arguments of the wrong type ------------------------

BROKEN_PLUGIN = '''
    """A third-party plugin whose import fails with its own bug."""
    raise RuntimeError("the plugin's own bug")
'''


@pytest.fixture
def broken_dist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> Iterator[Path]:
    site = tmp_path / "broken-site"
    write_distribution(
        site,
        "broken-losses",
        {"broken_losses": BROKEN_PLUGIN},
        {"broken-loss": "broken_losses:Loss"},
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("broken_losses", None)


BROKEN_MESSAGE = (
    "Loss 'broken-loss' is provided by 'broken_losses:Loss' (registered by "
    "broken-losses), but importing it failed: RuntimeError: the plugin's own bug."
)


def test_a_plugin_raising_at_import_is_wrapped_like_an_import_error(
    broken_dist: Path,
) -> None:
    """Before: the plugin's RuntimeError reached the user bare."""
    for call in (create_loss, loss_info):
        with pytest.raises(LossImportError) as err:
            call("broken-loss")
        assert str(err.value) == BROKEN_MESSAGE
        assert isinstance(err.value, ImportError) and isinstance(err.value, UsageError)
        assert isinstance(err.value.__cause__, RuntimeError)


def test_listing_by_inputs_leaves_a_broken_plugin_out_with_a_warning(
    broken_dist: Path,
) -> None:
    with pytest.warns(
        UserWarning, match="Leaving out loss 'broken-loss': Loss 'broken"
    ):
        assert list_losses("image-text") == ["clip", "siglip", "xclr-clip"]
    assert "broken-loss" in list_losses()  # listing names imports nothing
    assert create_loss("ntxent").temperature == 0.5  # unrelated losses still build


def test_commands_print_a_broken_plugin_in_one_line(
    broken_dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: an ImportError (RuntimeError) traceback in xclr-openclip-train, a Hydra
    traceback in xclr-train; --loss ntxent crashed listing the image-text losses."""
    from xclr_plugin.cli import train as cli_train
    from xclr_plugin.cli.openclip_train import main as openclip_main
    from xclr_plugin.integrations.lightly_train.config import load_config

    common = ["--train-data", str(tmp_path / "train.csv"), "--logs", str(tmp_path)]
    runs = [
        (lambda: openclip_main(["--loss", "broken-loss", *common]), BROKEN_MESSAGE),
        (
            lambda: openclip_main(["--loss", "ntxent", *common]),
            "needs an image-text loss: clip, siglip, xclr-clip.",
        ),
        (
            lambda: cli_train._run(
                load_config([f"input_dir={tmp_path}", "criterion.name=broken-loss"])
            ),
            BROKEN_MESSAGE,
        ),
    ]
    for run, words in runs:
        status: object
        try:
            status = run()
        except SystemExit as stop:
            status = stop.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1, lines
        assert lines[0].endswith(words) and ": error: " in lines[0], lines


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        (
            "xclr",
            {"gather_distributed": "false"},
            "gather_distributed must be a bool, got 'false' (str)",
        ),
        (
            "ntxent",
            {"gather_distributed": 1},
            "gather_distributed must be a bool, got 1 (int)",
        ),
        (
            "clip",
            {"local_loss": "false"},
            "local_loss must be a bool, got 'false' (str)",
        ),
        ("clip", {"world_size": "2"}, "world_size must be an int, got '2' (str)"),
        ("xclr-clip", {"rank": 0.0}, "rank must be an int, got 0.0 (float)"),
        (
            "supcon",
            {"chunk_size": 2.5},
            "chunk_size must be an int or None, got 2.5 (float)",
        ),
        (
            "xclr",
            {"temperature": "0.1"},
            "temperature must be a float, got '0.1' (str)",
        ),
        ("xclr", {"temperature": True}, "temperature must be a float, got True (bool)"),
    ],
)
def test_bool_int_and_float_arguments_are_type_checked(
    name: str, kwargs: dict[str, object], message: str
) -> None:
    """Before: 'false' is truthy, so gather_distributed='false' gathered."""
    with pytest.raises(
        LossArgumentError, match=rf"^Loss '{name}': {re.escape(message)}\.$"
    ):
        create_loss(name, **kwargs)


def test_type_checks_accept_what_the_annotations_allow() -> None:
    import numpy as np

    loss = create_loss(
        "xclr", temperature=1, chunk_size=np.int64(4), memory_bank_size=[8, 3]
    )
    assert (loss.temperature, loss.chunk_size) == (1.0, 4)
    assert create_loss("xclr", chunk_size=None, temperature=np.float32(0.5))
    assert create_loss("clip", world_size=1, rank=np.int32(0)).world_size == 1
    assert create_loss("ntxent", gather_distributed=np.bool_(False))
    with pytest.raises(UsageError, match=r"inputs must be one of .* got 'bogus'"):
        list_losses("bogus")  # type: ignore[arg-type]
