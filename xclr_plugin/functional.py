"""Image-text X-CLR math: soft-target cross-entropy and the chunked loss (torch only).

The two-view core and the description helpers live in :mod:`xclr_plugin.loss`, which
stays importable with torch and lightly alone (it is proposed upstream to lightly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from xclr_plugin.loss import _softmax_, validate_chunk_size, validate_temperature


def soft_cross_entropy_dense(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``-(1/n) sum_i sum_j G_ij log softmax_j(l_ij)`` for finite logits, fused.

    Few passes over the ``n x m`` matrices: the backward forms ``softmax(l) - G`` in
    place from the saved log-probabilities. A NaN target gives a NaN loss.
    """
    loss: Tensor = _SoftCrossEntropy.apply(logits, target_probs)
    return loss


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, target: Tensor
    ) -> Tensor:
        log_probs = torch.log_softmax(logits, dim=1)
        # Row-wise <G_i, log P_i> without an n x m temporary.
        dots = torch.bmm(target.unsqueeze(1), log_probs.unsqueeze(2))
        ctx.save_for_backward(log_probs, target)
        return -dots.sum() / logits.shape[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor, None]:
        log_probs, target = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = log_probs.exp().sub_(target)
        return grad.mul_(grad_loss / log_probs.shape[0]), None


