"""X-Sample Contrastive Loss (X-CLR), two-view form, in lightly's conventions."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist


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
            size=_validate_memory_bank_size(memory_bank_size),
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
        _validate_views(out0, out1)
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


def validate_temperature(name: str, value: object) -> float:
    """``value`` as a float if finite and > 0 with ``1 / value`` finite in float32."""
    # numbers.Real admits numpy scalars; bool is an int but never a temperature.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if 1.0 / float(value) > torch.finfo(torch.float32).max:
        raise ValueError(
            f"{name} must be a finite number > 0 whose inverse is finite in float32 "
            f"(>= {1.0 / torch.finfo(torch.float32).max:.3g}), got {value!r}."
        )
    return float(value)


def validate_chunk_size(chunk_size: int | None) -> int | None:
    """Returns ``chunk_size`` if it is None or an integer >= 1, else a ValueError."""
    if chunk_size is None:
        return None
    try:  # operator.index admits numpy integers and refuses floats and strings.
        size = 0 if isinstance(chunk_size, bool) else operator.index(chunk_size)
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(
            f"chunk_size must be a positive integer or None, got {chunk_size!r}."
        )
    return size


def similarity_from_targets(
    row_targets: Tensor, col_targets: Tensor | None = None
) -> Tensor:
    """Similarity ``S`` (no gradient) of rows and columns (default: the rows).

    Cosine for float embeddings ``(n, Dt)`` (float32, float64 for float64; a zero
    embedding is similar to nothing), ``1[y_i == y_j]`` (float32) for labels ``(n,)``.
    """
    with torch.no_grad():
        dtype = _compute_dtype(row_targets.dtype)
        rows, cols = _descriptions(row_targets, col_targets, dtype)
        if rows.is_floating_point():
            return rows @ cols.T
        return (rows[:, None] == cols[None, :]).to(torch.float32)


def xclr_loss(
    out0: Tensor,
    out1: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 0.1,
    target_temperature: float = 0.1,
    out0_all: Tensor | None = None,
    out1_all: Tensor | None = None,
    targets_all: Tensor | None = None,
    rank_offset: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """Two-view X-CLR loss on L2-normalised projections: the functional core.

    Rows are the local views ``[out0; out1]`` (``(n, D)`` each), columns all samples'
    views ``[out0_all; out1_all]`` (``(m, D)``, by default the local ones) with their
    descriptions ``targets_all``. Row ``a`` of local sample ``i`` is scored against
    every column but itself (column ``rank_offset + i`` of its own view). ``targets``:
    ``(n, Dt)`` float caption embeddings, ``(n,)`` integer labels, or None (NT-Xent);
    ``chunk_size``: samples per block (memory linear in the batch, same values).

    Returns:
        The mean over the ``2n`` local rows (so the mean over processes that each hold
        a slice of the columns is the global loss), in the dtype of ``out0``.
    """
    temperature = validate_temperature("temperature", temperature)
    target_temperature = validate_temperature("target_temperature", target_temperature)
    chunk_size = validate_chunk_size(chunk_size)
    cols0 = out0 if out0_all is None else out0_all
    cols1 = out1 if out1_all is None else out1_all
    row_desc = col_desc = None
    if targets is not None:
        row_desc, col_desc = _descriptions(targets, targets_all, out0.dtype)
    args = (out0, out1, cols0, cols1, row_desc, col_desc)
    scales = (1.0 / temperature, 1.0 / target_temperature, rank_offset)
    if needs_plain_ops():
        return _xclr_loss_dense(*args, *scales)
    chunk = out0.shape[0] if chunk_size is None else chunk_size
    loss: Tensor = _XCLRTwoView.apply(*args, *scales, chunk, out0_all is not None)
    return loss


def _xclr_loss_dense(
    z0: Tensor,
    z1: Tensor,
    c0: Tensor,
    c1: Tensor,
    row_desc: Tensor | None,
    col_desc: Tensor | None,
    inv_tau: float,
    inv_tau_s: float,
    offset: int,
) -> Tensor:
    """``_XCLRTwoView``'s loss in plain ops (2n x 2m): for torch.func and create_graph."""
    n, m = z0.shape[0], c0.shape[0]
    own = torch.arange(n, device=z0.device) + offset
    is_self = F.one_hot(torch.cat([own, own + m]), 2 * m).bool()
    is_other = is_self.roll(m, dims=1)  # the other view of the same sample
    logits = torch.cat([z0, z1]) @ torch.cat([c0, c1]).T * inv_tau
    log_probs = torch.log_softmax(logits.masked_fill(is_self, -math.inf), dim=1)
    if row_desc is None or col_desc is None:
        target_probs = is_other.to(log_probs.dtype)
    else:
        sim = similarity_from_targets(row_desc, col_desc).to(log_probs.dtype)
        sim = sim.repeat(2, 2).masked_fill(is_other, 1.0) * inv_tau_s
        target_probs = torch.softmax(sim.masked_fill(is_self, -math.inf), dim=1)
    return -(target_probs * log_probs.masked_fill(is_self, 0.0)).sum() / (2 * n)


