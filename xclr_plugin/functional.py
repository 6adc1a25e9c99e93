"""Image-text X-CLR math: fused soft-target cross-entropy and the chunked loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xclr_plugin.two_view import _softmax_, differentiable_grads, needs_plain_ops
from xclr_plugin.validation import validate_chunk_size, validate_temperature


def soft_cross_entropy_dense(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``-(1/n) sum_i sum_j G_ij log softmax_j(l_ij)`` for finite logits, fused.

    The backward forms ``softmax(l) - G`` in place. A NaN target gives a NaN loss.
    """
    if needs_plain_ops():
        return _soft_cross_entropy(logits, target_probs)
    loss: Tensor = _SoftCrossEntropy.apply(logits, target_probs)
    return loss


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The loss of ``_SoftCrossEntropy`` in plain torch ops (torch.func, create_graph)."""
    return -(target * torch.log_softmax(logits, dim=1)).sum() / logits.shape[0]


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, target: Tensor
    ) -> Tensor:
        log_probs = torch.log_softmax(logits, dim=1)
        # Row-wise <G_i, log P_i> without an n x m temporary.
        dots = torch.bmm(target.unsqueeze(1), log_probs.unsqueeze(2))
        ctx.save_for_backward(logits, target)
        return -dots.sum() / logits.shape[0]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: second derivatives wanted
            return differentiable_grads(ctx, grad_loss, _soft_cross_entropy)
        logits, target = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = torch.softmax(logits, dim=1).sub_(target)
        return grad.mul_(grad_loss / logits.shape[0]), None


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

    Logits ``s * rows cols^T + b``; row ``i``'s target is one-hot on column
    ``rank_offset + i`` without descriptions, else ``softmax_j(S_ij / tau_s)``. Returns
    ``1/2 [CE_soft(image rows) + CE_soft(text rows)]``, averaged over the rows. Matrix
    products run in ``mm_dtype`` if given (autocast); the rest in ``image_rows``' dtype.
    """
    target_temperature = validate_temperature("target_temperature", target_temperature)
    chunk = validate_chunk_size(chunk_size)
    if chunk is None:
        raise ValueError("chunk_size must be a positive integer, got None.")
    dtype, device = image_rows.dtype, image_rows.device
    if not isinstance(logit_scale, Tensor):  # numbers become tensors
        logit_scale = torch.as_tensor(logit_scale, dtype=dtype, device=device)
    if logit_bias is not None and not isinstance(logit_bias, Tensor):
        logit_bias = torch.as_tensor(logit_bias, dtype=dtype, device=device)
    args = (image_rows, text_rows, image_cols, text_cols, logit_scale, logit_bias)
    rest = (row_descriptions, col_descriptions, 1.0 / target_temperature)
    if needs_plain_ops():
        return _xclr_clip_loss_dense(*args, *rest, rank_offset, mm_dtype)
    loss: Tensor = _XCLRClipChunked.apply(*args, *rest, rank_offset, mm_dtype, chunk)
    return loss


def _xclr_clip_loss_dense(
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
    mm_dtype: torch.dtype | None,
) -> Tensor:
    """The loss of ``_XCLRClipChunked`` in plain torch ops, with ``n x m`` matrices:
    the one torch.func transforms and second derivatives (``create_graph``) use."""
    dtype, n = image_rows.dtype, image_rows.shape[0]

    def mm(a: Tensor, b: Tensor) -> Tensor:  # products in mm_dtype, as the fused ones
        low = dtype if mm_dtype is None else mm_dtype
        return (a.to(low) @ b.to(low).T).to(dtype)

    if row_desc is None or col_desc is None:
        own = torch.arange(n, device=image_rows.device) + offset
        target = F.one_hot(own, image_cols.shape[0]).to(dtype)
    elif row_desc.is_floating_point():
        target = torch.softmax(mm(row_desc, col_desc) * inv_tau_s, dim=1)
    else:
        same = (row_desc[:, None] == col_desc[None, :]).to(dtype)
        target = torch.softmax(same * inv_tau_s, dim=1)
    scale = logit_scale.to(dtype).reshape(())
    bias = 0.0 if logit_bias is None else logit_bias.to(dtype).reshape(())
    image_logits = scale * mm(image_rows, text_cols) + bias
    text_logits = scale * mm(text_rows, image_cols) + bias
    loss = _soft_cross_entropy(image_logits, target)
    return (loss + _soft_cross_entropy(text_logits, target)) / 2


