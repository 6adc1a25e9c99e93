"""One flat-coloured 8x8 image file per PIL mode and its hand-computed mean in [0, 1].

PIL's ``convert("RGB")`` (torchvision's and lightly's loaders) clips 16- and 32-bit
grey values at 255, so a mid-grey ``I;16`` image comes out white (mean 1.0; issue 21,
wrong 6). The expected means are those of the RGB image an 8-bit loader must give.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (8, 8)


def _palette() -> Image.Image:
    image = Image.new("P", SIZE, 0)
    image.putpalette([10, 200, 30] + [0] * 765)
    return image


def _grey(value: int, dtype: str) -> Image.Image:
    data = np.full(SIZE, value, dtype=dtype)
    if dtype == ">u2":  # big-endian 16-bit: PIL has no array interface for it
        return Image.frombytes("I;16B", SIZE, data.tobytes())
    return Image.fromarray(data)


#: file name: (image, the mode PIL opens the file in, expected mean)
MODES: dict[str, tuple[Callable[[], Image.Image], str, float]] = {
    "L.png": (lambda: Image.new("L", SIZE, 100), "L", 100 / 255),
    "P.png": (_palette, "P", (10 + 200 + 30) / 3 / 255),
    "RGBA.png": (
        lambda: Image.new("RGBA", SIZE, (200, 100, 50, 255)),
        "RGBA",
        350 / 3 / 255,
    ),
    # CMYK (55, 155, 205, 0) is RGB (255 - 55, 255 - 155, 255 - 205).
    "CMYK.tif": (
        lambda: Image.new("CMYK", SIZE, (55, 155, 205, 0)),
        "CMYK",
        350 / 3 / 255,
    ),
    "I16.png": (lambda: _grey(32768, "uint16"), "I;16", 32768 / 65535),
    "I16B.tif": (lambda: _grey(16384, ">u2"), "I;16B", 16384 / 65535),
    "I16.pgm": (lambda: _grey(32768, "uint16"), "I", 32768 / 65535),  # PIL: mode I
    "I32.tif": (lambda: _grey(49152, "int32"), "I", 49152 / 65535),
    "I32_wide.tif": (lambda: _grey(2**30, "int32"), "I", 2**30 / (2**31 - 1)),
}
#: The modes PIL's RGB conversion turns white.
WIDE = {name for name, (_, mode, _) in MODES.items() if mode.startswith("I")}
#: An 8-bit loader rounds: at most half a grey level off.
ATOL = 0.5 / 255 + 1e-9


def write_mode_images(folder: Path) -> dict[str, float]:
    """Writes every :data:`MODES` image into ``folder``; returns name -> mean."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (make, mode, _) in MODES.items():
        make().save(folder / name)
        with Image.open(folder / name) as image:
            assert image.mode == mode, (name, image.mode)
    return {name: mean for name, (_, _, mean) in MODES.items()}


def mean_of(image: Image.Image) -> float:
    """The mean of an RGB image in [0, 1]."""
    assert image.mode == "RGB"
    return float(np.asarray(image, dtype=np.float64).mean() / 255)