def needs_plain_ops() -> bool:
    """Whether torch.func or forward-mode AD runs: the fused Functions support neither."""
    forward_ad = torch.autograd.forward_ad._current_level >= 0  # in a dual_level
    return forward_ad or bool(torch._C._are_functorch_transforms_active())


def differentiable_grads(
    ctx: torch.autograd.function.FunctionCtx,
    grad_loss: Tensor,
    loss_fn: Callable[..., Tensor],
    *args: object,
) -> tuple[Tensor | None, ...]:
    """A fused Function's backward under ``create_graph=True``: the gradients, with a
    graph, of the plain ``loss_fn(*ctx.saved_tensors, *args)`` (the fused ones are
    constants: second derivatives would silently lose terms).
    """
    needs, saved = ctx.needs_input_grad, ctx.saved_tensors  # type: ignore[attr-defined]
    # A view per input: a tensor passed twice (rows and columns) gets each slot's part.
    inputs = [t.view_as(t) if need else t for t, need in zip(saved, needs)]  # noqa: B905
    wanted = [t for t, need in zip(inputs, needs) if need]  # noqa: B905
    loss = loss_fn(*inputs, *args)
    grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _descriptions(
    targets: Tensor, targets_all: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Detached row and column descriptions, caption embeddings normalised."""
    rows = targets.detach()
    cols = rows if targets_all is None else targets_all.detach()
    if not rows.is_floating_point():
        return rows, cols
    rows = F.normalize(rows.to(dtype), dim=1)
    return rows, rows if targets_all is None else F.normalize(cols.to(dtype), dim=1)


def _target_weights(
    row_desc: Tensor,
    col_desc: Tensor,
    inv_tau_s: float,
    own: tuple[Tensor, Tensor],
    out: Tensor,
) -> Tensor:
    """Per-sample target weights ``W`` of the rows ``row_desc``, written into ``out``.

    Row ``a`` (either view of local sample ``i``) puts ``G_ab = W[i, j]`` on both views
    of column sample ``j`` except on itself (column ``own[1][i]``). Normalising over the
    ``2m - 1`` candidates gives ``W_ij = E_ij / (2 sum_j E_ij - E_i,own)`` with
    ``E = exp((S - max S) / tau_s)`` and ``S_i,own = 1``, so the ``2n x 2m`` target
    matrix never exists.
    """
    if row_desc.is_floating_point():
        weights = torch.mm(row_desc, col_desc.T, out=out)
    else:
        weights = out.copy_(row_desc[:, None] == col_desc[None, :])
    weights[own] = 1.0
    weights.mul_(inv_tau_s)
    weights.sub_(weights.amax(dim=1, keepdim=True)).exp_()
    norm = 2.0 * weights.sum(dim=1) - weights[own]
    return weights.div_(norm[:, None])


class _XCLRTwoView(torch.autograd.Function):
    """Loss of two-view X-CLR and its gradient, block by block.

    With ``P`` the softmax of the masked logits and ``sum_b G_ab = 1``, the loss is
    ``(1/2n) [sum_a LSE_a - sum_ab G_ab l_ab]``. Because ``G`` repeats ``W`` in each
    view block, the second sum is
    ``tau^-1 [<s, W s_all> - sum_i W_i,own (z0_i.z0_own + z1_i.z1_own)]`` with
    ``s = z0 + z1``: ``n x m x D`` products, never a second ``2n x 2m`` pass.

    The loss is a scalar, so its gradient is known up to the upstream factor as soon as
    a block's ``P`` exists: ``tau^-1 (P - G) cols`` for the rows and
    ``tau^-1 (P - G)^T rows`` for the columns. The forward accumulates these per block
    of ``chunk`` samples and keeps only them (linear in the batch); the backward scales
    them. The peak memory is one ``2 chunk x 2m`` block. Under ``create_graph=True``
    the backward differentiates :func:`_xclr_loss_dense` instead (dense memory).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z0: Tensor,
        z1: Tensor,
        c0: Tensor,
        c1: Tensor,
        row_desc: Tensor | None,
        col_desc: Tensor | None,
        inv_tau: float,
        inv_tau_s: float,
        offset: int,
        chunk: int,
        gathered: bool,
    ) -> Tensor:
        ctx.save_for_backward(z0, z1, c0, c1)
        ctx.args = (row_desc, col_desc, inv_tau, inv_tau_s, offset, gathered)  # type: ignore[attr-defined]
        n, m = z0.shape[0], c0.shape[0]
        chunk = min(chunk, n)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        want_rows, want_cols = needs[0] or needs[1], needs[2] or needs[3]
        # View-0 rows see the columns as [view 0; view 1], view-1 rows as [view 1;
        # view 0]: each row then meets its own view first, so swapping out0 and out1
        # gives bitwise the same rows and, summed in pairs, the same loss (lightly's
        # symmetry tests compare the two to 1e-6 in float32).
        cols, cols_sw = torch.cat([c0, c1]), torch.cat([c1, c0])
        cols_scaled, cols_sw_scaled = cols * inv_tau, cols_sw * inv_tau
        s_cols = c0 + c1 if row_desc is not None else None
        grad_rows = z0.new_empty(2 * n, z0.shape[1]) if want_rows else None
        grad_cols = torch.zeros_like(cols) if want_cols else None
        # One block buffer reused by every chunk: no per-chunk allocation or page faults.
        logits_buf = z0.new_empty(2 * chunk, 2 * m)
        weights_buf = z0.new_empty(chunk, m) if row_desc is not None else None
        total = z0.new_zeros(())
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            c = stop - start
            local = torch.arange(c, device=z0.device)
            own_col = local + (start + offset)
            z0c, z1c = z0[start:stop], z1[start:stop]
            own0, own1 = c0[own_col], c1[own_col]
            logits = logits_buf[: 2 * c]
            torch.mm(z0c, cols_scaled.T, out=logits[:c])
            torch.mm(z1c, cols_sw_scaled.T, out=logits[c:])
            # A view is not its own candidate: -inf gives it probability exactly 0.
            logits[local, own_col] = -math.inf
            logits[local + c, own_col] = -math.inf
            row_max = logits.amax(dim=1)
            if row_desc is None:
                # The positive logits, read before the softmax overwrites them: each
                # row's loss is then formed before rows are summed (no cancellation
                # between large sums), and a lone candidate gives exactly 0 (B = 1).
                target_logits = torch.cat(
                    [logits[local, own_col + m], logits[local + c, own_col + m]]
                )
            probs = _softmax_(logits)
            # LSE = max_b l_ab - log max_b P_ab: softmax keeps the argmax and the largest
            # probability is >= 1 / (2m - 1), so the log never sees 0.
            row_lse = row_max - torch.log(probs.amax(dim=1))
            if grad_rows is not None:
                torch.mm(probs[:c], cols, out=grad_rows[start:stop])
                torch.mm(probs[c:], cols_sw, out=grad_rows[n + start : n + stop])
            if grad_cols is not None:
                grad_cols.addmm_(probs[:c].T, z0c)
                grad_cols[:m].addmm_(probs[c:, m:].T, z1c)
                grad_cols[m:].addmm_(probs[c:, :m].T, z1c)
            if row_desc is None:
                # Identity graph: all target mass on the other view of the same sample.
                row_loss = row_lse - target_logits
                total += (row_loss[:c] + row_loss[c:]).sum()
                if grad_rows is not None:
                    grad_rows[start:stop] -= own1
                    grad_rows[n + start : n + stop] -= own0
                if grad_cols is not None:
                    grad_cols[own_col] -= z1c
                    grad_cols[own_col + m] -= z0c
                continue
            assert (
                col_desc is not None and s_cols is not None and weights_buf is not None
            )
            weights = _target_weights(
                row_desc[start:stop],
                col_desc,
                inv_tau_s,
                (local, own_col),
                weights_buf[:c],
            )
            w_own = weights[local, own_col][:, None]
            weighted_cols = weights @ s_cols
            s_rows = z0c + z1c
            # sum_b G_ab l_ab per row: view-0 rows, then view-1 rows.
            target_logits = torch.cat(
                [
                    (z0c * weighted_cols).sum(1) - w_own[:, 0] * (z0c * own0).sum(1),
                    (z1c * weighted_cols).sum(1) - w_own[:, 0] * (z1c * own1).sum(1),
                ]
            )
            row_loss = row_lse - inv_tau * target_logits
            total += (row_loss[:c] + row_loss[c:]).sum()
            if grad_rows is not None:
                grad_rows[start:stop] -= weighted_cols - w_own * own0
                grad_rows[n + start : n + stop] -= weighted_cols - w_own * own1
            if grad_cols is not None:
                weighted_rows = weights.T @ s_rows
                grad_cols[:m] -= weighted_rows
                grad_cols[m:] -= weighted_rows
                grad_cols[own_col] += w_own * z0c
                grad_cols[own_col + m] += w_own * z1c
        scale = inv_tau / (2 * n)
        # Intermediates, not inputs or outputs: kept on ctx, not save_for_backward.
        ctx.grad_rows = None if grad_rows is None else grad_rows.mul_(scale)  # type: ignore[attr-defined]
        ctx.grad_cols = None if grad_cols is None else grad_cols.mul_(scale)  # type: ignore[attr-defined]
        return total / (2 * n)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        *scales, gathered = ctx.args  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: second derivatives wanted
            if gathered:
                raise RuntimeError(
                    "XCLRLoss with gathered columns (gather_distributed=True, or "
                    "out0_all/out1_all) supports one backward only: lightly's gather "
                    "passes no second derivatives between processes. Use "
                    "create_graph=True (double backward, gradient penalties) in a "
                    "single process or without gather_distributed."
                )
            return differentiable_grads(ctx, grad_loss, _xclr_loss_dense, *scales)
        grads: list[Tensor | None] = []
        for acc in (ctx.grad_rows, ctx.grad_cols):  # type: ignore[attr-defined]
            # Both views' halves (rows: z0, z1; columns: c0, c1), or no gradient.
            halves = [None, None] if acc is None else list(acc.chunk(2))
            grads += [None if h is None else h * grad_loss for h in halves]
        return (*grads, None, None, None, None, None, None, None)


