"""The caption record every reader returns, and the one check of a list of them."""

from __future__ import annotations

import numbers
import os
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRecord:
    """One image (``filename``; a shard's ``__key__``), its non-empty caption and optional int label."""

    filename: str
    caption: str
    label: int | None = None


def path_key(filename: str) -> str:
    """What two spellings of one image share: ``./``, ``//`` and ``..`` folded
    (``os.path.normpath``) and Unicode NFC, as file names from macOS (NFD) may differ
    from the same names typed into a CSV (NFC) only in their code points."""
    return unicodedata.normalize("NFC", os.path.normpath(filename))


def validate_records(
    records: Iterable[CaptionRecord],
    *,
    source: str | os.PathLike[str] = "records",
    where: Callable[[int], str] | None = None,
    unique: bool = True,
) -> list[CaptionRecord]:
    """The records as a list, checked once; errors name ``source`` and ``where(i)``.
    ``unique``: no two records may name one image (compared by :func:`path_key`)."""
    name = os.fspath(source)
    if isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        got = (
            "a string" if isinstance(records, (str, bytes)) else type(records).__name__
        )
        raise TypeError(f"{name} must be a sequence of CaptionRecord, got {got}.")
    records = list(records)

    where = where or (lambda i: f"{name}, record {i}")
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        if not isinstance(record, CaptionRecord):
            raise TypeError(
                f"{where(i)}: expected a CaptionRecord, got {type(record).__name__}."
            )
        if not isinstance(record.filename, str) or not record.filename.strip():
            raise ValueError(f"{where(i)}: empty image file name.")
        if not isinstance(record.caption, str) or not record.caption.strip():
            raise ValueError(
                f"{where(i)}: image {record.filename!r} has an empty caption."
            )
        if record.label is not None and (
            isinstance(record.label, bool)
            or not isinstance(record.label, numbers.Integral)
        ):
            raise ValueError(
                f"{where(i)}: the label of {record.filename!r} must be an int or None, "
                f"got {record.label!r}."
            )
        first = seen.setdefault(path_key(record.filename), i) if unique else i
        if first != i:
            other = records[first].filename
            spelled = f", as {other!r}" if other != record.filename else ""
            raise ValueError(
                f"{where(i)}: duplicate file name {record.filename!r} (first at "
                f"{where(first).rsplit(', ', 1)[-1]}{spelled}); each image needs "
                "exactly one caption."
            )
    if not records:
        raise ValueError(f"{name}: no captions found.")
    return records
