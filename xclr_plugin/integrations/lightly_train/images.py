"""The images of ``input_dir``, listed as ``LightlyDataset`` lists them, and checked."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightly.data import LightlyDataset
from lightly.data._helpers import IMG_EXTENSIONS
from PIL import Image

__all__ = ["list_images", "verify_images"]


def _check_folder_links(input_dir: str) -> None:
    """Refuses folder links that make torchvision (which follows them) read images
    again: a loop repeats every image until the path is too long, two links to one
    folder double its images."""
    seen, stack = {os.path.realpath(input_dir)}, [input_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise ValueError(
                f"input_dir: the folder {folder} cannot be read: {err}."
            ) from None
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=True):
                    continue
            except OSError:
                continue  # a broken link: verify_images names broken files
            real = os.path.realpath(entry.path)
            if real in seen:
                raise ValueError(
                    f"input_dir: {entry.path} leads to {real}, which input_dir already "
                    "holds (a link loop or a second link to one folder), so its images "
                    "would be read more than once. Remove the link."
                )
            seen.add(real)
            stack.append(entry.path)


def list_images(input_dir: str | None) -> LightlyDataset:
    """The images of ``input_dir`` (no transform yet); ValueError if there are none."""
    if input_dir is None:
        raise ValueError("input_dir is not set: pass input_dir=<image folder>.")
    if not os.path.isdir(input_dir):
        what = "is not a folder" if os.path.exists(input_dir) else "does not exist"
        raise ValueError(f"input_dir {input_dir!r} {what}.")
    _check_folder_links(input_dir)
    try:
        dataset = LightlyDataset(input_dir)
    except PermissionError as err:
        raise ValueError(f"input_dir {input_dir!r} cannot be read: {err}.") from None
    except (RuntimeError, FileNotFoundError) as err:  # "Found 0 files in folder ..."
        raise ValueError(
            f"input_dir {input_dir!r} holds no image files (searched with subfolders; "
            f"extensions {', '.join(IMG_EXTENSIONS)}): {err}"
        ) from None
    if len(dataset) == 0:
        raise ValueError(f"input_dir {input_dir!r} holds no image files.")
    return dataset


def verify_images(input_dir: str, filenames: Sequence[str]) -> None:
    """Opens and verifies every image with PIL, naming the first unreadable one.

    ``verify`` walks the file's structure (for PNG every chunk and its CRC: truncated
    and corrupt files) without decoding pixels; JPEG scan data is not checked.
    """
    bad: list[tuple[str, str]] = []
    for name in filenames:
        path = os.path.join(input_dir, name)
        if not path.lower().endswith(IMG_EXTENSIONS):  # videos: lightly's own reader
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many kinds for many formats
            bad.append((path, f"{type(err).__name__}: {err}"))
    if bad:
        n = len(bad)
        more = f" ({n} of {len(filenames)} images are unreadable)" if n > 1 else ""
        raise ValueError(
            f"the image {bad[0][0]} cannot be read{more}: {bad[0][1]}. Remove or "
            "replace it (or set check_images=false to skip this check)."
        )