def _softmax_(logits: Tensor) -> Tensor:
    """Row softmax written over ``logits``: the big buffer is allocated once, not twice."""
    return torch.ops.aten._softmax.out(logits, 1, False, out=logits)  # type: ignore[no-any-return]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_batch_size(batch_size: int, device: torch.device, what: str) -> None:
    """A ValueError on every process if their batch sizes differ (gloo would abort)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # no process group (a faked gather in tests): nothing to compare
    own = torch.full((1,), batch_size, dtype=torch.long, device=device)
    sizes = [torch.empty_like(own) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, own)
    found = [int(s) for s in sizes]
    if len(set(found)) > 1:
        raise ValueError(
            f"{what} needs the same batch size on every process, got {found} (by rank)."
            " Drop the last, smaller batch (DataLoader(..., drop_last=True))."
        )


def gather_without_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` (descriptions) from all processes, without gradient."""
    if dist.world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size())]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def _validate_memory_bank_size(size: object) -> int | tuple[int, int]:
    """``size`` as 0 or a ``(num_entries, dim)`` pair of integers: TypeError for
    other types, ValueError for a bare positive integer (no feature dimension, as in
    ``MemoryBankModule``) or negative entries.
    """
    expected = "0 (no memory bank) or a (num_entries, dim) pair such as (4096, 128)"
    if isinstance(size, (str, bytes)) or not isinstance(size, (int, Sequence)):
        raise TypeError(
            f"memory_bank_size must be {expected}, got {size!r} "
            f"({type(size).__name__})."
        )
    if isinstance(size, int):
        if isinstance(size, bool) or size != 0:
            raise ValueError(
                f"memory_bank_size={size!r} does not specify the feature dimension. "
                f"Set it with memory_bank_size=({int(size)}, dim), or pass "
                "memory_bank_size=0 to disable the memory bank."
            )
        return 0
    try:  # operator.index admits numpy integers and refuses floats and strings.
        pair = tuple(operator.index(x) for x in size if not isinstance(x, (bool, str)))
    except TypeError:
        pair = ()
    if len(pair) != 2 or len(size) != 2:
        raise TypeError(f"memory_bank_size must be {expected}, got {size!r}.")
    if min(pair) < 0:
        raise ValueError(
            f"memory_bank_size entries must be non-negative, got {size!r}."
        )
    return pair[0], pair[1]


