"""JSONL, image-folder (sidecar CSV) and class-folder captions; any source by format."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xclr_plugin.captions.csv_file import open_text, parse_label, read_csv_captions
from xclr_plugin.captions.records import CaptionRecord, validate_records

#: Template of :func:`read_class_captions`, as in CLIP's zero-shot prompts.
DEFAULT_TEMPLATE = "a photo of a {}"
#: Sidecar captions file looked for inside an image folder.
DEFAULT_SIDECAR = "captions.csv"
#: The formats :func:`read_captions` reads.
FORMATS = ("csv", "jsonl", "folder", "classes", "webdataset")


def read_jsonl_captions(
    path: str | os.PathLike[str],
    *,
    img_key: str = "filename",
    caption_key: str = "caption",
    label_key: str | None = None,
) -> list[CaptionRecord]:
    """Reads a JSON Lines captions file (one object per line), naming the line of a problem."""
    records: list[CaptionRecord] = []
    locations: list[str] = []
    keys = [img_key, caption_key] + ([label_key] if label_key else [])
    with open_text(path) as handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{os.fspath(path)}, line {line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err.msg}).") from err
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object.")
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
                label = None
                if label_key is not None:
                    label = parse_label(obj[label_key], where, label_key)
                records.append(CaptionRecord(filename, caption, label))
                locations.append(where)
        except UnicodeDecodeError as err:
            raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({err}).") from err
    return validate_records(records, source=path, where=locations.__getitem__)


def _lightly_folder(image_dir: str | os.PathLike[str]) -> Any:
    """The folder as :class:`lightly.data.LightlyDataset` lists it."""
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
    """Captions of an image folder from a sidecar CSV (default ``image_dir/captions.csv``), one per image."""
    if captions_file is None:
        captions_file = os.path.join(image_dir, DEFAULT_SIDECAR)
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
    targets = getattr(dataset.dataset, "targets", None)
    if not hasattr(dataset.dataset, "classes") or targets is None:
        targets = [None] * len(dataset)
    records: list[CaptionRecord] = []
    for i, filename in enumerate(dataset.get_filenames()):
        caption = by_name.pop(Path(filename).as_posix(), None)
        if caption is None:
            raise ValueError(
                f"Image {filename!r} in {os.fspath(image_dir)} has no caption in "
                f"{os.fspath(captions_file)}."
            )
        label = targets[i]
        records.append(
            CaptionRecord(filename, caption, None if label is None else int(label))
        )
    if by_name:
        raise FileNotFoundError(
            f"{os.fspath(captions_file)} names {len(by_name)} image(s) not found in "
            f"{os.fspath(image_dir)}, e.g. {next(iter(by_name))!r}."
        )
    return records


def check_template(template: Any) -> str:
    """The template if it is text with exactly one ``{}`` field, else a ValueError."""
    if not isinstance(template, str):
        raise ValueError(
            f"template must be a string with one '{{}}' for the class name, got "
            f"{template!r}."
        )
    try:
        fields = [f[1] for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is malformed: {err}.") from err
    if fields != [""]:
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
    """Captions a class folder: ``template.format(name)``, ``name`` from ``class_names`` or the folder."""
    check_template(template)
    dataset = _lightly_folder(image_dir)
    classes = getattr(dataset.dataset, "classes", None)
    if not classes:
        raise ValueError(
            f"{os.fspath(image_dir)} has no class subfolders; use read_folder_captions "
            "with a sidecar captions file for a flat folder."
        )
    names = class_names or {}
    captions = [template.format(names.get(c, c.replace("_", " "))) for c in classes]
    return [
        CaptionRecord(name, captions[int(label)], int(label))
        for name, label in zip(
            dataset.get_filenames(), dataset.dataset.targets, strict=True
        )
    ]


def detect_format(source: str | os.PathLike[str], *, captions_file: Any = None) -> str:
    """The format of a source path: ``.tar`` shards, a folder (with/without sidecar), JSONL, else CSV."""
    text = os.fspath(source)
    if os.path.isdir(text):
        sidecar = os.path.join(text, DEFAULT_SIDECAR)
        return (
            "folder"
            if captions_file is not None or os.path.isfile(sidecar)
            else "classes"
        )
    if all(p.strip().lower().endswith(".tar") for p in text.split("::")):
        return "webdataset"
    return "jsonl" if text.lower().endswith((".jsonl", ".json")) else "csv"


def _read_shards(source: str | os.PathLike[str], **kwargs: Any) -> list[CaptionRecord]:
    from xclr_plugin.captions.shards import read_webdataset_captions

    return read_webdataset_captions(os.fspath(source), **kwargs)


def read_captions(
    source: str | os.PathLike[str], fmt: str = "auto", **kwargs: Any
) -> list[CaptionRecord]:
    """Reads any caption source with the reader of ``fmt`` (one of :data:`FORMATS`, or ``"auto"``)."""
    if fmt == "auto":
        fmt = detect_format(source, captions_file=kwargs.get("captions_file"))
    readers: dict[str, Callable[..., list[CaptionRecord]]] = {
        "csv": read_csv_captions,
        "jsonl": read_jsonl_captions,
        "folder": read_folder_captions,
        "classes": read_class_captions,
        "webdataset": _read_shards,
    }
    if fmt not in readers:
        raise ValueError(
            f"Unknown captions format {fmt!r}; use one of {['auto', *readers]}."
        )
    return readers[fmt](source, **kwargs)