class _XCLRClipChunked(torch.autograd.Function):
    """Soft-target CLIP loss and its gradients, block by block.

    ``CE_i = LSE_i - sum_j G_ij l_ij``; gradients ``s (P - G) cols`` (rows), ``s (P -
    G)^T rows`` (cols), ``sum_i <row_i, ((P - G) cols)_i>`` (scale), 0 (bias), summed in
    the forward so that the backward only scales them by the upstream gradient.
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
        mm_dtype: torch.dtype | None,
        chunk: int,
    ) -> Tensor:
        rows_cols = (image_rows, text_rows, image_cols, text_cols)
        ctx.save_for_backward(*rows_cols, logit_scale, logit_bias)  # type: ignore[arg-type]
        ctx.args = (row_desc, col_desc, inv_tau_s, offset, mm_dtype)  # type: ignore[attr-defined]
        n, m = image_rows.shape[0], image_cols.shape[0]
        # The products follow autocast (``low``); results land in full precision.
        low = mm_dtype if mm_dtype not in (None, image_rows.dtype) else None

        def mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
            if low is None:
                return torch.mm(a, b, out=out)
            return out.copy_(torch.mm(a.to(low), b.to(low)))

        chunk = min(chunk, n)
        # A one-element scale of any shape (open_clip uses 0-d) acts as a scalar.
        scale = logit_scale.detach().to(image_rows.dtype).reshape(())
        bias = 0.0 if logit_bias is None else float(logit_bias)
        logits_buf = image_rows.new_empty(chunk, m)
        weights_buf = image_rows.new_empty(chunk, m) if row_desc is not None else None
        total = image_rows.new_zeros(())
        grad_scale = image_rows.new_zeros(())
        grads: dict[int, Tensor] = {}  # by position: image/text rows, image/text cols
        # Image rows against text columns, then text rows against image columns.
        for rows, cols, i_rows, i_cols in (
            (image_rows, text_cols, 0, 3),
            (text_rows, image_cols, 1, 2),
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
                    # G = softmax_j(S_ij / tau_s) for the block.
                    block_desc, out = row_desc[start:stop], weights_buf[: stop - start]
                    if block_desc.is_floating_point():
                        sim = mm(block_desc, col_desc.T, out=out)
                    else:
                        sim = out.copy_(block_desc[:, None] == col_desc[None, :])
                    weights = _softmax_(sim.mul_(inv_tau_s))
                    target_logit = (weights * logits).sum(dim=1)
                probs = _softmax_(logits)
                total += (row_max - torch.log(probs.amax(dim=1)) - target_logit).sum()
                # P - G, formed in full precision before the products: with bf16
                # products, P cols - G cols would lose the small difference.
                if row_desc is None:
                    probs[local, own] -= 1.0
                else:
                    probs.sub_(weights)
                residual = mm(probs, cols_mm, out=grad_rows[start:stop])
                grad_scale += (block * residual).sum()
                if low is None:
                    grad_cols.addmm_(probs.T, rows_mm[start:stop])
                else:
                    grad_cols.add_(torch.mm(probs.T.to(low), rows_mm[start:stop]))
            grads[i_rows] = grad_rows.mul_(scale)
            grads[i_cols] = grad_cols.mul_(scale)
        norm = 1.0 / (2 * n)
        ctx.grads = [grads[i].mul_(norm) for i in range(4)]  # type: ignore[attr-defined]
        grad_scale = (grad_scale * norm).to(logit_scale.dtype)
        ctx.grad_scale = grad_scale.reshape(logit_scale.shape)  # type: ignore[attr-defined]
        ctx.bias_like = None if logit_bias is None else torch.zeros_like(logit_bias)  # type: ignore[attr-defined]
        return total * norm

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: second derivatives wanted
            loss_fn = _xclr_clip_loss_dense
            return differentiable_grads(ctx, grad_loss, loss_fn, *ctx.args)  # type: ignore[attr-defined]
        out = [g * grad_loss for g in ctx.grads]  # type: ignore[attr-defined]
        grad_scale: Tensor = ctx.grad_scale * grad_loss  # type: ignore[attr-defined]
        grad_bias: Tensor | None = ctx.bias_like  # type: ignore[attr-defined]
        return (*out, grad_scale, grad_bias, None, None, None, None, None, None)
