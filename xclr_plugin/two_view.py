"""Two-view X-CLR math: ``xclr_loss`` (``XCLRLoss``'s kernel), its fused, chunked
autograd Function, the similarity of descriptions and the helpers the fused Functions of
``functional`` share (plain-ops fallback, create_graph backward, in-place softmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from xclr_plugin.validation import validate_chunk_size, validate_temperature


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
