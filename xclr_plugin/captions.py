"""Caption sources: where the description of each image comes from.

Every reader returns a list of :class:`CaptionRecord` ``(filename, caption, label)``:

- :func:`read_csv_captions`: open_clip-style CSV/TSV (``open_clip_train --train-data``),
  one row per image, defaults as open_clip_train: tab separator, columns ``filepath``
  and ``title``.
- :func:`read_jsonl_captions`: one JSON object per line.
- :func:`read_folder_captions`: an image folder as :class:`lightly.data.LightlyDataset`
  reads it, plus a sidecar ``filename,caption`` CSV whose file names are relative to
  the folder (exactly the names ``LightlyDataset`` returns).
- :func:`read_class_captions`: a labelled folder (one subfolder per class), each image
  captioned from its class name with a template such as ``"a photo of a {}"``.

Readers check the content (columns, empty captions, duplicate file names) and name the
file and line of the first problem. Whether the images exist is checked by the
datasets in :mod:`xclr_plugin.data`.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, overload

__all__ = [
    "CaptionRecord",
    "check_template",
    "detect_format",
    "read_captions",
    "read_class_captions",
    "read_csv_captions",
    "read_folder_captions",
    "read_jsonl_captions",
    "validate_records",
]

#: Template of :func:`read_class_captions`, as in CLIP's zero-shot prompts.
DEFAULT_TEMPLATE = "a photo of a {}"
#: Sidecar captions file looked for inside an image folder.
DEFAULT_SIDECAR = "captions.csv"


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its description.

    Attributes:
        filename: Image path as the source gives it: relative to the image folder for
            folder sources, as written in the file for CSV/JSONL sources.
        caption: The image's description; never empty.
        label: Integer class label, or None if the source has no labels.
    """

    filename: str
    caption: str
    label: int | None = None


def _where(path: str | os.PathLike[str], line: int) -> str:
    """Formats a location for error messages."""
    return f"{os.fspath(path)}, line {line}"


def validate_records(
    records: Iterable[CaptionRecord],
    *,
    source: str | os.PathLike[str] = "records",
    lines: Sequence[int] | None = None,
    locations: Sequence[str] | None = None,
) -> list[CaptionRecord]:
    """Checks records for empty captions and duplicate file names.

    Args:
        records: The records.
        source: Name of where they came from, for error messages.
        lines: Line number of each record in ``source``, for error messages.
        locations: Or a full location (``"file, line 3"``) of each record.

    Returns:
        The records as a list.

    Raises:
        TypeError: If an item is not a :class:`CaptionRecord`.
        ValueError: On an empty file name, an empty (or whitespace-only) caption,
            a duplicate file name, or no records at all.
    """
    if isinstance(records, (str, bytes)):
        raise TypeError(
            f"{os.fspath(source)}: expected a sequence of CaptionRecord, got a string."
        )
    records = list(records)

    def where(i: int) -> str:
        if locations is not None:
            return locations[i]
        if lines is not None:
            return _where(source, lines[i])
        return f"{os.fspath(source)}, record {i}"

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
        first = seen.setdefault(record.filename, i)
        if first != i:
            first_where = where(first)
            first_at = first_where.rsplit(", ", 1)[-1]
            raise ValueError(
                f"{where(i)}: duplicate file name {record.filename!r} (first at "
                f"{first_at}); each image needs exactly one caption."
            )
    if not records:
        raise ValueError(f"{os.fspath(source)}: no captions found.")
    return records


