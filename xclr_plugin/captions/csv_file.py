"""open_clip-style CSV/TSV captions, read by the very ``pandas.read_csv`` call open_clip makes."""

from __future__ import annotations

import csv
import functools
import os
import re
from typing import Any

from xclr_plugin.captions.records import CaptionRecord, validate_records


def open_text(path: str | os.PathLike[str]) -> Any:
    """Opens a captions file (UTF-8, a byte-order mark dropped), naming it on failure."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Captions file not found: {os.fspath(path)}")
    if os.path.isdir(path):
        raise ValueError(f"Captions file is a directory, not a file: {os.fspath(path)}")
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise ValueError(f"Cannot read captions file {os.fspath(path)}: {err}") from err


def parse_label(value: Any, where: str, key: str) -> int:
    """An integer label, or a ValueError naming the row."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and value % 1):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: label column {key!r} is not an integer: {value!r}."
        ) from None


def _row_locations(path: str | os.PathLike[str], sep: str, count: int) -> list[str]:
    """``"path, line N"`` of each data row, read again by :mod:`csv` (pandas has no line numbers); ``"data row N"`` if the two disagree."""
    where = os.fspath(path)
    starts: list[int] = []
    if len(sep) == 1:
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle, delimiter=sep)
                end = 0
                for row in reader:
                    start, end = end + 1, reader.line_num
                    if row and (len(row) > 1 or row[0].strip()):
                        starts.append(start)
        except (OSError, UnicodeDecodeError, csv.Error):
            starts = []
    if len(starts) == count + 1:  # the header, then the data rows
        return [f"{where}, line {line}" for line in starts[1:]]
    return [f"{where}, data row {i + 1}" for i in range(count)]


def _read_frame(path: str | os.PathLike[str], sep: str) -> Any:
    """``pd.read_csv(path, sep=sep)``, open_clip's ``CsvDataset`` call, refusals named."""
    import pandas as pd

    where = os.fspath(path)
    try:
        frame = pd.read_csv(path, sep=sep, engine="python" if len(sep) > 1 else None)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{where}: empty file, expected a header row.") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err}).") from err
    except (pd.errors.ParserError, csv.Error) as err:
        raise ValueError(
            f"{where}: malformed CSV, refused as open_clip's reader (pandas) refuses "
            f"it: {err}"
        ) from err
    except (OSError, ValueError, re.error) as err:  # re.error: a bad regex separator
        raise ValueError(f"Cannot read captions file {where}: {err}") from err
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas makes the first column the index when the first data row has more
        # fields than the header: every column would be shifted by one.
        raise ValueError(
            f"{where}: the data rows have more fields than the header "
            f"({len(frame.columns)} columns, separated by {sep!r}); pandas (and "
            "open_clip) would read the first column as the row index and shift every "
            "other column. Fix the header or the extra separators."
        )
    return frame


def _cell(value: Any) -> str | None:
    """``str(value)`` as open_clip uses it; None for a cell pandas reads as missing."""
    return None if isinstance(value, float) and value != value else str(value)


def _swallows_rows(text: str, sep: str) -> bool:
    """Whether a multi-line field holds lines with a separator (an unbalanced quote)."""
    pattern = re.compile(re.escape(sep) if len(sep) == 1 else sep)
    return any(pattern.search(line) for line in text.splitlines()[1:])


def read_csv_captions(
    path: str | os.PathLike[str],
    *,
    sep: str = "\t",
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    allow_multiline: bool = False,
) -> list[CaptionRecord]:
    """Reads an open_clip-style CSV/TSV (header row) exactly as ``pandas.read_csv(path, sep=sep)`` does, refusing missing or empty cells, repeated names and rows merged by a quote."""
    if not isinstance(sep, str) or not sep:
        raise ValueError(
            f"sep must be a non-empty string (a character such as '\\t' or ',', or a "
            f"longer pattern as pandas.read_csv reads it), got {sep!r}."
        )
    for name, key in (("img_key", img_key), ("caption_key", caption_key)):
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} must be a non-empty column name, got {key!r}.")
    if label_key is not None and not isinstance(label_key, str):
        raise ValueError(f"label_key must be a column name or None, got {label_key!r}.")
    open_text(path).close()  # the other readers' checks and messages (missing, folder)
    frame = _read_frame(path, sep)
    columns = [str(c) for c in frame.columns]
    wanted = [img_key, caption_key] + ([label_key] if label_key is not None else [])
    missing = [key for key in wanted if key not in columns]
    if missing:
        hint = f" Is the separator right (got {sep!r})?" if missing == wanted else ""
        shown = columns if len(columns) <= 10 else [*columns[:10], "..."]
        raise ValueError(
            f"{os.fspath(path)}: missing column(s) {missing}; the header has "
            f"{shown}.{hint}"
        )
    locate = functools.cache(lambda: _row_locations(path, sep, len(frame)))

    def where(i: int) -> str:
        return locate()[i]  # the second read happens only for an error message

    labels = frame[label_key].tolist() if label_key is not None else None
    records: list[CaptionRecord] = []
    cells = zip(frame[img_key].tolist(), frame[caption_key].tolist(), strict=True)
    for i, (file_cell, caption_cell) in enumerate(cells):
        filename, caption = _cell(file_cell), _cell(caption_cell)
        if filename is None:
            raise ValueError(
                f"{where(i)}: no image path in column {img_key!r} (an empty cell, or a "
                "missing field)."
            )
        if caption is None:
            raise ValueError(
                f"{where(i)}: image {filename!r} has no caption in column "
                f"{caption_key!r} (an empty cell, a missing field, or a value pandas "
                "reads as missing such as NA, null or nan)."
            )
        if "\n" in filename or "\r" in filename:
            raise ValueError(
                f"{where(i)}: the image path {filename!r} spans lines: an unbalanced "
                "quote?"
            )
        multiline = "\n" in caption or "\r" in caption
        if multiline and not allow_multiline and _swallows_rows(caption, sep):
            raise ValueError(
                f"{where(i)}: the caption of {filename!r} spans "
                f"{len(caption.splitlines())} lines that contain the separator "
                f"{sep!r}: an unbalanced quote has probably merged rows into one "
                "caption (open_clip would read them as one). Fix the quote, or pass "
                "allow_multiline=True if the caption really is this text."
            )
        label = None if labels is None else parse_label(labels[i], where(i), wanted[2])
        records.append(CaptionRecord(filename, caption, label))
    return validate_records(records, source=path, where=where)
