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
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "CaptionRecord",
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
) -> list[CaptionRecord]:
    """Checks records for empty captions and duplicate file names.

    Args:
        records: The records.
        source: Name of where they came from, for error messages.
        lines: Line number of each record in ``source``, for error messages.

    Returns:
        The records as a list.

    Raises:
        ValueError: On an empty file name, an empty (or whitespace-only) caption,
            a duplicate file name, or no records at all.
    """
    records = list(records)
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        where = (
            _where(source, lines[i])
            if lines is not None
            else f"{os.fspath(source)}, record {i}"
        )
        if not isinstance(record.filename, str) or not record.filename.strip():
            raise ValueError(f"{where}: empty image file name.")
        if not isinstance(record.caption, str) or not record.caption.strip():
            raise ValueError(
                f"{where}: image {record.filename!r} has an empty caption."
            )
        first = seen.setdefault(record.filename, i)
        if first != i:
            first_where = (
                f"line {lines[first]}" if lines is not None else f"record {first}"
            )
            raise ValueError(
                f"{where}: duplicate file name {record.filename!r} (first at "
                f"{first_where}); each image needs exactly one caption."
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


def read_csv_captions(
    path: str | os.PathLike[str],
    *,
    sep: str = "\t",
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
) -> list[CaptionRecord]:
    """Reads an open_clip-style CSV/TSV captions file (with a header row).

    The defaults match ``open_clip_train``'s ``--csv-separator``, ``--csv-img-key`` and
    ``--csv-caption-key``, so the file given to ``--train-data`` reads as is.

    Args:
        path: The CSV/TSV file.
        sep: Column separator (tab by default, as open_clip_train).
        img_key: Column holding the image path.
        caption_key: Column holding the caption.
        label_key: Optional column holding an integer label.

    Returns:
        One record per data row, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be decoded, lacks a header or a column, a row has
            the wrong number of fields, a caption is empty, or a file name repeats.
    """
    wanted = [img_key, caption_key] + ([label_key] if label_key is not None else [])
    records: list[CaptionRecord] = []
    lines: list[int] = []
    with _open_text(path) as handle:
        try:
            reader = csv.DictReader(handle, delimiter=sep, restkey="\0extra")
            columns = reader.fieldnames
            if not columns:
                raise ValueError(
                    f"{os.fspath(path)}: empty file, expected a header row."
                )
            missing = [key for key in wanted if key not in columns]
            if missing:
                hint = ""
                if len(columns) == 1 and sep not in columns[0]:
                    hint = f" Is the separator right (got {sep!r})?"
                raise ValueError(
                    f"{os.fspath(path)}: missing column(s) {missing}; the header has "
                    f"{list(columns)}.{hint}"
                )
            for row in reader:
                where = _where(path, reader.line_num)
                if "\0extra" in row or any(row.get(key) is None for key in columns):
                    raise ValueError(
                        f"{where}: expected {len(columns)} fields separated by {sep!r}."
                    )
                label = (
                    _parse_label(row[label_key].strip(), where, label_key)
                    if label_key is not None
                    else None
                )
                records.append(CaptionRecord(row[img_key], row[caption_key], label))
                lines.append(reader.line_num)
        except UnicodeDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({err}).") from err
        except csv.Error as err:
            raise ValueError(f"{os.fspath(path)}: malformed CSV ({err}).") from err
    return validate_records(records, source=path, lines=lines)


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
    if "{}" not in template:
        raise ValueError(
            f"template must contain '{{}}' for the class name, got {template!r}."
        )
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


def detect_format(source: str | os.PathLike[str], *, captions_file: Any = None) -> str:
    """Guesses the caption format of a source path.

    A folder with a ``captions.csv`` sidecar (or an explicit ``captions_file``) is
    ``"folder"``, any other folder ``"classes"``; ``*.jsonl``/``*.json`` files are
    ``"jsonl"``; anything else is open_clip ``"csv"``.

    Args:
        source: File or folder.
        captions_file: Sidecar file given explicitly, if any.

    Returns:
        One of ``"csv"``, ``"jsonl"``, ``"folder"``, ``"classes"``.
    """
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
        fmt: ``"csv"``, ``"jsonl"``, ``"folder"`` (sidecar), ``"classes"``, or
            ``"auto"`` (see :func:`detect_format`).
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
    }
    if fmt not in readers:
        raise ValueError(
            f"Unknown captions format {fmt!r}; use one of {['auto', *readers]}."
        )
    return readers[fmt](source, **kwargs)
