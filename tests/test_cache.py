"""Tests of the caption-embedding cache: round trip, resume, refusal, CLI."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from xclr_plugin.cache import (
    DATA_FILE,
    KEYS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    CaptionCache,
    CaptionTable,
    build_caption_cache,
)
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.text import TextEncoder

FP16_ATOL = 2e-3  # float16 keeps ~3 decimal digits of unit-norm vectors

WORDS = [
    "cat",
    "dog",
    "horse",
    "car",
    "boat",
    "plane",
    "tree",
    "flower",
    "house",
    "bridge",
    "river",
    "mountain",
]
RECORDS = [
    CaptionRecord(f"img_{i:02d}.png", f"a {adj} photo of a {word}", i % 3)
    for i, (adj, word) in enumerate(
        (adj, word) for adj in ("blurry", "bright", "small") for word in WORDS
    )
]  # 36 records


class RecordingEncoder:
    """Wraps an encoder, records what it embeds and can fail on a given call."""

    def __init__(
        self,
        inner: TextEncoder,
        fail_on_call: int | None = None,
        name: str | None = None,
    ) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.dim = inner.dim
        self.fail_on_call = fail_on_call
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner.encode(texts)

    @property
    def embedded(self) -> list[str]:
        return [t for call in self.calls for t in call]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def reference(encoder: TextEncoder) -> torch.Tensor:
    return encoder.encode([r.caption for r in RECORDS])


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, encoder: TextEncoder
) -> CaptionCache:
    return build_caption_cache(
        RECORDS,
        tmp_path_factory.mktemp("cache"),
        encoder,
        chunk_size=10,
        progress=False,
    )


def _copy_cache(cache: CaptionCache, dst: Path) -> Path:
    dst.mkdir()
    for name in (MANIFEST_FILE, KEYS_FILE, DATA_FILE):
        (dst / name).write_bytes((cache.path / name).read_bytes())
    return dst


# -- round trip and lookups --------------------------------------------------------


def test_round_trip_float16(built: CaptionCache, reference: torch.Tensor) -> None:
    assert sorted(p.name for p in built.path.iterdir()) == [
        LOCK_FILE,
        DATA_FILE,
        KEYS_FILE,
        MANIFEST_FILE,
    ]
    assert built.manifest["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (built.dim, built.dtype, built.count, len(built)) == (384, "float16", 36, 36)
    assert built.array.dtype == np.float16 and isinstance(built.array, np.memmap)
    rows = built[:]
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, reference, atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(36), atol=1e-6, rtol=0)


def test_lookup_by_index_and_filename(
    built: CaptionCache, reference: torch.Tensor
) -> None:
    torch.testing.assert_close(built[5], reference[5], atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(built[-1], reference[35], atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(
        built[[3, 0, 3]], reference[[3, 0, 3]], atol=FP16_ATOL, rtol=0
    )
    torch.testing.assert_close(
        built[torch.tensor([7, 2])], reference[[7, 2]], atol=FP16_ATOL, rtol=0
    )
    assert built[[]].shape == (0, 384)
    assert built.filenames == [r.filename for r in RECORDS]
    assert built.index_of("img_07.png") == 7
    torch.testing.assert_close(
        built.lookup(["img_07.png", "img_02.png"]),
        reference[[7, 2]],
        atol=FP16_ATOL,
        rtol=0,
    )
    with pytest.raises(IndexError):
        built[36]
    with pytest.raises(ValueError, match=r"No caption embedding for image 'nope\.png'"):
        built.lookup(["nope.png"])


def test_round_trip_float32(
    tmp_path: Path, encoder: TextEncoder, reference: torch.Tensor
) -> None:
    cache = build_caption_cache(
        RECORDS[:8], tmp_path, encoder, dtype="float32", progress=False
    )
    assert cache.array.dtype == np.float32
    torch.testing.assert_close(cache[:], reference[:8], atol=1e-5, rtol=0)


def test_caption_table_matches_cache(encoder: TextEncoder, built: CaptionCache) -> None:
    table = CaptionTable.from_records(RECORDS, encoder)
    assert (table.dim, len(table)) == (384, 36)
    names = ["img_30.png", "img_01.png"]
    torch.testing.assert_close(
        table.lookup(names), built.lookup(names), atol=FP16_ATOL, rtol=0
    )
    table = pickle.loads(pickle.dumps(table))
    torch.testing.assert_close(table[[1]], built[[1]], atol=FP16_ATOL, rtol=0)


def test_pickle_drops_the_memmap(built: CaptionCache) -> None:
    built.lookup(["img_00.png"])  # maps the array and builds the key index
    assert built._array is not None
    clone = pickle.loads(pickle.dumps(built))
    assert clone._array is None and clone._index is None
    assert len(pickle.dumps(built)) < 4096  # no vectors travel to workers
    torch.testing.assert_close(clone[[4]], built[[4]])


def test_open_checks_against_encoder_and_records(
    built: CaptionCache, encoder: TextEncoder
) -> None:
    cache = CaptionCache.open(
        built.path, encoder=encoder, records=RECORDS, verify_checksum=True
    )
    assert cache.count == 36


# -- building again and resuming --------------------------------------------------


def test_rebuild_of_same_content_embeds_nothing(
    built: CaptionCache, encoder: TextEncoder
) -> None:
    recorder = RecordingEncoder(encoder)
    again = build_caption_cache(
        RECORDS, built.path, recorder, chunk_size=10, progress=False
    )
    assert recorder.calls == []
    assert again.manifest == built.manifest


def test_resume_after_interruption_between_chunks(
    tmp_path: Path, encoder: TextEncoder, reference: torch.Tensor
) -> None:
    recorder = RecordingEncoder(encoder)

    def stop_after_two_chunks(rows_done: int, total: int) -> None:
        if rows_done == 20:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        build_caption_cache(
            RECORDS,
            tmp_path,
            recorder,
            chunk_size=10,
            progress=False,
            on_chunk=stop_after_two_chunks,
        )
    assert not (tmp_path / MANIFEST_FILE).exists()
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["rows_done"] == 20
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        CaptionCache.open(tmp_path)

    resumed = RecordingEncoder(encoder)
    cache = build_caption_cache(
        RECORDS, tmp_path, resumed, chunk_size=10, progress=False
    )
    # Only the 16 missing rows were embedded, each exactly once.
    assert resumed.embedded == [r.caption for r in RECORDS[20:]]
    assert recorder.embedded == [r.caption for r in RECORDS[:20]]
    assert (
        not (tmp_path / PROGRESS_FILE).exists()
        and not (tmp_path / PARTIAL_FILE).exists()
    )
    rows = cache[:]
    torch.testing.assert_close(
        rows, reference, atol=FP16_ATOL, rtol=0
    )  # none missing/duplicated
    CaptionCache.open(tmp_path, encoder=encoder, records=RECORDS, verify_checksum=True)


def test_resume_after_failure_inside_a_chunk(
    tmp_path: Path, encoder: TextEncoder, reference: torch.Tensor
) -> None:
    failing = RecordingEncoder(
        encoder, fail_on_call=3
    )  # dies while embedding rows 16-23
    with pytest.raises(KeyboardInterrupt):
        build_caption_cache(RECORDS, tmp_path, failing, chunk_size=8, progress=False)
    resumed = RecordingEncoder(encoder)
    # A different chunk size on resume is fine: progress is counted in rows.
    cache = build_caption_cache(
        RECORDS, tmp_path, resumed, chunk_size=5, progress=False
    )
    assert resumed.embedded == [r.caption for r in RECORDS[16:]]
    torch.testing.assert_close(cache[:], reference, atol=FP16_ATOL, rtol=0)


def test_interrupted_build_of_other_captions_is_not_resumed(
    tmp_path: Path, encoder: TextEncoder
) -> None:
    with pytest.raises(KeyboardInterrupt):
        build_caption_cache(
            RECORDS[:12],
            tmp_path,
            RecordingEncoder(encoder, fail_on_call=2),
            chunk_size=4,
            progress=False,
        )
    changed = [*RECORDS[:11], CaptionRecord("img_11.png", "a different caption")]
    recorder = RecordingEncoder(encoder)
    build_caption_cache(changed, tmp_path, recorder, chunk_size=4, progress=False)
    assert recorder.embedded == [r.caption for r in changed]


def test_interruption_between_data_and_manifest(
    tmp_path: Path, encoder: TextEncoder
) -> None:
    cache = build_caption_cache(RECORDS[:6], tmp_path, encoder, progress=False)
    progress = {
        "fingerprint": {
            k: cache.manifest[k]
            for k in (
                "encoder",
                "dim",
                "dtype",
                "count",
                "captions_sha256",
                "keys_sha256",
            )
        },
        "rows_done": 6,
    }
    (tmp_path / MANIFEST_FILE).unlink()
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(progress))
    recorder = RecordingEncoder(encoder)
    again = build_caption_cache(RECORDS[:6], tmp_path, recorder, progress=False)
    assert recorder.calls == []
    assert again.manifest["data_sha256"] == cache.manifest["data_sha256"]


# -- refusing caches that do not match ----------------------------------------------


def test_refuses_other_encoder(built: CaptionCache, encoder: TextEncoder) -> None:
    with pytest.raises(
        ValueError,
        match=r"encoder: cache has 'sentence-transformers/all-MiniLM-L6-v2', expected 'other/model'",
    ) as info:
        CaptionCache.open(built.path, encoder="other/model")
    assert str(built.path) in str(info.value)
    with pytest.raises(ValueError, match="encoder"):
        CaptionCache.open(
            built.path, encoder=RecordingEncoder(encoder, name="other/model")
        )


def test_refuses_other_captions_or_keys(built: CaptionCache) -> None:
    changed = [*RECORDS[:-1], CaptionRecord(RECORDS[-1].filename, "another caption")]
    with pytest.raises(ValueError, match="captions_sha256") as info:
        CaptionCache.open(built.path, records=changed)
    assert "keys_sha256" not in str(info.value)
    renamed = [*RECORDS[:-1], CaptionRecord("renamed.png", RECORDS[-1].caption)]
    with pytest.raises(ValueError, match="keys_sha256"):
        CaptionCache.open(built.path, records=renamed)
    with pytest.raises(ValueError, match="count: cache has 36, expected 35"):
        CaptionCache.open(built.path, records=RECORDS[:-1])


def test_refuses_truncated_or_extended_data(
    built: CaptionCache, tmp_path: Path
) -> None:
    path = _copy_cache(built, tmp_path / "truncated")
    data = (path / DATA_FILE).read_bytes()
    (path / DATA_FILE).write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        CaptionCache.open(path)
    assert str(path / DATA_FILE) in str(info.value)
    (path / DATA_FILE).write_bytes(data + b"\0" * 16)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CaptionCache.open(path)
    (path / DATA_FILE).write_bytes(data[:50])  # header cut
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CaptionCache.open(path)
    (path / DATA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="data file is missing"):
        CaptionCache.open(path)


def test_checksum_catches_flipped_bytes(built: CaptionCache, tmp_path: Path) -> None:
    path = _copy_cache(built, tmp_path / "flipped")
    data = bytearray((path / DATA_FILE).read_bytes())
    data[-3] ^= 0xFF
    (path / DATA_FILE).write_bytes(bytes(data))
    CaptionCache.open(path)  # same size and header: only the checksum can tell
    with pytest.raises(ValueError, match="sha256"):
        CaptionCache.open(path, verify_checksum=True)


def test_refuses_corrupt_manifest_or_keys(built: CaptionCache, tmp_path: Path) -> None:
    path = _copy_cache(built, tmp_path / "manifest")
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="Corrupt caption cache manifest"):
        CaptionCache.open(path)
    manifest = dict(built.manifest, dim=512)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"\(36, 384\) float16 array; the manifest expects \(36, 512\)"
    ):
        CaptionCache.open(path)
    (path / MANIFEST_FILE).write_text(json.dumps(dict(built.manifest, version=99)))
    with pytest.raises(ValueError, match="version"):
        CaptionCache.open(path)
    (path / MANIFEST_FILE).write_text(json.dumps(built.manifest))
    keys = json.loads((path / KEYS_FILE).read_text())
    (path / KEYS_FILE).write_text(json.dumps(keys[::-1]))
    with pytest.raises(ValueError, match="keys file"):
        CaptionCache.open(path).lookup(["img_00.png"])


def test_build_refuses_to_replace_a_different_cache(
    built: CaptionCache, tmp_path: Path, encoder: TextEncoder
) -> None:
    path = _copy_cache(built, tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"already holds a different caption cache.*overwrite"
    ):
        build_caption_cache(RECORDS[:4], path, encoder, progress=False)
    cache = build_caption_cache(
        RECORDS[:4], path, encoder, overwrite=True, progress=False
    )
    assert cache.count == 4 and cache.filenames == [r.filename for r in RECORDS[:4]]


def test_build_repairs_a_damaged_cache_of_same_content(
    tmp_path: Path, encoder: TextEncoder
) -> None:
    cache = build_caption_cache(RECORDS[:5], tmp_path, encoder, progress=False)
    data = (tmp_path / DATA_FILE).read_bytes()
    (tmp_path / DATA_FILE).write_bytes(data[:-10])
    repaired = build_caption_cache(RECORDS[:5], tmp_path, encoder, progress=False)
    assert repaired.manifest["data_sha256"] == cache.manifest["data_sha256"]


def test_build_rejects_bad_encoder_output_and_arguments(
    tmp_path: Path, encoder: TextEncoder
) -> None:
    class Broken:
        name, dim = "broken", 4

        def __init__(self, values: torch.Tensor) -> None:
            self.values = values

        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            return self.values

    with pytest.raises(ValueError, match=r"returned shape \(3, 4\) for 2 captions"):
        build_caption_cache(
            RECORDS[:2], tmp_path / "a", Broken(torch.ones(3, 4)), progress=False
        )
    with pytest.raises(ValueError, match="non-finite"):
        build_caption_cache(
            RECORDS[:2],
            tmp_path / "b",
            Broken(torch.full((2, 4), float("nan"))),
            progress=False,
        )
    with pytest.raises(ValueError, match="dtype"):
        build_caption_cache(RECORDS[:2], tmp_path / "c", encoder, dtype="int8")
    with pytest.raises(ValueError, match="duplicate file name"):
        build_caption_cache([RECORDS[0], RECORDS[0]], tmp_path / "d", encoder)


# -- non-finite rows (issue 12, wrong #1) ----------------------------------------------


def test_open_check_finite_names_folder_count_and_first_key(
    built: CaptionCache, tmp_path: Path
) -> None:
    path = _copy_cache(built, tmp_path / "nan")
    array = np.load(path / DATA_FILE, mmap_mode="r+")
    array[7, 3] = np.nan
    array[20, 0] = np.inf
    array.flush()
    del array
    CaptionCache.open(path)  # the default open does not read the rows
    with pytest.raises(ValueError) as info:
        CaptionCache.open(path, records=RECORDS, check_finite=True)
    message = str(info.value)
    assert str(path) in message and "2 row(s)" in message
    assert "'img_07.png'" in message
    # Chunk boundaries do not change the count or the first row.
    with pytest.raises(ValueError, match=r"2 row\(s\).*row 7 \(key 'img_07\.png'\)"):
        CaptionCache.open(path).check_finite(chunk_rows=5)
    CaptionCache.open(built.path, check_finite=True)  # a clean cache passes


def test_caption_table_refuses_non_finite_embeddings(encoder: TextEncoder) -> None:
    values = torch.randn(4, 8)
    values[2, 1] = float("nan")
    values[3, 0] = -float("inf")
    with pytest.raises(
        ValueError, match=r"2 row\(s\) with NaN or infinite.*row 2 \(key 'c'\)"
    ):
        CaptionTable(values, ["a", "b", "c", "d"])

    class NaNEncoder:
        name, dim = "nan", 8

        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            out = torch.ones(len(texts), 8)
            out[1] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"1 row\(s\).*'img_01\.png'"):
        CaptionTable.from_records(RECORDS[:3], NaNEncoder())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        CaptionTable(np.ones((2, 3)), ["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        CaptionTable(torch.ones(2, 3, dtype=torch.int64), ["a", "b"])
