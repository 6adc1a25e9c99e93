"""One rank of ``torchrun --nproc_per_node N tests/_openclip_dist_worker.py OUT CONFIGS -- ARGS``.

Runs ``xclr-openclip-train ARGS`` (the product entry point) and records, at every loss
call of open_clip's training loop, what reaches the loss on this rank:

- ``ids``: the sample indices (CSV rows) carried with the batch, and the local image
  and text features, logit scale, targets and the loss value;
- ``text_err``: max |text_features - model.encode_text(captions of ids)| (the features
  really belong to those samples);
- ``gathered``: what ``XCLRClipLoss`` got back from its gathers (features from
  ``open_clip.loss.gather_features``, targets from ``gather_without_grad``).

Records go to ``OUT/rank{R}.pt``; the test compares them across ranks.

Test-only shim: open_clip 3.3 builds ``DistributedDataParallel(model,
device_ids=[device])``, which DDP refuses for CPU modules; the shim drops
``device_ids`` (the product code passes nothing of the kind and needs no shim on GPUs).
``XCLR_TEST_SHIFT_RANK=R`` shifts rank R's captions by one sample (negative control).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import torch


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module: torch.nn.Module, device_ids: Any = None, **kw: Any):
        super().__init__(module, device_ids=None, **kw)


def main() -> int:
    out, configs, sep, *argv = sys.argv[1:]
    assert sep == "--"
    torch.set_num_threads(1)
    torch.nn.parallel.DistributedDataParallel = _CpuDDP  # type: ignore[misc,assignment]

    import open_clip
    import open_clip_train.main as ocm
    from _openclip_helpers import rows_of, shard_table

    import xclr_plugin.clip_loss as xcl
    from xclr_plugin.cache import CaptionCache
    from xclr_plugin.cli.openclip_train import main as openclip_train
    from xclr_plugin.integrations.open_clip_train.data import TARGETS_KEY
    from xclr_plugin.integrations.open_clip_train.loss import CaptionTargets

    open_clip.add_model_config(configs)
    rank = int(os.environ["RANK"])
    train = argv[argv.index("--train-data") + 1]
    cache_dir = argv[argv.index("--xclr-caption-cache") + 1]
    if "webdataset" in argv:
        captions, table = shard_table(cache_dir, train)
    else:
        with open(train, newline="") as f:
            captions = [row["title"] for row in csv.DictReader(f, delimiter="\t")]
        table = CaptionCache.open(cache_dir)[:]
    model_name = argv[argv.index("--model") + 1]
    tokenizer = open_clip.get_tokenizer(model_name)
    calls: list[dict[str, Any]] = []

    def record_gather(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            parts = result if isinstance(result, tuple) else (result,)
            if calls:
                calls[-1]["gathered"].setdefault(name, []).append(
                    [p.detach().clone() for p in parts]
                )
            return result

        return wrapper

    xcl.gather_features = record_gather("features", xcl.gather_features)
    xcl.gather_without_grad = record_gather("targets", xcl.gather_without_grad)

    shift = os.environ.get("XCLR_TEST_SHIFT_RANK")
    if shift is not None and int(shift) == rank:
        lookup = CaptionTargets.forward

        def shifted(self: Any, *args: Any, **kwargs: Any) -> Any:
            # each sample gets its neighbour's caption
            kwargs[TARGETS_KEY] = kwargs[TARGETS_KEY].roll(1, dims=0)
            return lookup(self, *args, **kwargs)

        CaptionTargets.forward = shifted  # type: ignore[method-assign]

    original = ocm.train_one_epoch

    def train_one_epoch(model: Any, data: Any, loss: Any, *a: Any, **kw: Any) -> Any:
        inner_model = getattr(model, "module", model)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)

        def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = torch.tensor(rows_of(kwargs[TARGETS_KEY].detach(), table))
            with torch.no_grad():
                want = inner_model.encode_text(
                    tokenizer([captions[i] for i in ids]), normalize=True
                )
            calls.append(
                {
                    "ids": ids,
                    "image_features": kwargs["image_features"].detach().clone(),
                    "text_features": kwargs["text_features"].detach().clone(),
                    "logit_scale": kwargs["logit_scale"].detach().clone(),
                    "text_err": float(
                        (kwargs["text_features"].detach() - want).abs().max()
                    ),
                    "gathered": {},
                }
            )

        def inner(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            calls[-1]["targets"] = kwargs["targets"].detach().clone()

        def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            calls[-1]["loss"] = output["contrastive_loss"].detach().clone()

        handles = [
            loss.register_forward_pre_hook(before, with_kwargs=True),
            loss.loss.register_forward_pre_hook(inner, with_kwargs=True),
            loss.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            return original(model, data, loss, *a, **kw)
        finally:
            for handle in handles:
                handle.remove()

    ocm.train_one_epoch = train_one_epoch
    result = openclip_train(argv)
    torch.save(
        {"rank": rank, "result": result, "calls": calls}, Path(out) / f"rank{rank}.pt"
    )
    return 0 if result is None else 1


if __name__ == "__main__":
    sys.exit(main())
