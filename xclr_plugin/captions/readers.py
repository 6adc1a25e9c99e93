"""JSONL, image-folder (sidecar CSV) and class-folder captions; any source by format."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable
from typing import Any

from xclr_plugin.captions.csv_file import open_text, parse_label, read_csv_captions
from xclr_plugin.captions.records import CaptionRecord, path_key, validate_records

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


def _why_unlisted(key: str, image_dir: str) -> str:
    """Why an image the captions name is not one that ``LightlyDataset`` lists."""
    from lightly.data._helpers import IMG_EXTENSIONS

    if not os.path.isfile(os.path.join(image_dir, key)):
        hint = "; '\\' is not a folder separator here: use '/'" if "\\" in key else ""
        return f"there is no such file (deleted or misspelt?){hint}"
    if key == os.pardir or key.startswith(os.pardir + os.sep):
        return "it lies outside the image folder"
    if not key.lower().endswith(IMG_EXTENSIONS):
        return f"LightlyDataset reads only {', '.join(IMG_EXTENSIONS)}"
    if os.sep not in key:
        return (
            "the file exists, but in a folder with subfolders LightlyDataset lists only "
            "the images inside them (one class per subfolder), not top-level ones"
        )
    return (
        "the file exists, but LightlyDataset does not list it: it skips subfolders "
        "named lightly_outputs, and a folder holding videos is read as videos only"
    )


def match_images(
    records: list[CaptionRecord],
    filenames: list[str],
    image_dir: str | os.PathLike[str],
    *,
    source: str,
    base: str | os.PathLike[str] | None = None,
) -> list[CaptionRecord]:
    """The records of exactly the images ``filenames`` of ``image_dir`` (as
    ``LightlyDataset`` lists them), in their order and under their names.

    A record names an image of ``image_dir`` as written, else as a path relative to
    ``base`` (None: the working directory, as open_clip reads paths) or absolute,
    also through a link; names are compared by :func:`path_key`. ValueError (naming
    ``source``) if two records name one image, an image has no record or a record
    names no listed image.
    """
    folder, where = os.path.abspath(image_dir), os.fspath(image_dir)
    listed: dict[str, str] = {}
    for name in filenames:
        if (twin := listed.setdefault(path_key(name), name)) != name:
            raise ValueError(
                f"{where} holds {twin!a} and {name!a}, one name in two Unicode "
                "normalisations (captions are matched by the NFC name): rename one."
            )

    def key_of(filename: str) -> str:
        if not os.path.isabs(filename) and (key := path_key(filename)) in listed:
            return key
        path = os.path.abspath(os.path.join(base or os.curdir, filename))
        key = path_key(os.path.relpath(path, folder))
        if key not in listed:  # through a link to the folder, or from it
            real = os.path.relpath(os.path.realpath(path), os.path.realpath(folder))
            key = path_key(real) if path_key(real) in listed else key
        return key

    rows: dict[str, int] = {}
    for i, record in enumerate(records):
        if (first := rows.setdefault(key := key_of(record.filename), i)) != i:
            raise ValueError(
                f"{source}: caption rows {first + 1} and {i + 1} (as "
                f"{records[first].filename!r} and {record.filename!r}) both name the "
                f"image {key!r} of {where}; each image needs exactly one caption."
            )
    extra = [key for key in rows if key not in listed]
    unmatched = "" if not extra else f"{records[rows[extra[0]]].filename!r}: {_why_unlisted(extra[0], folder)}"  # fmt: skip
    if missing := [name for name in filenames if path_key(name) not in rows]:
        relative = "the image folder" + ("" if base else " or the working directory")
        raise ValueError(
            f"{source}: the captions do not cover the images: {len(missing)} of "
            f"{len(filenames)} image(s) in {where} have no caption, e.g. "
            f"{missing[0]!r}.{f' The captions name e.g. {unmatched}.' if extra else ''}"
            f" File names in the captions must be relative to {relative} (or absolute)."
        )  # fmt: skip
    if extra:
        raise ValueError(
            f"{source} names {len(extra)} image(s) that are not among the "
            f"{len(filenames)} images LightlyDataset lists in {where}, e.g. "
            f"{unmatched}. Remove those rows or move the images (every captioned "
            "image must be trained on)."
        )
    chosen = [records[rows[path_key(name)]] for name in filenames]
    return [CaptionRecord(n, r.caption, r.label) for n, r in zip(filenames, chosen, strict=True)]  # fmt: skip


def read_folder_captions(
    image_dir: str | os.PathLike[str],
    captions_file: str | os.PathLike[str] | None = None,
    *,
    sep: str = ",",
    img_key: str = "filename",
    caption_key: str = "caption",
) -> list[CaptionRecord]:
    """Captions of an image folder from a sidecar CSV (default ``image_dir/captions.csv``),
    one per image ``LightlyDataset`` lists; names relative to ``image_dir`` or absolute."""
    if captions_file is None:
        captions_file = os.path.join(image_dir, DEFAULT_SIDECAR)
    sidecar = read_csv_captions(
        captions_file, sep=sep, img_key=img_key, caption_key=caption_key
    )
    dataset = _lightly_folder(image_dir)
    targets = getattr(dataset.dataset, "targets", None)
    if not hasattr(dataset.dataset, "classes") or targets is None:
        targets = [None] * len(dataset)
    records = match_images(
        sidecar, dataset.get_filenames(), image_dir,
        source=os.fspath(captions_file), base=image_dir,
    )  # fmt: skip
    return [
        CaptionRecord(r.filename, r.caption, None if label is None else int(label))
        for r, label in zip(records, targets, strict=True)
    ]


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