def xclr_clip_loss_chunked(
    image_rows: Tensor,
    text_rows: Tensor,
    image_cols: Tensor,
    text_cols: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    row_descriptions: Tensor | None,
    col_descriptions: Tensor | None,
    *,
    target_temperature: float,
    rank_offset: int,
    chunk_size: int,
    mm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Image-text X-CLR (``XCLR_SPEC.md`` section 2), ``chunk_size`` rows at a time.

    Rows (images, and texts for the other direction) are scored against all columns
    with logits ``s * rows cols^T + b``; row ``i``'s target is one-hot on column
    ``rank_offset + i`` without descriptions, else ``softmax_j(S_ij / tau_s)`` with
    ``S`` the cosine similarity of the (normalised) caption embeddings, or label
    equality. Returns ``1/2 [CE_soft(image rows) + CE_soft(text rows)]``, averaged over
    the rows. Memory: one ``chunk_size x m`` block at a time.

    ``mm_dtype`` (e.g. the autocast dtype): the matrix products run in it, as in
    ``ClipLoss`` under autocast; softmax, logits and sums stay in the dtype of
    ``image_rows``. None: every product in that dtype.
    """
    target_temperature = validate_temperature("target_temperature", target_temperature)
    chunk = validate_chunk_size(chunk_size)
    if chunk is None:
        raise ValueError("chunk_size must be a positive integer, got None.")
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.as_tensor(
            logit_scale, dtype=image_rows.dtype, device=image_rows.device
        )
    loss: Tensor = _XCLRClipChunked.apply(
        image_rows,
        text_rows,
        image_cols,
        text_cols,
        logit_scale,
        logit_bias,
        row_descriptions,
        col_descriptions,
        1.0 / target_temperature,
        rank_offset,
        chunk,
        mm_dtype,
    )
    return loss


class _XCLRClipChunked(torch.autograd.Function):
    """Soft-target CLIP loss and its gradients, block by block.

    Per row ``i``: ``CE_i = LSE_i - sum_j G_ij l_ij``. Its gradient is
    ``s (P - G) cols`` for the row, ``s (P - G)^T rows`` for the columns,
    ``sum_i <row_i, ((P - G) cols)_i>`` for the scale and exactly 0 for the bias (a
    softmax does not see a constant shift). All are accumulated as the blocks are
    visited, so the backward only multiplies them by the upstream gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        image_rows: Tensor,
        text_rows: Tensor,
        image_cols: Tensor,
        text_cols: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        row_desc: Tensor | None,
        col_desc: Tensor | None,
        inv_tau_s: float,
        offset: int,
        chunk: int,
        mm_dtype: torch.dtype | None,
    ) -> Tensor:
        n, m = image_rows.shape[0], image_cols.shape[0]
        dtype = image_rows.dtype
        low = mm_dtype if mm_dtype is not None and mm_dtype != dtype else None

        def mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
            # The products follow autocast (``low``); the result lands in ``out``.
            if low is None:
                return torch.mm(a, b, out=out)
            return out.copy_(torch.mm(a.to(low), b.to(low)))

        def add_mm(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
            if low is None:
                return acc.addmm_(a, b)
            return acc.add_(torch.mm(a.to(low), b.to(low)))

        chunk = min(chunk, n)
        # A one-element scale of any shape (open_clip uses 0-d) acts as a scalar.
        scale = logit_scale.detach().to(image_rows.dtype).reshape(())
        bias = 0.0 if logit_bias is None else float(logit_bias)
        logits_buf = image_rows.new_empty(chunk, m)
        weights_buf = image_rows.new_empty(chunk, m) if row_desc is not None else None
        total = image_rows.new_zeros(())
        grad_scale = image_rows.new_zeros(())
        grads = {}
        # Image rows against text columns, then text rows against image columns.
        for rows, cols, rows_key, cols_key in (
            (image_rows, text_cols, "image_rows", "text_cols"),
            (text_rows, image_cols, "text_rows", "image_cols"),
        ):
            grad_rows = torch.empty_like(rows)
            grad_cols = torch.zeros_like(cols)
            # Cast once per direction, not once per block.
            cols_mm = cols if low is None else cols.to(low)
            rows_mm = rows if low is None else rows.to(low)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                block = rows[start:stop]
                logits = mm(block, cols_mm.T, out=logits_buf[: stop - start])
                logits.mul_(scale).add_(bias)
                row_max = logits.amax(dim=1)
                # sum_j G_ij l_ij per row, read before the softmax overwrites the
                # logits: each row's loss is formed before rows are summed.
                if row_desc is None:
                    local = torch.arange(stop - start, device=rows.device)
                    own = local + (start + offset)
                    target_logit = logits[local, own]
                else:
                    assert col_desc is not None and weights_buf is not None
                    weights = _chunk_target(
                        row_desc[start:stop],
                        col_desc,
                        inv_tau_s,
                        weights_buf[: stop - start],
                        mm,
                    )
                    target_logit = (weights * logits).sum(dim=1)
                probs = _softmax_(logits)
                total += (row_max - torch.log(probs.amax(dim=1)) - target_logit).sum()
                # P - G, formed in full precision before the products: with bf16
                # products, P cols - G cols would lose the small difference.
                if row_desc is None:
                    probs[local, own] -= 1.0
                else:
                    probs.sub_(weights)
                # (P - G) cols, then the row, column and scale gradients from it.
                residual = mm(probs, cols_mm, out=grad_rows[start:stop])
                grad_scale += (block * residual).sum()
                add_mm(grad_cols, probs.T, rows_mm[start:stop])
            grads[rows_key] = grad_rows.mul_(scale)
            grads[cols_key] = grad_cols.mul_(scale)
        norm = 1.0 / (2 * n)
        ctx.grads = {k: v.mul_(norm) for k, v in grads.items()}  # type: ignore[attr-defined]
        grad_scale = (grad_scale * norm).to(logit_scale.dtype)
        ctx.grad_scale = grad_scale.reshape(logit_scale.shape)  # type: ignore[attr-defined]
        ctx.bias_like = None if logit_bias is None else torch.zeros_like(logit_bias)  # type: ignore[attr-defined]
        return total * norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads: dict[str, Tensor] = ctx.grads  # type: ignore[attr-defined]
        out = [
            grads[k] * grad_loss
            for k in ("image_rows", "text_rows", "image_cols", "text_cols")
        ]
        grad_scale: Tensor = ctx.grad_scale * grad_loss  # type: ignore[attr-defined]
        grad_bias: Tensor | None = ctx.bias_like  # type: ignore[attr-defined]
        return (*out, grad_scale, grad_bias, None, None, None, None, None, None)


def _chunk_target(
    row_desc: Tensor,
    col_desc: Tensor,
    inv_tau_s: float,
    out: Tensor,
    mm: Callable[..., Tensor] = torch.mm,
) -> Tensor:
    """``softmax_j(S_ij / tau_s)`` for a block of rows, written into ``out``."""
    if row_desc.is_floating_point():
        sim = mm(row_desc, col_desc.T, out=out)
    else:
        sim = out.copy_(row_desc[:, None] == col_desc[None, :])
    return _softmax_(sim.mul_(inv_tau_s))