def _open_text(path: str | os.PathLike[str]) -> TextIO:
    """Opens a captions file for reading, with a clear error if it is unreadable.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is a directory or cannot be opened.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Captions file not found: {os.fspath(path)}")
    if os.path.isdir(path):
        raise ValueError(f"Captions file is a directory, not a file: {os.fspath(path)}")
    try:
        # utf-8-sig drops a byte-order mark, which spreadsheet exports often add.
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise ValueError(f"Cannot read captions file {os.fspath(path)}: {err}") from err


def _parse_label(value: Any, where: str, key: str) -> int:
    """Parses an integer label, naming the row on failure."""
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: label column {key!r} is not an integer: {value!r}."
        ) from err


def _check_sep(sep: Any) -> str:
    """Checks a CSV separator: any non-empty string, as ``pandas.read_csv`` takes it."""
    if not isinstance(sep, str) or not sep:
        raise ValueError(
            f"sep must be a non-empty string (a character such as '\\t' or ',', or a "
            f"longer pattern as pandas.read_csv reads it), got {sep!r}."
        )
    return sep


def _csv_line_numbers(
    path: str | os.PathLike[str], sep: str, count: int
) -> list[int] | None:
    """First line of each data row, for error messages; None if it cannot be told.

    pandas reports no line numbers, so the file is read a second time (only when an
    error needs them) with the :mod:`csv` module, skipping blank lines as pandas does.
    If the two readers do not agree on the number of rows (a regex separator, odd
    quoting), rows are named by number instead.
    """
    if len(sep) != 1:
        return None
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=sep)
            starts: list[int] = []
            previous_end = 0
            for row in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # pandas skips blank and whitespace-only lines
                starts.append(start)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    data_rows = starts[1:]  # the first row is the header
    return data_rows if len(data_rows) == count else None


class _RowLocations(Sequence[str]):
    """``"path, line N"`` (or ``"path, row N"``) of each data row, computed on demand."""

    def __init__(self, path: str | os.PathLike[str], sep: str, count: int) -> None:
        self.path, self.sep, self._count = path, sep, count
        self._lines: list[int] | None = None
        self._computed = False

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not self._computed:
            self._lines = _csv_line_numbers(self.path, self.sep, self._count)
            self._computed = True
        if self._lines is not None:
            return _where(self.path, self._lines[index])
        return f"{os.fspath(self.path)}, data row {index + 1}"


def _read_csv_frame(path: str | os.PathLike[str], sep: str) -> Any:
    """Reads a CSV/TSV exactly as open_clip's ``CsvDataset`` does.

    open_clip calls ``pd.read_csv(input_filename, sep=sep)``; so does this function
    (separators longer than one character name pandas' python engine explicitly,
    which pandas would fall back to anyway, with a warning). The same call decides
    which rows, columns and cell values exist, so a file open_clip refuses is
    refused and no row is merged or dropped differently.
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - a core dependency
        raise ImportError(
            "Reading CSV/TSV captions needs pandas (pip install pandas)."
        ) from err

    where = os.fspath(path)
    try:
        if len(sep) == 1:
            frame = pd.read_csv(path, sep=sep)
        else:
            frame = pd.read_csv(path, sep=sep, engine="python")
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{where}: empty file, expected a header row.") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err}).") from err
    except (pd.errors.ParserError, csv.Error) as err:
        raise ValueError(
            f"{where}: malformed CSV, refused as open_clip's reader (pandas) refuses "
            f"it: {err}"
        ) from err
    except (OSError, ValueError, re.error) as err:
        # re.error: a separator longer than one character is a regular expression.
        raise ValueError(f"Cannot read captions file {where}: {err}") from err
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas turns the first column into the index when the first data row has
        # more fields than the header; every column would then be shifted by one.
        raise ValueError(
            f"{where}: the data rows have more fields than the header "
            f"({len(frame.columns)} columns, separated by {sep!r}); pandas (and "
            "open_clip) would read the first column as the row index and shift every "
            "other column. Fix the header or the extra separators."
        )
    return frame


def _cell_text(value: Any) -> str | None:
    """A cell as open_clip uses it (``str(value)``), or None for a missing cell.

    pandas reads an empty cell, and cells such as ``NA``, ``null`` or ``nan``, as
    missing (NaN); open_clip would then train on the text ``"nan"``.
    """
    if isinstance(value, float) and value != value:  # NaN
        return None
    return str(value)


def _swallowed_rows(text: str, sep: str) -> bool:
    """Whether a multi-line field holds whole lines with a separator.

    That is what an unbalanced quote does: it opens a field that the next quote, many
    rows later, closes, and the rows in between become one caption.
    """
    lines = text.splitlines()[1:]
    if len(sep) == 1:
        return any(sep in line for line in lines)
    pattern = re.compile(sep)  # compiled by pandas already: valid
    return any(pattern.search(line) for line in lines)


