"""``xclr-train`` with recording hooks, for tests/test_lightly_train_distributed.py.

Run as a script (``python tests/_lightly_ddp_driver.py <xclr-train overrides>``);
Lightning's DDP launcher re-runs this same script for the other process, so every
process installs the hooks. Nothing here changes what is trained.

Each process writes ``$XCLR_DDP_RECORD_DIR/rank{r}.pt`` with two lists of steps. In
``steps``, per training step: the file names of the batch whose features reach the
loss, what the loss receives (``out0``, ``out1``, ``targets``), what its gathers
return, the same file names gathered by the loss's own gather (the per-sample identity
carried through the gather path), and the loss it returns (the value the module
logs). ``shifted`` is the negative control, recorded alongside in the same run: the
loss called once more on the same embeddings, under ``no_grad`` (its result is
dropped), with process ``SHIFT_RANK``'s caption embeddings shifted by one sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightly.utils import dist as lightly_dist

from xclr_plugin import loss as loss_module
from xclr_plugin.cli.train import main
from xclr_plugin.integrations import lightly_train

RECORD_DIR = os.environ["XCLR_DDP_RECORD_DIR"]
SHIFT_RANK = 1

steps: list[dict[str, Any]] = []
shifted: list[dict[str, Any]] = []
logged: list[torch.Tensor] = []
current: dict[str, Any] = {}


def _install() -> None:
    training_step = lightly_train.TargetEmbedding.training_step
    forward = loss_module.XCLRLoss.forward
    gather = lightly_dist.gather
    gather_targets = loss_module.gather_without_grad

    def recording_step(self: Any, batch: Any, batch_idx: int) -> Any:
        current["filenames"] = list(batch[2])
        return training_step(self, batch, batch_idx)

    def recording_gather(tensor: torch.Tensor) -> Any:
        out = gather(tensor)
        if "gathers" in current:
            current["gathers"].append(torch.cat(out).detach().clone())
        return out

    def recording_gather_targets(tensor: torch.Tensor) -> torch.Tensor:
        out = gather_targets(tensor)
        if "gathers" in current:
            current["gathered_targets"] = out.detach().clone()
        return out

    def recording_forward(
        self: Any,
        out0: torch.Tensor,
        out1: torch.Tensor,
        targets: Any = None,
        **kw: Any,
    ) -> torch.Tensor:
        if not torch.is_grad_enabled():  # xclr-train's trial step before training
            return forward(self, out0, out1, targets, **kw)
        loss = record(steps, self, out0, out1, targets)
        with torch.no_grad():  # the negative control, dropped after recording
            wrong = (
                targets.roll(1, dims=0)
                if lightly_dist.rank() == SHIFT_RANK
                else targets
            )
            record(shifted, self, out0, out1, wrong)
        torch.save(
            {"steps": steps, "shifted": shifted, "logged": logged},
            os.path.join(RECORD_DIR, f"rank{lightly_dist.rank()}.pt"),
        )
        return loss

    def record(
        into: list[dict[str, Any]],
        loss_fn: Any,
        out0: torch.Tensor,
        out1: torch.Tensor,
        targets: Any,
    ) -> torch.Tensor:
        current["gathers"], current["gathered_targets"] = [], None
        loss = forward(loss_fn, out0, out1, targets)
        names = current["filenames"]
        # The identity of each row, carried through the loss's own gather.
        order = sorted(current["all_names"])
        ids = torch.tensor([order.index(n) for n in names], dtype=torch.float32)
        gathered_ids = torch.cat(gather(ids)).long().tolist()
        into.append(
            {
                "filenames": names,
                "out0": out0.detach().clone(),
                "out1": out1.detach().clone(),
                "targets": targets.detach().clone(),
                "gathered_out0": current["gathers"][0],
                "gathered_out1": current["gathers"][1],
                "gathered_targets": current["gathered_targets"],
                "gathered_filenames": [order[i] for i in gathered_ids],
                "loss": loss.detach().clone(),
                "world_size": lightly_dist.world_size(),
            }
        )
        del current["gathers"]
        return loss

    def recording_batch_end(self: Any, *args: Any, **kwargs: Any) -> None:
        # What the module logged for this step, after Lightning's sync across processes.
        logged.append(self.trainer.callback_metrics["loss"].detach().clone())
        torch.save(
            {"steps": steps, "shifted": shifted, "logged": logged},
            os.path.join(RECORD_DIR, f"rank{lightly_dist.rank()}.pt"),
        )

    lightly_train.TargetEmbedding.on_train_batch_end = recording_batch_end  # type: ignore[method-assign]
    lightly_train.TargetEmbedding.training_step = recording_step  # type: ignore[method-assign]
    loss_module.XCLRLoss.forward = recording_forward  # type: ignore[method-assign,assignment]
    lightly_dist.gather = recording_gather
    loss_module.gather_without_grad = recording_gather_targets


if __name__ == "__main__":
    with open(os.environ["XCLR_DDP_CAPTIONS"]) as handle:
        current["all_names"] = [line.split(",", 1)[0] for line in handle][1:]
    _install()
    main()