def _validate_views(out0: Tensor, out1: Tensor) -> None:
    for name, out in (("out0", out0), ("out1", out1)):
        if not isinstance(out, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor, got {type(out).__name__}."
            )
        if out.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (batch_size, dim), got shape {tuple(out.shape)}."
            )
        if not out.is_floating_point():
            raise ValueError(
                f"{name} must have a floating point dtype, got {out.dtype}."
            )
    if out0.dtype != out1.dtype and torch.float64 in (out0.dtype, out1.dtype):
        raise ValueError(  # as NTXentLoss; computed in either precision it is wrong
            f"out0 and out1 must have the same dtype, got {out0.dtype} and "
            f"{out1.dtype}. Cast one of them."
        )
    if out0.shape != out1.shape:
        raise ValueError(
            f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and "
            f"{tuple(out1.shape)}."
        )
    if out0.device != out1.device:
        raise ValueError(
            f"out0 and out1 must be on the same device, got {out0.device} and {out1.device}."
        )
    if out0.shape[0] < 1 or out0.shape[1] < 1:
        raise ValueError(
            "out0 and out1 need at least 1 sample and 1 feature, got shape "
            f"{tuple(out0.shape)}."
        )


def validate_targets(targets: object, like: Tensor, name: str = "out0") -> None:
    """Checks that ``targets`` are caption embeddings or class labels of a batch.

    Caption embeddings are ``(batch_size, text_dim)`` floats with ``text_dim >= 2``
    (the cosine similarity of 1-D embeddings is only ``+-1``); labels are
    ``(batch_size,)`` integers. Both on the device of ``like`` (named ``name``), whose
    first dimension is the batch size.

    Raises:
        ValueError: Naming the expected and the received type, shape, dtype or device.
    """
    if not isinstance(targets, Tensor):
        raise ValueError(
            f"targets must be a torch.Tensor or None, got {type(targets).__name__}."
        )
    shape = tuple(targets.shape)
    if targets.ndim not in (1, 2):
        raise ValueError(
            "targets must be caption embeddings (batch_size, text_dim) or labels "
            f"(batch_size,), got shape {shape}."
        )
    if targets.shape[0] != like.shape[0]:
        raise ValueError(
            f"targets must have batch size {like.shape[0]} like {name}, got shape "
            f"{shape}."
        )
    if targets.ndim == 1 and (
        targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        raise ValueError(
            f"1-D targets are class labels and must have an integer dtype, got {targets.dtype}. "
            "Pass caption embeddings as a 2-D (batch_size, text_dim) float tensor."
        )
    if targets.ndim == 2 and not targets.is_floating_point():
        hint = " For class labels pass a 1-D tensor: targets.squeeze(1)."
        raise ValueError(
            f"2-D targets are caption embeddings and must be floating point, got "
            f"{targets.dtype}.{hint if shape[1] == 1 else ''}"
        )
    if targets.ndim == 2 and shape[1] < 2:
        raise ValueError(
            f"Caption embeddings need text_dim >= 2, got targets of shape {shape}: "
            "the cosine similarity of 1-D embeddings is only -1, 0 or +1. If these are "
            "class labels, pass them as a 1-D integer tensor: targets.squeeze(1).long()."
        )
    if targets.device != like.device:
        raise ValueError(
            f"targets must be on the device of {name} ({like.device}), got {targets.device}."
        )
