"""``open_clip_train`` with ``--loss NAME``: its module globals patched while it runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import logging
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train.data import (
    attach_target_hooks,
    caption_targets,
    targets_csv_dataset,
    targets_get_wds_dataset,
)
from xclr_plugin.integrations.open_clip_train.loss import build_loss
from xclr_plugin.integrations.open_clip_train.options import PROG, Options, check


@contextlib.contextmanager
def preserve_logging() -> Iterator[None]:
    """Undoes ``setup_logging``'s root handlers and levels (runs in one process)."""
    handlers = list(logging.root.handlers)
    names = ["", *logging.root.manager.loggerDict]
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for handler in [h for h in logging.root.handlers if h not in handlers]:
            logging.root.removeHandler(handler)
            handler.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def patch_open_clip_train(options: Options) -> Iterator[Callable[..., Any]]:
    """Patches ``open_clip_train`` for ``options`` while the block runs; gives its main."""
    try:
        import open_clip
        import open_clip_train.data as ocd
        import open_clip_train.main as ocm
    except ImportError as err:
        raise UsageError(
            f"{PROG} needs open_clip_torch 3.x with its training extra ({err}). Install "
            'it: pip install "xclr-plugin[openclip]"'
        ) from err
    version = str(getattr(open_clip, "__version__", "unknown"))
    if version.split(".")[0] != "3":
        raise UsageError(
            f"{PROG} supports open_clip_torch 3.x (the open_clip_train.main API it "
            f"patches), found {version}. Install a supported version: pip install "
            '"open_clip_torch[training]>=3.3,<4".'
        )
    with contextlib.ExitStack() as stack:

        def patch(module: Any, name: str, value: Any) -> None:
            stack.enter_context(mock.patch.object(module, name, value))

        def parse_args(argv: Sequence[str]) -> argparse.Namespace:
            args: argparse.Namespace = original_parse_args(argv)
            vars(args).update(dataclasses.asdict(options))  # shown in params.txt
            checked = check(options, args)
            args.xclr_target_mode = mode = checked.xclr_target_mode
            if checked.loss is None:
                return args
            # open_clip's SigLIP model init (logit scale and bias)
            args.siglip = args.siglip or checked.loss == "siglip"
            captions = mode == "captions"
            if captions:
                targets = caption_targets(checked, args, stack)
                patch(ocm, "create_model_and_transforms", _with_hooks(ocm, targets.dim))
                patch(ocd, "CsvDataset", targets_csv_dataset(ocd.CsvDataset, targets))
                patch(ocd, "get_wds_dataset", targets_get_wds_dataset(ocd, targets))
            patch(ocm, "create_loss", lambda a: build_loss(checked, a, captions))
            return args

        original_parse_args = ocm.parse_args
        patch(open_clip.timm_model, "freeze_batch_norm_2d", freeze_batch_norm_2d)
        stack.enter_context(preserve_logging())
        patch(ocm, "parse_args", parse_args)
        patch(ocm, "get_latest_checkpoint", complete_latest(ocm.get_latest_checkpoint))
        yield ocm.main


def freeze_batch_norm_2d(module: Any, module_match: Any = None, name: str = "") -> Any:
    """open_clip's ``freeze_batch_norm_2d`` (``--lock-image-freeze-bn-stats``) for timm.

    open_clip 3.3 turns every ``BatchNorm2d`` subclass into torchvision's
    ``FrozenBatchNorm2d``, which drops the activation of timm's ``BatchNormAct2d``
    (every ReLU6 of an EfficientNet); timm's own function keeps it.
    """
    import torch
    from timm.layers import freeze_batch_norm_2d as timm_freeze

    norms = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
    if (not module_match or name in module_match) and isinstance(module, norms):
        return timm_freeze(module)
    for child_name, child in module.named_children():
        full_name = f"{name}.{child_name}" if name else child_name
        frozen = freeze_batch_norm_2d(child, module_match, full_name)
        if frozen is not child:
            module.add_module(child_name, frozen)
    return module


def _with_hooks(ocm: Any, dim: int) -> Any:
    """``create_model_and_transforms`` putting the caption-target hooks on the model."""
    original = ocm.create_model_and_transforms

    def create_model_and_transforms(*args: Any, **kwargs: Any) -> Any:
        created = original(*args, **kwargs)  # once: a distill teacher is refused
        attach_target_hooks(created[0], dim)
        return created

    return create_model_and_transforms


def complete_latest(original: Callable[..., Any]) -> Callable[..., Any]:
    """``get_latest_checkpoint`` for ``--resume latest`` skipping cut-off checkpoints.

    A run killed while saving leaves a truncated newest ``.pt``; open_clip would crash
    on it. ``torch.save`` writes a zip whose directory is at the end: an O(1) check.
    """

    def latest(path: str, remote: bool) -> str | None:
        found = original(path, remote)
        if remote or found is None:
            return found  # type: ignore[no-any-return]
        candidates = sorted(glob.glob(path + "**/*.pt", recursive=True), key=ocm_key)
        for candidate in reversed(candidates[: candidates.index(found) + 1]):
            if zipfile.is_zipfile(candidate):
                return candidate
            logging.warning(
                "%s: skipping the checkpoint %s for --resume latest: it is not a "
                "complete torch.save file (cut off while it was written?).",
                PROG,
                candidate,
            )
        return None

    return latest


def ocm_key(path: str) -> Any:
    from open_clip_train.main import natural_key

    return natural_key(path)
