"""Checks of the losses' arguments and inputs: temperatures, chunk size, memory bank
size, views and targets, each a ValueError (or TypeError) naming what was expected.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


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


def validate_memory_bank_size(size: object) -> int | tuple[int, int]:
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


def validate_views(out0: Tensor, out1: Tensor) -> None:
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
