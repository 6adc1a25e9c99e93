"""X-Sample Contrastive Loss (X-CLR), two-view form, in lightly's conventions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor, nn

from xclr_plugin.distributed import check_same_batch_size, gather_without_grad
from xclr_plugin.two_view import _compute_dtype, similarity_from_targets, xclr_loss
from xclr_plugin.validation import (
    validate_chunk_size,
    validate_memory_bank_size,
    validate_targets,
    validate_temperature,
    validate_views,
)


class XCLRLoss(nn.Module):
    """X-Sample Contrastive Loss: contrastive learning with soft cross-sample targets.

    Every other sample in the batch is a soft positive, weighted by how similar the two
    samples' descriptions are (caption embeddings of a frozen text encoder, or class
    labels). For view ``a`` of sample ``i`` and every candidate view ``b != a``:

    - logits ``l_ab = <z_a, z_b> / temperature`` (projections L2-normalised),
    - targets ``G_ab = softmax_{b != a}(S_{i(a) i(b)} / target_temperature)``,
    - loss ``-(1 / 2B) sum_a sum_{b != a} G_ab log softmax_{b != a}(l_ab)``,

    where ``S`` is the cosine similarity of caption embeddings, or ``1[y_i == y_j]`` for
    labels, and ``S_ii = 1``. Without targets ``G`` is one-hot on the other view and the
    loss equals :class:`lightly.loss.NTXentLoss`; with labels and a small
    ``target_temperature`` it approaches the supervised contrastive loss (SupCon).

    The target matrix is never materialised and at most one ``2B x 2B`` buffer exists,
    so the loss costs less than NT-Xent. It is computed in float32 (float64 for float64
    inputs), also under ``torch.autocast``. Second derivatives (``create_graph=True``)
    and ``torch.func`` transforms run a plain-autograd copy (``2B x 2B`` memory).

    - [0] X-CLR, 2025, https://arxiv.org/abs/2407.18134
    - [1] SimCLR, 2020, https://arxiv.org/abs/2002.05709
    - [2] SupCon, 2020, https://arxiv.org/abs/2004.11362

    Attributes:
        temperature: Logit temperature ``tau``: finite, > 0, ``1 / tau`` finite in
            float32.
        target_temperature: Temperature ``tau_s`` of the targets; same rule.
        memory_bank_size: ``(num_entries, dim)`` to score ``out0`` against ``out1`` and a
            MoCo-style bank of earlier ``out1`` (as ``NTXentLoss``), or 0. The bank
            stores each entry's description next to its embedding.
        gather_distributed: If True, embeddings (with gradient) and targets (without)
            are gathered from all processes. Without a process group (or with one
            process) this is the single-process loss, as in ``NTXentLoss``.
        chunk_size: If set, the loss and its gradient are computed for this many
            samples at a time: memory linear in the batch (``2 * chunk_size x 2B``
            floats), same values and gradients. None does the whole batch at once.

    Raises:
        ValueError: For a bad temperature, ``memory_bank_size`` or ``chunk_size``, or
            ``gather_distributed`` without ``torch.distributed``.
        TypeError: If ``memory_bank_size`` is neither an integer nor a pair.

    Examples:
        >>> loss_fn = XCLRLoss(temperature=0.1, target_temperature=0.1)
        >>> out0, out1 = model(view0), model(view1)  # (B, D) each
        >>> captions = text_encoder(batch_captions)  # (B, Dt), frozen
        >>> loss = loss_fn(out0, out1, captions)
        >>> loss = loss_fn(out0, out1, labels=labels)  # (B,) int: SupCon-like
        >>> loss = loss_fn(out0, out1)  # identity graph: NT-Xent
    """

    def __init__(
        self,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.chunk_size = validate_chunk_size(chunk_size)
        self.temperature = validate_temperature("temperature", temperature)
        self.target_temperature = validate_temperature(
            "target_temperature", target_temperature
        )
        self.gather_distributed = gather_distributed
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch version with "
                "distributed support."
            )
        self.memory_bank = MemoryBankModule(
            size=validate_memory_bank_size(memory_bank_size),
            gather_distributed=gather_distributed,
        )
        # Descriptions of the bank entries, allocated on the first batch with targets
        # (their kind and width are unknown until then). Entries never filled with a
        # description are unrelated to everything: zero target weight.
        self.bank_descriptions: Tensor | None
        self.bank_description_valid: Tensor | None
        self.register_buffer("bank_descriptions", None, persistent=False)
        self.register_buffer("bank_description_valid", None, persistent=False)

    def forward(
        self,
        out0: Tensor,
        out1: Tensor,
        targets: Tensor | None = None,
        *,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss of a batch.

        Args:
            out0: Projections of the first views. Shape: (batch_size, dim).
            out1: Projections of the second views. Shape: (batch_size, dim).
            targets: Caption embeddings (batch_size, text_dim), float, text_dim >= 2;
                class labels (batch_size,), integer; or None for the identity graph.
            labels: Another name for integer class labels ``targets``.

        Returns:
            The mean loss over the ``2 * batch_size`` views, a scalar.

        Raises:
            ValueError: For inputs of the wrong shape, dtype or device, or both
                ``targets`` and ``labels``.
        """
        if labels is not None:
            if targets is not None:
                raise ValueError(
                    "Pass the sample descriptions as targets or as labels, not both."
                )
            targets = labels
        validate_views(out0, out1)
        if targets is not None:
            validate_targets(targets, out0)
        # Without a process group (or with one process) gathering is a no-op, as in
        # NTXentLoss: a multi-GPU config also runs on one device.
        gather = self.gather_distributed and dist.world_size() > 1
        if gather:
            check_same_batch_size(out0.shape[0], out0.device, "gather_distributed")
        dtype = _compute_dtype(out0.dtype)
        with torch.autocast(device_type=out0.device.type, enabled=False):
            out0 = F.normalize(out0.to(dtype), dim=1)
            out1 = F.normalize(out1.to(dtype), dim=1)
            if self.memory_bank.size[0] > 0:
                if self.memory_bank.size[1] != out1.shape[1]:
                    raise ValueError(
                        f"memory_bank_size={tuple(self.memory_bank.size)} does not match "
                        f"the embedding dimension of out0/out1, {out1.shape[1]}."
                    )
                return self._forward_memory_bank(out0, out1, targets)
            out0_all = out1_all = targets_all = None
            rank_offset = 0
            if gather:
                out0_all = torch.cat(dist.gather(out0), dim=0)
                out1_all = torch.cat(dist.gather(out1), dim=0)
                if targets is not None:
                    targets_all = gather_without_grad(targets)
                rank_offset = dist.rank() * out0.shape[0]
            return xclr_loss(
                out0,
                out1,
                targets,
                temperature=self.temperature,
                target_temperature=self.target_temperature,
                out0_all=out0_all,
                out1_all=out1_all,
                targets_all=targets_all,
                rank_offset=rank_offset,
                chunk_size=self.chunk_size,
            )

    def _forward_memory_bank(
        self, out0: Tensor, out1: Tensor, targets: Tensor | None
    ) -> Tensor:
        """Anchors ``out0`` against ``[out1_i; bank]``, as ``NTXentLoss`` with a bank."""
        update = out0.requires_grad
        if update and targets is not None and targets.is_floating_point():
            bad = (~torch.isfinite(targets).all(dim=1)).nonzero()
            if len(bad):
                raise ValueError(
                    f"targets row {int(bad[0])} (of {len(targets)}) is NaN or infinite; "
                    "the memory bank would keep it and make the losses of the next "
                    "batches NaN too. Fix or drop that caption embedding."
                )
        ptr = int(self.memory_bank.bank_ptr)
        out1, bank = self.memory_bank(out1, update=update)
        assert bank is not None  # the bank is enabled
        bank = bank.to(device=out0.device, dtype=out0.dtype)  # (dim, num_entries)
        logits = torch.cat([(out0 * out1).sum(1, keepdim=True), out0 @ bank], dim=1)
        logits = logits / self.temperature
        if targets is None:
            if self.bank_descriptions is not None:
                raise ValueError(
                    "targets is None but earlier batches stored descriptions in the "
                    "memory bank; pass targets for every batch or for none."
                )
            return F.cross_entropy(
                logits, torch.zeros_like(logits[:, 0], dtype=torch.long)
            )
        descriptions, valid = self._bank_descriptions_for(targets)
        own = torch.ones_like(logits[:, :1])
        if targets.is_floating_point():
            # S_ii = 1, made NaN by a non-finite caption (NaN in, NaN out) even when
            # no bank entry is valid yet and the target is one-hot.
            own = own + 0.0 * targets.detach().sum(dim=1, keepdim=True).to(own)
        similarity = torch.cat(
            [own, similarity_from_targets(targets, descriptions).to(logits.dtype)],
            dim=1,
        )
        mask = torch.cat([torch.zeros_like(valid[:1]), ~valid])[None, :].expand_as(
            similarity
        )
        target_probs = torch.softmax(
            (similarity / self.target_temperature).masked_fill(mask, -math.inf), dim=1
        )
        log_probs = torch.log_softmax(logits, dim=1)
        # Exactly-zero targets (empty bank slots) contribute 0, never 0 * -inf; a NaN
        # target stays NaN (NaN in, NaN out).
        loss = (
            -torch.where(target_probs == 0, 0.0, target_probs * log_probs).sum(1).mean()
        )
        if update:
            self._enqueue_descriptions(targets, ptr)
        return loss

    def _bank_descriptions_for(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Returns a snapshot of the bank's descriptions, allocating them on first use."""
        size = self.memory_bank.size[0]
        floating = targets.is_floating_point()
        if self.bank_descriptions is None or self.bank_description_valid is None:
            # Float descriptions follow the embedding bank's dtype (float64 after .double()).
            dtype = self.memory_bank.bank.dtype if floating else torch.long
            shape = (size, *targets.shape[1:])
            self.bank_descriptions = targets.new_zeros(shape, dtype=dtype)
            self.bank_description_valid = targets.new_zeros(size, dtype=torch.bool)
        stored, valid = self.bank_descriptions, self.bank_description_valid
        if stored.is_floating_point() != floating or (
            stored.shape[1:] != targets.shape[1:]
        ):
            raise ValueError(
                "targets must be of the same kind as those stored in the memory bank: "
                f"bank holds {tuple(stored.shape[1:]) or 'labels'} "
                f"({stored.dtype}), got targets of shape {tuple(targets.shape)} "
                f"({targets.dtype})."
            )
        return stored.clone().to(targets.device), valid.clone().to(targets.device)

    @torch.no_grad()
    def _enqueue_descriptions(self, targets: Tensor, ptr: int) -> None:
        """Writes ``targets`` where ``MemoryBankModule`` wrote the matching embeddings."""
        stored, valid = self.bank_descriptions, self.bank_description_valid
        assert stored is not None and valid is not None
        if self.gather_distributed and dist.world_size() > 1:
            targets = gather_without_grad(targets)
        # Same wrap-around rule as MemoryBankModule._dequeue_and_enqueue.
        end = min(self.memory_bank.size[0], ptr + targets.shape[0])
        stored[ptr:end] = targets[: end - ptr].to(stored)
        valid[ptr:end] = True
