"""``XCLRClipLoss``: image-text X-CLR as a drop-in for open_clip's ``ClipLoss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xclr_plugin.distributed import check_same_batch_size, gather_without_grad
from xclr_plugin.functional import soft_cross_entropy_dense, xclr_clip_loss_chunked
from xclr_plugin.two_view import _compute_dtype, _descriptions, similarity_from_targets
from xclr_plugin.validation import (
    validate_chunk_size,
    validate_targets,
    validate_temperature,
)

try:
    from open_clip.loss import ClipLoss, gather_features
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "xclr_plugin.clip_loss needs open_clip_torch, which is not installed. "
        'Install the openclip extra: pip install "xclr-plugin[openclip]"'
    ) from err


class XCLRClipLoss(ClipLoss):
    """X-Sample Contrastive Loss for image-text models, with ``ClipLoss``'s interface.

    Logits ``L = s * U V^T + b`` (``L^T`` for texts), targets ``G = row-softmax(S /
    target_temperature)`` with ``S`` the cosine similarity of the samples' descriptions
    (forward's ``targets`` in ``"captions"`` mode, the detached text features in
    ``"clip-text"``), loss ``1/2 [CE_soft(L, G) + CE_soft(L^T, G)]``
    (https://arxiv.org/abs/2407.18134). ``targets=None`` in captions mode runs
    ``ClipLoss``'s code path: identical values and gradients. Computed in float32
    (float64 for float64 features; products in the autocast dtype under autocast).

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size: As ``ClipLoss``.
        target_temperature: ``tau_s``, finite and > 0.
        target_mode: ``"captions"`` (forward's ``targets``) or ``"clip-text"``.
        use_horovod: Must be False (accepted so that ``ClipLoss``'s arguments pass).
        chunk_size: If set, ``chunk_size`` rows at a time: memory linear in the batch,
            same values and gradients. None: dense, ``ClipLoss``'s path.

    Raises:
        ValueError: Bad ``target_temperature``, ``target_mode``, ``chunk_size``; horovod.

    Examples:
        >>> loss_fn = XCLRClipLoss(target_temperature=0.1)
        >>> out = model(images, texts)  # open_clip, output_dict=True
        >>> loss = loss_fn(**out, targets=text_encoder.encode(batch_captions))
        >>> loss = loss_fn(**out)  # identity: == ClipLoss
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        target_temperature: float = 0.1,
        target_mode: str = "captions",
        use_horovod: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        if use_horovod:
            raise ValueError(
                "XCLRClipLoss does not support horovod (use_horovod=True); use "
                "torch.distributed (open_clip's default) instead."
            )
        if target_mode not in (modes := ("captions", "clip-text")):
            raise ValueError(
                f"target_mode must be one of {modes}, got {target_mode!r}."
            )
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size)
        self.target_temperature = validate_temperature(
            "target_temperature", target_temperature
        )
        self.target_mode = target_mode
        self.chunk_size = validate_chunk_size(chunk_size)

    def extra_repr(self) -> str:  # shown in open_clip_train's log
        return (
            f"target_mode={self.target_mode!r}, "
            f"target_temperature={self.target_temperature}, "
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        output_dict: bool = False,
        *,
        targets: Tensor | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Computes the loss of a batch.

        Args:
            image_features, text_features: ``(B, D)``, normalised, of this process.
            logit_scale: The exponentiated logit scale (a scalar tensor).
            logit_bias: Optional logit bias, added to all logits.
            output_dict: Return ``{"contrastive_loss": loss}``, as ``ClipLoss``.
            targets: Only with ``target_mode="captions"``: caption embeddings
                ``(B, Dt)`` float, labels ``(B,)`` integer, or None (``ClipLoss``).
        """
        self._validate(image_features, text_features, targets)
        device_type = image_features.device.type
        # Under autocast the matrix products run in the autocast dtype, as in ClipLoss
        # (3-5x faster on GPUs); softmax, targets and sums stay float32.
        mm_dtype = _autocast_dtype(device_type)
        if mm_dtype is None:
            image_features = image_features.to(_compute_dtype(image_features.dtype))
            text_features = text_features.to(_compute_dtype(text_features.dtype))
        everyone = self.gather(image_features, text_features)
        features = (image_features, text_features, *everyone, logit_scale, logit_bias)
        if self.chunk_size is not None:
            with torch.autocast(device_type=device_type, enabled=False):
                loss = self._chunked_loss(features, targets, mm_dtype)
            return {"contrastive_loss": loss} if output_dict else loss
        per_image, per_text = self.logits_from_features(*features)
        desc = self.row_and_column_descriptions(text_features, everyone[1], targets)
        with torch.no_grad():  # the similarity is a product too: it follows autocast
            similarity = None if desc is None else similarity_from_targets(*desc)
        with torch.autocast(device_type=device_type, enabled=False):
            if mm_dtype is not None:
                per_image, per_text = per_image.float(), per_text.float()
            target_probs = None
            if (
                similarity is not None
            ):  # softmax(S / tau_s) in place: S is a fresh buffer
                inv_tau_s = 1.0 / self.target_temperature
                scaled = similarity.to(per_image.dtype).mul_(inv_tau_s)
                target_probs = torch.softmax(scaled, dim=1)
            loss = self.loss_from_logits(per_image, per_text, target_probs)
        return {"contrastive_loss": loss} if output_dict else loss

    def gather(
        self, image_features: Tensor, text_features: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All processes' features in ``ClipLoss``'s layout (the local ones if single)."""
        if self.world_size == 1:
            return image_features, text_features
        n, device = image_features.shape[0], image_features.device
        check_same_batch_size(n, device, f"XCLRClipLoss(world_size={self.world_size})")
        everyone: tuple[Tensor, Tensor] = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        return everyone

    def logits_from_features(
        self,
        image_features: Tensor,
        text_features: Tensor,
        all_image_features: Tensor,
        all_text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(logits_per_image, logits_per_text)``, computed as ``ClipLoss.get_logits``."""
        if self.world_size > 1 and not self.local_loss:
            logits_per_image = logit_scale * all_image_features @ all_text_features.T
            logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ all_text_features.T
            logits_per_text = logit_scale * text_features @ all_image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def row_and_column_descriptions(
        self, text_features: Tensor, all_text_features: Tensor, targets: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """Descriptions of the logit rows and of all columns; None for the identity."""
        if self.target_mode == "clip-text":
            local, everyone = text_features.detach(), all_text_features.detach()
        elif targets is None:
            return None
        else:
            local = targets
            everyone = gather_without_grad(targets) if self.world_size > 1 else targets
        rows = local if self.world_size == 1 or self.local_loss else everyone
        return rows, everyone

    def _chunked_loss(
        self, features: tuple, targets: Tensor | None, mm_dtype: torch.dtype | None
    ) -> Tensor:
        """The dense path's loss, ``chunk_size`` rows at a time (products in ``mm_dtype``)."""
        *four, logit_scale, logit_bias = features
        image_features, text_features, all_image, all_text = (
            f if mm_dtype is None else f.float() for f in four
        )
        assert self.chunk_size is not None
        if self.world_size > 1 and not self.local_loss:
            image_rows, text_rows, offset = all_image, all_text, 0
        else:
            image_rows, text_rows = image_features, text_features
            offset = self.rank * image_features.shape[0] if self.world_size > 1 else 0
        row_desc = col_desc = None
        desc = self.row_and_column_descriptions(text_features, all_text, targets)
        if desc is not None:
            row_desc, col_desc = _descriptions(*desc, image_features.dtype)
        return xclr_clip_loss_chunked(
            image_rows,
            text_rows,
            all_image,
            all_text,
            logit_scale,
            logit_bias,
            row_desc,
            col_desc,
            target_temperature=self.target_temperature,
            rank_offset=offset,
            chunk_size=self.chunk_size,
            mm_dtype=mm_dtype,
        )

    def loss_from_logits(
        self,
        logits_per_image: Tensor,
        logits_per_text: Tensor,
        target_probs: Tensor | None,
    ) -> Tensor:
        """Mean of the image-to-text and text-to-image (soft-target) cross-entropies."""
        if target_probs is None:
            n = logits_per_image.shape[0]
            labels = self.get_ground_truth(logits_per_image.device, n)
            image_loss = F.cross_entropy(logits_per_image, labels)
            text_loss = F.cross_entropy(logits_per_text, labels)
        else:  # no -inf logits here (nothing is masked): the fused soft cross-entropy
            image_loss = soft_cross_entropy_dense(logits_per_image, target_probs)
            text_loss = soft_cross_entropy_dense(logits_per_text, target_probs)
        return (image_loss + text_loss) / 2

    def _validate(
        self, image_features: Tensor, text_features: Tensor, targets: Tensor | None
    ) -> None:
        for name, features in (
            ("image_features", image_features),
            ("text_features", text_features),
        ):
            if not isinstance(features, Tensor) or not features.is_floating_point():
                # ClipLoss multiplies integer features silently: never meaningful.
                raise ValueError(
                    f"{name} must be a floating point tensor, got "
                    f"{getattr(features, 'dtype', type(features).__name__)}."
                )
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must both be (batch_size, dim), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
            )
        if image_features.shape[0] < 1 or image_features.shape[1] < 1:
            # ClipLoss returns NaN for an empty batch.
            raise ValueError(
                "image_features and text_features need at least 1 sample and 1 "
                f"feature, got shape {tuple(image_features.shape)}."
            )
        dtypes = {image_features.dtype, text_features.dtype}
        if len(dtypes) > 1 and (
            torch.float64 in dtypes
            or _autocast_dtype(image_features.device.type) is None
        ):
            # ClipLoss fails inside matmul here; autocast casts float32 and half
            # precisions alike (not float64), so those mixes work as in ClipLoss.
            raise ValueError(
                "image_features and text_features must have the same dtype, got "
                f"{image_features.dtype} and {text_features.dtype}. Cast one, or "
                "run the loss under torch.autocast."
            )
        if targets is None:
            return
        if self.target_mode == "clip-text":
            raise ValueError(
                "targets must be None with target_mode='clip-text' (the targets come from "
                "the text features); use target_mode='captions' to pass descriptions."
            )
        validate_targets(targets, image_features, "image_features")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is enabled for ``device_type``, else None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    if device_type == "cpu":  # pragma: no cover - older torch
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:  # pragma: no cover - older torch
        on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if on else None