def read_csv_captions(
    path: str | os.PathLike[str],
    *,
    sep: str = "\t",
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    allow_multiline: bool = False,
) -> list[CaptionRecord]:
    """Reads an open_clip-style CSV/TSV captions file (with a header row).

    The file is split into rows and columns by ``pandas.read_csv(path, sep=sep)``,
    the call open_clip's ``CsvDataset`` makes: the rows, their order and the
    refusals (unbalanced quotes, rows with too many fields) are open_clip's. The
    defaults match ``open_clip_train``'s ``--csv-separator``, ``--csv-img-key`` and
    ``--csv-caption-key``, so the file given to ``--train-data`` reads as is. As in
    pandas, a separator of more than one character is a regular expression (so
    ``"\\t"``, a backslash and a ``t`` as typed in a shell, means a tab); a
    duplicated column name reads the first such column (pandas renames the others
    ``name.1``, ...); blank lines are skipped; a byte-order mark is ignored. File
    names and captions are ``str()`` of the cells pandas reads, the strings open_clip
    opens and tokenizes.

    Beyond what pandas checks, a row with a missing field, an empty caption or file
    name, a repeated file name, and a field that spans lines containing the separator
    (the rows an unbalanced quote swallows) are refused.

    Args:
        path: The CSV/TSV file (UTF-8).
        sep: Column separator (tab by default, as open_clip_train).
        img_key: Column holding the image path.
        caption_key: Column holding the caption.
        label_key: Optional column holding an integer label.
        allow_multiline: Accept captions that span lines even if they contain the
            separator (only for files whose quoted captions really do).

    Returns:
        One record per data row, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be decoded or parsed, lacks a header or a
            column, a row has the wrong number of fields, a caption is empty, or a
            file name repeats.
    """
    sep = _check_sep(sep)
    for name, key in (("img_key", img_key), ("caption_key", caption_key)):
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} must be a non-empty column name, got {key!r}.")
    if label_key is not None and not isinstance(label_key, str):
        raise ValueError(f"label_key must be a column name or None, got {label_key!r}.")
    with _open_text(path):
        pass  # the same checks and messages as the other readers (missing, folder)
    frame = _read_csv_frame(path, sep)
    columns = [str(c) for c in frame.columns]
    wanted = [img_key, caption_key] + ([label_key] if label_key is not None else [])
    missing = [key for key in wanted if key not in columns]
    if missing:
        hint = ""
        if len(missing) == len(wanted):
            hint = f" Is the separator right (got {sep!r})?"
        shown = columns if len(columns) <= 10 else [*columns[:10], "..."]
        raise ValueError(
            f"{os.fspath(path)}: missing column(s) {missing}; the header has "
            f"{shown}.{hint}"
        )
    filenames = frame[img_key].tolist()
    captions = frame[caption_key].tolist()
    labels = frame[label_key].tolist() if label_key is not None else None
    where = _RowLocations(path, sep, len(frame))
    records: list[CaptionRecord] = []
    for i, (file_cell, caption_cell) in enumerate(
        zip(filenames, captions, strict=True)
    ):
        filename, caption = _cell_text(file_cell), _cell_text(caption_cell)
        if filename is None:
            raise ValueError(
                f"{where[i]}: no image path in column {img_key!r} (an empty cell, or a "
                "missing field)."
            )
        if caption is None:
            raise ValueError(
                f"{where[i]}: image {filename!r} has no caption in column "
                f"{caption_key!r} (an empty cell, a missing field, or a value pandas "
                "reads as missing such as NA, null or nan)."
            )
        if any(c in filename for c in "\r\n"):
            raise ValueError(
                f"{where[i]}: the image path {filename!r} spans lines: an unbalanced "
                "quote?"
            )
        if (
            not allow_multiline
            and ("\n" in caption or "\r" in caption)
            and _swallowed_rows(caption, sep)
        ):
            raise ValueError(
                f"{where[i]}: the caption of {filename!r} spans "
                f"{len(caption.splitlines())} lines that contain the separator "
                f"{sep!r}: an unbalanced quote has probably merged rows into one "
                "caption (open_clip would read them as one). Fix the quote, or pass "
                "allow_multiline=True if the caption really is this text."
            )
        label = (
            _parse_label(labels[i], where[i], str(label_key))
            if labels is not None
            else None
        )
        records.append(CaptionRecord(filename, caption, label))
    return validate_records(records, source=path, locations=where)


def read_jsonl_captions(
    path: str | os.PathLike[str],
    *,
    img_key: str = "filename",
    caption_key: str = "caption",
    label_key: str | None = None,
) -> list[CaptionRecord]:
    """Reads a JSON Lines captions file: one object per line, blank lines skipped.

    Args:
        path: The JSONL file.
        img_key: Key holding the image path.
        caption_key: Key holding the caption.
        label_key: Optional key holding an integer label.

    Returns:
        One record per object, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a line is not a JSON object, lacks a key, holds a non-string
            file name or caption, a caption is empty, or a file name repeats.
    """
    records: list[CaptionRecord] = []
    lines: list[int] = []
    with _open_text(path) as handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = _where(path, line_no)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err.msg}).") from err
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object.")
                keys = [img_key, caption_key] + ([label_key] if label_key else [])
                missing = [key for key in keys if key not in obj]
                if missing:
                    raise ValueError(
                        f"{where}: missing key(s) {missing}; the object has {sorted(obj)}."
                    )
                filename, caption = obj[img_key], obj[caption_key]
                if not isinstance(filename, str) or not isinstance(caption, str):
                    raise ValueError(
                        f"{where}: {img_key!r} and {caption_key!r} must be strings."
                    )
                label = (
                    _parse_label(obj[label_key], where, label_key)
                    if label_key is not None
                    else None
                )
                records.append(CaptionRecord(filename, caption, label))
                lines.append(line_no)
        except UnicodeDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({err}).") from err
    return validate_records(records, source=path, lines=lines)


