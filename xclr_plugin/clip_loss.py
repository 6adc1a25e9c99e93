"""Image-text X-CLR in open_clip's conventions: ``XCLRClipLoss`` (XCLR_SPEC.md section 2).

A drop-in for :class:`open_clip.loss.ClipLoss`: same constructor options, same forward
signature, same distributed layouts (``local_loss``, ``gather_with_grad``). The one-hot
target of CLIP becomes a soft target ``G = row-softmax(S / tau_s)`` built from how similar
the samples' descriptions are. Without descriptions (identity graph) the loss *is*
``ClipLoss``: the same code path, so values and gradients are identical.

The computation is split in small methods (gathering, logits, targets, loss) in the style
of open_clip's ``loss.py``, so that variants (e.g. a memory-efficient chunked path) only
replace one of them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xclr_plugin.functional import (
    similarity_from_targets,
    soft_cross_entropy_dense,
    target_distribution,
    validate_chunk_size,
    validate_temperature,
    xclr_clip_loss_chunked,
)
from xclr_plugin.loss import gather_without_grad

try:
    from open_clip.loss import ClipLoss, gather_features
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "xclr_plugin.clip_loss needs open_clip_torch, which is not installed. "
        'Install the openclip extra: pip install "xclr-plugin[openclip]"'
    ) from err

__all__ = ["TARGET_MODES", "TargetMode", "XCLRClipLoss"]

TargetMode = Literal["captions", "clip-text"]

#: Where the soft targets come from: ``captions`` uses the ``targets`` passed to forward
#: (caption embeddings of a frozen sentence encoder, or labels; None = identity graph),
#: ``clip-text`` uses the batch's own text features, detached.
TARGET_MODES: tuple[str, ...] = ("captions", "clip-text")


class XCLRClipLoss(ClipLoss):
    """X-Sample Contrastive Loss for image-text models, with ``ClipLoss``'s interface.

    With image features ``u_i``, text features ``v_i`` (L2-normalised, as open_clip's
    models return them), the exponentiated ``logit_scale`` ``s`` and an optional
    ``logit_bias`` ``b``:

    - logits ``L = s * U V^T + b``, for images (rows) and texts (``L^T``),
    - targets ``G = row-softmax(S / target_temperature)``, where ``S`` is the cosine
      similarity of the samples' descriptions: caption embeddings or labels passed as
      ``targets`` (``target_mode="captions"``), or the detached text features
      (``target_mode="clip-text"``),
    - loss ``1/2 [CE_soft(L, G) + CE_soft(L^T, G)]``.

    With ``target_mode="captions"`` and ``targets=None`` (the identity graph) this is
    exactly :class:`open_clip.loss.ClipLoss`. Logits, targets and log-softmax are
    computed in float32 (float64 for float64 features), also under autocast.

    Distributed (``world_size > 1``, an initialised process group): features are
    gathered with ``open_clip.loss.gather_features`` and the descriptions without
    gradient in the same layout. With ``local_loss`` the logits are
    ``[B_local, B_global]`` and the target rows are those of the local samples.

    - [0] X-CLR, 2025, https://arxiv.org/abs/2407.18134
    - [1] CLIP, 2021, https://arxiv.org/abs/2103.00020

    Args:
        local_loss: Score only the local samples against the global batch.
        gather_with_grad: Gather features with gradient (needed for the exact global
            gradient with ``local_loss``).
        cache_labels: Cache the identity labels between calls (as ``ClipLoss``).
        rank: Rank of this process.
        world_size: Number of processes.
        target_temperature: ``tau_s``, finite and > 0.
        target_mode: ``"captions"`` or ``"clip-text"`` (see :data:`TARGET_MODES`).
        use_horovod: Must be False (accepted so that open_clip's ``ClipLoss``
            arguments can be passed unchanged).
        chunk_size: If set, logits, targets and gradients are computed for this many
            rows at a time, so memory grows linearly with the batch instead of
            quadratically (same values and gradients). None: dense, ClipLoss's path.

    Raises:
        ValueError: For a bad ``target_temperature`` or ``target_mode``, or horovod.

    Examples:
        >>> loss_fn = XCLRClipLoss(target_temperature=0.1)
        >>> out = model(images, texts)                        # open_clip, output_dict=True
        >>> captions = text_encoder.encode(batch_captions)    # (B, Dt), frozen
        >>> loss = loss_fn(**out, targets=captions)
        >>> loss = loss_fn(**out)                             # identity: == ClipLoss
        >>> loss_fn = XCLRClipLoss(target_mode="clip-text")   # S from the text features
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
        if target_mode not in TARGET_MODES:
            raise ValueError(
                f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}."
            )
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
        )
        self.target_temperature = validate_temperature(
            "target_temperature", target_temperature
        )
        self.target_mode = target_mode
        self.chunk_size = validate_chunk_size(chunk_size)

    def extra_repr(self) -> str:
        """The settings, shown in ``repr`` (and so in open_clip_train's log)."""
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
            image_features: ``(B, D)`` normalised image features of this process.
            text_features: ``(B, D)`` normalised text features of this process.
            logit_scale: The exponentiated logit scale (a scalar tensor).
            logit_bias: Optional logit bias, added to all logits.
            output_dict: Return ``{"contrastive_loss": loss}`` (open_clip's training
                loop sums every value of the dict into the total loss).
            targets: Only with ``target_mode="captions"``: caption embeddings
                ``(B, Dt)`` float, labels ``(B,)`` integer, or None for the identity
                graph (``ClipLoss``).

        Returns:
            The scalar loss, or ``{"contrastive_loss": loss}``.
        """
        self._validate(image_features, text_features, targets)
        device_type = image_features.device.type
        # Under autocast the matrix products run in the autocast dtype, as in ClipLoss
        # (3-5x faster on GPUs); softmax, targets and sums stay float32.
        mm_dtype = _autocast_dtype(device_type)
        if mm_dtype is None:
            image_features = _to_compute_dtype(image_features)
            text_features = _to_compute_dtype(text_features)
        all_image_features, all_text_features = self.gather(
            image_features, text_features
        )
        features = (
            image_features,
            text_features,
            all_image_features,
            all_text_features,
            logit_scale,
            logit_bias,
        )
        if self.chunk_size is not None:
            with torch.autocast(device_type=device_type, enabled=False):
                loss = self._chunked_loss(*features, targets, mm_dtype=mm_dtype)
            return {"contrastive_loss": loss} if output_dict else loss
        logits_per_image, logits_per_text = self.logits_from_features(*features)
        with torch.no_grad():
            descriptions = self.row_and_column_descriptions(
                text_features, all_text_features, targets
            )
            # The similarity is a product too: it follows autocast.
            similarity = (
                None if descriptions is None else similarity_from_targets(*descriptions)
            )
        with torch.autocast(device_type=device_type, enabled=False):
            if mm_dtype is not None:
                logits_per_image = logits_per_image.float()
                logits_per_text = logits_per_text.float()
            target_probs = None
            if similarity is not None:
                # softmax(S / tau_s) in place: S is a fresh no-grad buffer.
                target_probs = torch.softmax(
                    similarity.to(logits_per_image.dtype).mul_(
                        1.0 / self.target_temperature
                    ),
                    dim=1,
                )
            loss = self.loss_from_logits(
                logits_per_image, logits_per_text, target_probs
            )
        return {"contrastive_loss": loss} if output_dict else loss

    # -- features and logits -------------------------------------------------------

    def gather(
        self, image_features: Tensor, text_features: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All processes' features in ``ClipLoss``'s layout (the local ones if single)."""
        if self.world_size == 1:
            return image_features, text_features
        all_image_features, all_text_features = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        return all_image_features, all_text_features

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

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``ClipLoss.get_logits``: gathers (if distributed), then the logits."""
        everyone = self.gather(image_features, text_features)
        return self.logits_from_features(
            image_features, text_features, *everyone, logit_scale, logit_bias
        )

    # -- targets -------------------------------------------------------------------

    def get_target_probs(
        self,
        text_features: Tensor,
        all_text_features: Tensor,
        targets: Tensor | None,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """The soft target ``G`` for the logit rows, or None for the identity graph.

        Rows are the samples scored by this process (local with ``local_loss`` or a
        single process, global otherwise); columns are all samples. The same ``G``
        serves both directions because ``S`` is symmetric.
        """
        descriptions = self.row_and_column_descriptions(
            text_features, all_text_features, targets
        )
        if descriptions is None:
            return None
        similarity = similarity_from_targets(*descriptions).to(dtype)
        return target_distribution(similarity, self.target_temperature)

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
        self,
        image_features: Tensor,
        text_features: Tensor,
        all_image_features: Tensor,
        all_text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        targets: Tensor | None,
        mm_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The same loss as the dense path, ``chunk_size`` rows at a time."""
        if mm_dtype is not None:
            # Accumulate in float32; only the products run in ``mm_dtype``.
            image_features, text_features = (
                image_features.float(),
                text_features.float(),
            )
            all_image_features = all_image_features.float()
            all_text_features = all_text_features.float()
        assert self.chunk_size is not None
        if self.world_size > 1 and not self.local_loss:
            image_rows, text_rows, offset = all_image_features, all_text_features, 0
        else:
            image_rows, text_rows = image_features, text_features
            offset = self.rank * image_features.shape[0] if self.world_size > 1 else 0
        row_desc = col_desc = None
        descriptions = self.row_and_column_descriptions(
            text_features, all_text_features, targets
        )
        if descriptions is not None:
            row_desc, col_desc = (
                F.normalize(d.to(image_features.dtype), dim=1)
                if d.is_floating_point()
                else d
                for d in descriptions
            )
        return xclr_clip_loss_chunked(
            image_rows,
            text_rows,
            all_image_features,
            all_text_features,
            logit_scale,
            logit_bias,
            row_desc,
            col_desc,
            target_temperature=self.target_temperature,
            rank_offset=offset,
            chunk_size=self.chunk_size,
            mm_dtype=mm_dtype,
        )

    # -- loss ----------------------------------------------------------------------

    def loss_from_logits(
        self,
        logits_per_image: Tensor,
        logits_per_text: Tensor,
        target_probs: Tensor | None,
    ) -> Tensor:
        """Mean of the image-to-text and text-to-image (soft-target) cross-entropies."""
        if target_probs is None:
            labels = self.get_ground_truth(
                logits_per_image.device, logits_per_image.shape[0]
            )
            return (
                F.cross_entropy(logits_per_image, labels)
                + F.cross_entropy(logits_per_text, labels)
            ) / 2
        # No -inf logits here (nothing is masked): the fused soft cross-entropy.
        return (
            soft_cross_entropy_dense(logits_per_image, target_probs)
            + soft_cross_entropy_dense(logits_per_text, target_probs)
        ) / 2

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
            torch.float64 in dtypes or not _autocast_enabled(image_features.device.type)
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
        if not isinstance(targets, Tensor):
            raise ValueError(
                f"targets must be a torch.Tensor or None, got {type(targets).__name__}."
            )
        if targets.ndim not in (1, 2) or targets.shape[0] != image_features.shape[0]:
            raise ValueError(
                "targets must be caption embeddings (batch_size, text_dim) or labels "
                f"(batch_size,) with batch_size={image_features.shape[0]}, got shape "
                f"{tuple(targets.shape)}."
            )
        if (targets.ndim == 2) != targets.is_floating_point():
            raise ValueError(
                "targets must be float caption embeddings (batch_size, text_dim) or "
                f"integer labels (batch_size,), got shape {tuple(targets.shape)} of "
                f"dtype {targets.dtype}."
            )
        if targets.ndim == 2 and targets.shape[1] < 2:
            raise ValueError(
                "Caption embeddings need text_dim >= 2, got targets of shape "
                f"{tuple(targets.shape)}: the cosine similarity of 1-D embeddings is "
                "only -1, 0 or +1. If these are class labels, pass them as a 1-D "
                "integer tensor: targets.squeeze(1).long()."
            )
        if targets.device != image_features.device:
            raise ValueError(
                f"targets must be on the device of the features ({image_features.device}), "
                f"got {targets.device}."
            )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is enabled for ``device_type``, else None."""
    if not _autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":  # pragma: no cover - older torch
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()  # pragma: no cover - older torch


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _to_compute_dtype(features: Tensor) -> Tensor:
    """float64 stays float64, float32 stays as is; half precisions become float32."""
    if features.dtype in (torch.float32, torch.float64):
        return features
    return features.float()
