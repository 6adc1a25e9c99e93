"""The loss open_clip's training loop calls: ``--loss`` from the registry, wrapped."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn

from xclr_plugin import registry
from xclr_plugin.errors import NonFiniteLossError, UsageError
from xclr_plugin.integrations.open_clip_train.data import TARGETS_KEY
from xclr_plugin.integrations.open_clip_train.options import Options


def _finite(value: Any) -> bool:
    return not isinstance(value, Tensor) or bool(torch.isfinite(value.detach()).all())


class FiniteLossCheck:
    """Loss hook: stops at the first non-finite loss, before its ``backward``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        self.calls += 1
        values = dict(out) if isinstance(out, dict) else {"loss": out}
        if all(_finite(v) for v in values.values()):
            return
        bad = [k for k, v in kwargs.items() if not _finite(v) and v.is_floating_point()]
        cause = (
            f"non-finite inputs: {', '.join(bad)}"
            if bad
            else "all inputs were finite (try a larger --xclr-target-temperature or "
            "--precision fp32/amp_bf16)"
        )
        for k, v in values.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                values[k] = float(v.detach().float().item())
        raise NonFiniteLossError(
            f"non-finite loss {values} at loss call {self.calls} ({cause}); training "
            "stopped before this update, no checkpoint of it was written."
        )


class CaptionTargets(nn.Module):
    """Calls an image-text loss with ``targets``: the batch's caption embeddings."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        targets = kwargs.pop(TARGETS_KEY, None)  # put there by the model's hooks
        if targets is None:
            raise RuntimeError(
                f"No {TARGETS_KEY!r} reached the loss: captions mode needs the "
                "caption-target hooks of xclr-plugin on the model and its datasets "
                "(run through xclr-openclip-train / patch_open_clip_train)."
            )
        return self.loss(*args, targets=targets, **kwargs)


def build_loss(
    options: Options, args: argparse.Namespace, captions: bool = False
) -> nn.Module:
    """``--loss`` with those of open_clip's settings it accepts (as ``create_loss``)."""
    assert options.loss is not None
    names = ("local_loss", "gather_with_grad", "rank", "world_size")
    candidates = {n: getattr(args, n) for n in names} | {
        "cache_labels": True,
        "use_horovod": args.horovod,
        "dist_impl": args.loss_dist_impl,
    }
    if mode := options.xclr_target_mode:
        candidates["target_mode"] = mode
        if options.xclr_target_temperature is not None:
            candidates["target_temperature"] = options.xclr_target_temperature
    accepted = registry.parameter_names(registry.loss_info(options.loss).load())
    kwargs = {k: v for k, v in candidates.items() if accepted is None or k in accepted}
    for key in ("target_mode", "target_temperature"):
        if key in candidates and key not in kwargs:
            raise UsageError(f"--loss {options.loss!r} does not accept {key}.")
    loss = registry.create_loss(options.loss, **kwargs)
    if captions:
        loss = CaptionTargets(loss)
    loss.register_forward_hook(FiniteLossCheck(), with_kwargs=True)
    return loss