def _lightly_folder(image_dir: str | os.PathLike[str]) -> Any:
    """Lists an image folder exactly as :class:`lightly.data.LightlyDataset` does.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If it holds no images.
    """
    from lightly.data import LightlyDataset

    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"Image folder not found: {os.fspath(image_dir)}")
    try:
        return LightlyDataset(os.fspath(image_dir))
    except (RuntimeError, FileNotFoundError) as err:
        raise ValueError(f"No images found in {os.fspath(image_dir)}: {err}") from err


def read_folder_captions(
    image_dir: str | os.PathLike[str],
    captions_file: str | os.PathLike[str] | None = None,
    *,
    sep: str = ",",
    img_key: str = "filename",
    caption_key: str = "caption",
) -> list[CaptionRecord]:
    """Reads captions for an image folder from a sidecar ``filename,caption`` CSV.

    File names in the sidecar are relative to ``image_dir``, as
    ``LightlyDataset(image_dir).get_filenames()`` returns them (``"img.png"`` for a
    flat folder, ``"class/img.png"`` with subfolders). Every image of the folder must
    have exactly one caption, and every caption an image. Records follow the
    folder's (LightlyDataset's) order, with labels from ``LightlyDataset``'s targets
    when the folder has subfolders.

    Args:
        image_dir: The image folder.
        captions_file: The sidecar CSV; defaults to ``image_dir/captions.csv``.
        sep: Column separator of the sidecar.
        img_key: Column holding the file name.
        caption_key: Column holding the caption.

    Returns:
        One record per image, in the folder's order.

    Raises:
        FileNotFoundError: If the folder or sidecar does not exist, or the sidecar names
            an image that is not in the folder.
        ValueError: If an image has no caption, or the sidecar is malformed (see
            :func:`read_csv_captions`).
    """
    captions_file = (
        os.path.join(image_dir, DEFAULT_SIDECAR)
        if captions_file is None
        else captions_file
    )
    sidecar = read_csv_captions(
        captions_file, sep=sep, img_key=img_key, caption_key=caption_key
    )
    by_name = {Path(r.filename).as_posix(): r.caption for r in sidecar}
    if len(by_name) != len(sidecar):
        raise ValueError(
            f"{os.fspath(captions_file)}: duplicate file names after normalising path "
            "separators."
        )
    dataset = _lightly_folder(image_dir)
    filenames = dataset.get_filenames()
    targets = getattr(dataset.dataset, "targets", None)
    has_classes = hasattr(dataset.dataset, "classes")
    records: list[CaptionRecord] = []
    for i, filename in enumerate(filenames):
        caption = by_name.pop(Path(filename).as_posix(), None)
        if caption is None:
            raise ValueError(
                f"Image {filename!r} in {os.fspath(image_dir)} has no caption in "
                f"{os.fspath(captions_file)}."
            )
        label = int(targets[i]) if has_classes and targets is not None else None
        records.append(CaptionRecord(filename, caption, label))
    if by_name:
        first = next(iter(by_name))
        raise FileNotFoundError(
            f"{os.fspath(captions_file)} names {len(by_name)} image(s) not found in "
            f"{os.fspath(image_dir)}, e.g. {first!r}."
        )
    return records


def check_template(template: Any) -> str:
    """Checks a class-caption template: text with exactly one ``{}`` field.

    Args:
        template: e.g. ``"a photo of a {}"``.

    Returns:
        The template.

    Raises:
        ValueError: If it is not a string, is malformed (``"a {"``), or has no, more
            than one, or a named/numbered field (``"a {} {name}"``).
    """
    if not isinstance(template, str):
        raise ValueError(
            f"template must be a string with one '{{}}' for the class name, got "
            f"{template!r}."
        )
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as err:
        raise ValueError(f"template {template!r} is malformed: {err}.") from err
    if [name for name, _, _ in fields] != [""]:
        raise ValueError(
            f"template must contain exactly one '{{}}' for the class name and no "
            f"other {{...}} field (write '{{{{' and '}}}}' for literal braces), got "
            f"{template!r}."
        )
    try:
        template.format("x")
    except (ValueError, TypeError) as err:
        raise ValueError(f"template {template!r} is malformed: {err}.") from err
    return template


