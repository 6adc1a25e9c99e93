"""caption_lookup: records + optional cache folder + encoder -> one checked lookup."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from xclr_plugin.cache import (
    DATA_FILE,
    CacheMismatchError,
    CaptionCache,
    CaptionTable,
    caption_lookup,
)
from xclr_plugin.captions import CaptionRecord

sys.path.insert(0, str(Path(__file__).parent))
from _cache_builder import HashEncoder

RECORDS = [CaptionRecord(f"img_{i:02d}.png", f"caption number {i}") for i in range(12)]


class Factory:
    """A zero-argument encoder factory that counts its calls."""

    def __init__(self, encoder: HashEncoder | None = None) -> None:
        self.encoder = encoder or HashEncoder()
        self.calls = 0

    def __call__(self) -> HashEncoder:
        self.calls += 1
        return self.encoder


def test_without_a_cache_the_captions_are_embedded_now() -> None:
    load = Factory()
    table = caption_lookup(RECORDS, None, load)
    assert isinstance(table, CaptionTable) and load.calls == 1
    want = HashEncoder().encode([r.caption for r in RECORDS])
    torch.testing.assert_close(table.lookup(["img_03.png"]), want[3:4])

    class NaN(HashEncoder):
        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            out = super().encode(texts)
            out[2, 0] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN.*'img_02\.png'"):
        caption_lookup(RECORDS, None, NaN())
    with pytest.raises(TypeError, match="records must be a sequence of CaptionRecord"):
        caption_lookup(None, None, load)  # type: ignore[arg-type]


def test_distinct_captions_are_embedded_once() -> None:
    encoder = HashEncoder()
    records = [
        CaptionRecord(f"{i}.png", f"a photo of a {'cat' if i % 2 else 'dog'}")
        for i in range(6)
    ]
    table = caption_lookup(records, None, encoder, distinct=True)
    assert encoder.embedded == 2
    want = HashEncoder().encode([r.caption for r in records])
    torch.testing.assert_close(table[:], want)


def test_repeated_file_names_without_a_cache_are_read_by_row() -> None:
    """An open_clip CSV may caption one image several times."""
    records = [CaptionRecord("a.png", "a cat"), CaptionRecord("a.png", "a kitten")]
    table = caption_lookup(records, None, HashEncoder())
    assert table[[0, 1]].shape == (2, 16)
    with pytest.raises(ValueError, match="has several"):
        table.lookup(["a.png"])
    with pytest.raises(ValueError, match=r"duplicate file name 'a\.png'"):
        caption_lookup(records, Path("unused"), HashEncoder())


def test_a_finished_cache_is_opened_without_the_encoder(tmp_path: Path) -> None:
    load = Factory()
    built = caption_lookup(RECORDS, tmp_path / "c", load, encoder_name="hash-encoder")
    assert isinstance(built, CaptionCache) and load.calls == 1 and built.rows_checked
    again = caption_lookup(RECORDS, tmp_path / "c", load, encoder_name="hash-encoder")
    assert (
        isinstance(again, CaptionCache) and load.calls == 1 and again.rows_checked
    )  # not loaded; rows read once
    torch.testing.assert_close(again[:], built[:])
    # An encoder object names itself; None accepts any encoder's cache.
    assert caption_lookup(RECORDS, tmp_path / "c", HashEncoder(), build=False)
    assert caption_lookup(RECORDS, tmp_path / "c", Factory(), build=False)


def test_other_encoder_or_records_are_refused(tmp_path: Path) -> None:
    caption_lookup(RECORDS, tmp_path / "c", HashEncoder())
    with pytest.raises(CacheMismatchError, match="encoder: cache has 'hash-encoder'"):
        caption_lookup(
            RECORDS, tmp_path / "c", Factory(), encoder_name="other", build=False
        )
    with pytest.raises(CacheMismatchError, match="count: cache has 12, expected 11"):
        caption_lookup(RECORDS[:11], tmp_path / "c", Factory(), build=False)
    load = Factory()  # with build=True: refused by the builder, never replaced
    with pytest.raises(ValueError, match="already holds a different caption cache"):
        caption_lookup(RECORDS[:11], tmp_path / "c", load)
    assert load.calls == 1


def test_missing_cache_is_built_or_reported(tmp_path: Path) -> None:
    load = Factory()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        caption_lookup(RECORDS, tmp_path / "c", load, build=False)
    assert load.calls == 0 and not (tmp_path / "c").exists()
    cache = caption_lookup(
        RECORDS, tmp_path / "c", load, dtype="float32", progress=False
    )
    assert isinstance(cache, CaptionCache)
    assert load.calls == 1 and cache.dtype == "float32"


def test_non_finite_rows_are_refused_naming_the_cache(tmp_path: Path) -> None:
    caption_lookup(RECORDS, tmp_path / "c", HashEncoder())
    array = np.load(tmp_path / "c" / DATA_FILE, mmap_mode="r+")
    array[4, 1] = np.inf
    array.flush()
    del array
    with pytest.raises(ValueError, match=r"NaN or infinite.*'img_04\.png'") as info:
        caption_lookup(RECORDS, tmp_path / "c", Factory(), build=False)
    assert str(tmp_path / "c") in str(info.value)
