"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate zero-shot and fine-tuned weights.

``theta = (1 - alpha) * zero_shot + alpha * finetuned`` for every floating tensor; the
rest (integer buffers such as BatchNorm's ``num_batches_tracked``) is the fine-tuned
model's. Inputs: a plain state dict (a ``local-dir:`` folder's
``open_clip_pytorch_model.bin``, a ``--pretrained`` file) or an ``open_clip_train``
checkpoint (``{"state_dict": ..., "epoch": ...}``, keys ``module.``-prefixed under DDP).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from xclr_plugin.atomic import atomic_path
from xclr_plugin.errors import UsageError


def load_weights(
    path: str | os.PathLike[str], argument: str
) -> dict[str, torch.Tensor]:
    """The model state dict in ``path`` (plain or an open_clip_train checkpoint)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise UsageError(f"{argument}: cannot load {path} ({err})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise UsageError(
            f"{argument}: expected a state dict or an open_clip_train checkpoint, got "
            f"{path} holding {type(loaded).__name__}"
        )
    if loaded and all(k.startswith("module.") for k in loaded):  # saved under DDP
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return loaded


def interpolate(
    zero_shot: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    alpha: float,
    output: str | os.PathLike[str],
) -> Path:
    """Writes the WiSE-FT weights of ``zero_shot`` and ``finetuned`` to ``output``.

    Args:
        zero_shot: the weights before fine-tuning.
        finetuned: the weights after (same keys and shapes).
        alpha: 0 gives ``zero_shot``, 1 ``finetuned``, bit for bit.
        output: a plain state dict, atomically written; load it with
            ``open_clip.create_model_and_transforms(NAME, pretrained=output)`` or
            ``open_clip.load_checkpoint(model, output)``.

    Returns:
        ``output`` as a path.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha: expected a number in [0, 1], got {alpha}")
    theta_0 = load_weights(zero_shot, "zero_shot")
    theta_1 = load_weights(finetuned, "finetuned")
    # Frozen BatchNorm layers (--lock-image-freeze-bn-stats) save no counter: a
    # counter on one side only is kept from that side.
    for key in theta_0.keys() ^ theta_1.keys():
        if key.endswith(".num_batches_tracked"):
            theta_0[key] = theta_1[key] = {**theta_1, **theta_0}[key]
    if theta_0.keys() != theta_1.keys():
        only_0 = sorted(theta_0.keys() - theta_1.keys())
        only_1 = sorted(theta_1.keys() - theta_0.keys())
        key, side = (only_0[0], "zero_shot") if only_0 else (only_1[0], "finetuned")
        raise UsageError(
            f"zero_shot and finetuned: expected the same keys, got {key!r} only in "
            f"{side} ({len(only_0)} keys only in zero_shot, {len(only_1)} only in "
            "finetuned): checkpoints of different models?"
        )
    merged = {}
    for key, fine in theta_1.items():
        zero = theta_0[key]
        if zero.shape != fine.shape or zero.dtype != fine.dtype:
            raise UsageError(
                f"zero_shot and finetuned: expected equal shapes and dtypes, got "
                f"{key!r} of {tuple(zero.shape)} {zero.dtype} and {tuple(fine.shape)} "
                f"{fine.dtype}"
            )
        if not fine.is_floating_point() or alpha == 1:
            merged[key] = fine
        elif alpha == 0:
            merged[key] = zero
        else:
            merged[key] = (1 - alpha) * zero + alpha * fine
    out = Path(output)
    with atomic_path(out) as tmp:
        torch.save(merged, tmp)
    return out