def read_class_captions(
    image_dir: str | os.PathLike[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    class_names: dict[str, str] | None = None,
) -> list[CaptionRecord]:
    """Captions a labelled folder (one subfolder per class) from its class names.

    Images, their order, file names (``"class/img.png"``) and labels are those of
    ``LightlyDataset(image_dir)`` (torchvision's ``ImageFolder``: classes sorted).
    Each caption is ``template.format(name)``, where ``name`` is
    ``class_names[folder]`` if given, else the folder name with ``_`` read as spaces.

    Args:
        image_dir: The labelled folder.
        template: Caption template with one ``{}`` for the class name.
        class_names: Optional folder name -> readable class name.

    Returns:
        One record per image, with its class index as label.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If the folder has no class subfolders or images, or the template
            has no ``{}``.
    """
    check_template(template)
    dataset = _lightly_folder(image_dir)
    classes = getattr(dataset.dataset, "classes", None)
    if not classes:
        raise ValueError(
            f"{os.fspath(image_dir)} has no class subfolders; use read_folder_captions "
            "with a sidecar captions file for a flat folder."
        )
    names = dict(class_names or {})
    captions = [template.format(names.get(c, c.replace("_", " "))) for c in classes]
    filenames = dataset.get_filenames()
    targets = dataset.dataset.targets
    return [
        CaptionRecord(name, captions[int(label)], int(label))
        for name, label in zip(filenames, targets, strict=True)
    ]


def _looks_like_shards(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names webdataset shards (open_clip's ``.tar`` rule)."""
    text = os.fspath(source)
    if not isinstance(text, str) or os.path.isdir(text):
        return False
    parts = [p.strip() for p in text.split("::")]
    return all(p.lower().endswith(".tar") for p in parts)


def _read_webdataset(
    source: str | os.PathLike[str], **kwargs: Any
) -> list[CaptionRecord]:
    """Reads the captions of webdataset shards (``xclr_plugin.shards``, lazily)."""
    from xclr_plugin.shards import read_webdataset_captions

    return read_webdataset_captions(os.fspath(source), **kwargs)


def detect_format(source: str | os.PathLike[str], *, captions_file: Any = None) -> str:
    """Guesses the caption format of a source path.

    Shards (``.tar``, also in brace notation or ``::`` lists, as open_clip's
    ``--dataset-type auto``) are ``"webdataset"``; a folder with a ``captions.csv``
    sidecar (or an explicit ``captions_file``) is ``"folder"``, any other folder
    ``"classes"``; ``*.jsonl``/``*.json`` files are ``"jsonl"``; anything else is
    open_clip ``"csv"``.

    Args:
        source: File or folder.
        captions_file: Sidecar file given explicitly, if any.

    Returns:
        One of ``"csv"``, ``"jsonl"``, ``"folder"``, ``"classes"``, ``"webdataset"``.
    """
    if _looks_like_shards(source):
        return "webdataset"
    if os.path.isdir(source):
        has_sidecar = captions_file is not None or os.path.isfile(
            os.path.join(source, DEFAULT_SIDECAR)
        )
        return "folder" if has_sidecar else "classes"
    return "jsonl" if os.fspath(source).lower().endswith((".jsonl", ".json")) else "csv"


def read_captions(
    source: str | os.PathLike[str], fmt: str = "auto", **kwargs: Any
) -> list[CaptionRecord]:
    """Reads any caption source with the reader for ``fmt``.

    Args:
        source: File or folder.
        fmt: ``"csv"``, ``"jsonl"``, ``"folder"`` (sidecar), ``"classes"``,
            ``"webdataset"`` (shards, see :mod:`xclr_plugin.shards`), or ``"auto"``
            (see :func:`detect_format`).
        **kwargs: Passed to the reader (e.g. ``sep``, ``img_key``, ``template``).

    Returns:
        The records.

    Raises:
        ValueError: For an unknown ``fmt``, and whatever the reader raises.
    """
    if fmt == "auto":
        fmt = detect_format(source, captions_file=kwargs.get("captions_file"))
    readers: dict[str, Callable[..., list[CaptionRecord]]] = {
        "csv": read_csv_captions,
        "jsonl": read_jsonl_captions,
        "folder": read_folder_captions,
        "classes": read_class_captions,
        "webdataset": _read_webdataset,
    }
    if fmt not in readers:
        raise ValueError(
            f"Unknown captions format {fmt!r}; use one of {['auto', *readers]}."
        )
    return readers[fmt](source, **kwargs)
