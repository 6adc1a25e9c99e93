"""Caption cache against damaged files, hostile inputs, wrong types and locks.

Issue 12: a flipped header byte (wrong #3), a deleted keys.json (wrong #4), file
permissions (rough); the command's flag errors are in test_embed_captions_cli.py.
Builds use a deterministic hash encoder (no model), so every row has a known value.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import pytest
import torch

from xclr_plugin.cache import (
    DATA_FILE,
    KEYS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    CaptionCache,
    CaptionTable,
    build_caption_cache,
)
from xclr_plugin.captions import CaptionRecord

sys.path.insert(0, str(Path(__file__).parent))
from _cache_builder import HashEncoder

RECORDS = [CaptionRecord(f"img_{i:02d}.png", f"caption number {i}") for i in range(12)]
FP16_ATOL = 2e-3


class CountingEncoder(HashEncoder):
    """The hash encoder, counting the captions it embeds."""


@pytest.fixture()
def built(tmp_path: Path) -> CaptionCache:
    return build_caption_cache(
        RECORDS, tmp_path / "cache", HashEncoder(), chunk_size=5, progress=False
    )


def _expected() -> torch.Tensor:
    return HashEncoder().encode([r.caption for r in RECORDS])


def _header_length(path: Path) -> int:
    data = path.read_bytes()
    assert data[:6] == b"\x93NUMPY"
    return 10 + int.from_bytes(data[8:10], "little")


# -- damaged files (wrong #3, #4) ----------------------------------------------------


def test_every_flipped_header_byte_is_refused_naming_the_file(
    built: CaptionCache,
) -> None:
    """Wrong #3: one flipped byte gave tokenize.TokenError, naming no file."""
    data_path = built.path / DATA_FILE
    original = data_path.read_bytes()
    header = _header_length(data_path)
    outcomes: dict[str, int] = {}
    for position in range(header):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        data_path.write_bytes(bytes(damaged))
        try:
            CaptionCache.open(built.path)
        except ValueError as err:
            assert str(data_path) in str(err), (position, err)
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        else:
            # Only a flip numpy cannot see may pass: the array must still be intact.
            outcomes["opened"] = outcomes.get("opened", 0) + 1
    data_path.write_bytes(original)
    assert outcomes.get("refused", 0) >= header - 2, outcomes


@pytest.mark.parametrize("position", ["quote", "paren"])
def test_builder_rebuilds_a_cache_with_a_damaged_header(
    built: CaptionCache, position: str
) -> None:
    data_path = built.path / DATA_FILE
    damaged = bytearray(data_path.read_bytes())
    header = bytes(damaged[: _header_length(data_path)])
    # These flips raised tokenize.TokenError / SyntaxError from numpy on 93d1533.
    index = header.index(b"'") if position == "quote" else header.index(b"(")
    damaged[index] ^= 0xFF
    data_path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        CaptionCache.open(built.path)
    assert str(data_path) in str(info.value)
    encoder = CountingEncoder()
    repaired = build_caption_cache(
        RECORDS, built.path, encoder, chunk_size=5, progress=False
    )
    assert encoder.embedded == len(RECORDS)
    assert repaired.manifest["data_sha256"] == built.manifest["data_sha256"]
    torch.testing.assert_close(repaired[:], _expected(), atol=FP16_ATOL, rtol=0)


def test_missing_or_damaged_keys_file_is_refused_at_open(built: CaptionCache) -> None:
    """Wrong #4: a deleted keys.json was accepted; training failed inside epoch 0."""
    keys_path = built.path / KEYS_FILE
    keys = keys_path.read_text()
    keys_path.unlink()
    with pytest.raises(FileNotFoundError, match="keys file is missing") as info:
        CaptionCache.open(built.path)
    assert str(keys_path) in str(info.value)
    keys_path.write_text(json.dumps(json.loads(keys)[:-1]))
    with pytest.raises(ValueError, match=r"keys file .* does not match the manifest"):
        CaptionCache.open(built.path)
    keys_path.write_bytes(b"\xff\xfe[")
    with pytest.raises(ValueError, match="Corrupt caption cache keys file"):
        CaptionCache.open(built.path)
    keys_path.unlink()
    encoder = CountingEncoder()
    repaired = build_caption_cache(RECORDS, built.path, encoder, progress=False)
    assert repaired.filenames == [r.filename for r in RECORDS]


def test_hostile_data_files(built: CaptionCache, tmp_path: Path) -> None:
    data_path = built.path / DATA_FILE
    original = data_path.read_bytes()
    # A header announcing a huge array over a small file.
    huge = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float16))
    huge["shape"] = (10**12, 16)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, huge)
    data_path.write_bytes(buffer.getvalue() + original[_header_length(data_path) :])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CaptionCache.open(built.path)
    # A header longer than numpy accepts.
    data_path.write_bytes(b"\x93NUMPY\x02\x00" + (200_000).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CaptionCache.open(built.path)
    # Right shape, wrong dtype.
    np.save(data_path, np.ones((len(RECORDS), 16), np.float64))
    with pytest.raises(ValueError, match="float64 array; the manifest expects"):
        CaptionCache.open(built.path)
    # Not a regular file.
    data_path.unlink()
    data_path.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        CaptionCache.open(built.path)
    data_path.rmdir()
    # A symlink to an intact copy is fine; to a missing file, "missing".
    copy = tmp_path / "elsewhere.npy"
    copy.write_bytes(original)
    data_path.symlink_to(copy)
    CaptionCache.open(built.path, verify_checksum=True, check_finite=True)
    copy.unlink()
    with pytest.raises(FileNotFoundError, match="data file is missing"):
        CaptionCache.open(built.path)


def test_nan_and_zero_rows_in_the_data_file(built: CaptionCache) -> None:
    array = np.load(built.path / DATA_FILE, mmap_mode="r+")
    array[3] = 0
    array.flush()
    del array
    with pytest.raises(ValueError, match=r"1 all-zero row\(s\).*'img_03\.png'"):
        CaptionCache.open(built.path, check_finite=True)
    # A build of the same content with verify=True repairs it.
    encoder = CountingEncoder()
    build_caption_cache(RECORDS, built.path, encoder, progress=False, verify=True)
    assert encoder.embedded == len(RECORDS)
    CaptionCache.open(built.path, check_finite=True, verify_checksum=True)


def test_open_names_what_is_wrong_with_the_folder(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileNotFoundError, match="it is a file, not a cache folder"):
        CaptionCache.open(file)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        CaptionCache.open(tmp_path / "nothing")
    # A real build, paused inside its first chunk, holds the lock.
    started, go = threading.Event(), threading.Event()

    class Paused(HashEncoder):
        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            started.set()
            go.wait(60)
            return super().encode(texts)

    building = tmp_path / "building"
    thread = threading.Thread(
        target=build_caption_cache,
        args=(RECORDS, building, Paused()),
        kwargs={"progress": False},
    )
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(FileNotFoundError, match="building it right now") as info:
            CaptionCache.open(building)
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        go.set()
        thread.join()
    CaptionCache.open(building, records=RECORDS, check_finite=True)


def test_lock_timeout(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    with (
        filelock.FileLock(out / LOCK_FILE),
        pytest.raises(TimeoutError, match="still building the caption cache"),
    ):
        build_caption_cache(
            RECORDS, out, HashEncoder(), progress=False, lock_timeout=0.3
        )
    build_caption_cache(RECORDS, out, HashEncoder(), progress=False, lock_timeout=0.3)


# -- permissions (rough) -------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_cache_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """manifest.json and keys.json were 0600 while embeddings.npy was 0644."""
    old = os.umask(umask)
    try:
        cache = build_caption_cache(
            RECORDS, tmp_path / "cache", HashEncoder(), progress=False
        )
    finally:
        os.umask(old)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in cache.path.iterdir()
        if p.is_file()
    }
    assert modes == dict.fromkeys(
        [DATA_FILE, KEYS_FILE, MANIFEST_FILE, LOCK_FILE], mode
    )


# -- wrong types to public functions -----------------------------------------------


def test_wrong_types_are_refused_with_clear_errors(
    built: CaptionCache, tmp_path: Path
) -> None:
    out = tmp_path / "x"
    with pytest.raises(TypeError, match="records must be a sequence of CaptionRecord"):
        build_caption_cache("a.png", out, HashEncoder())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a CaptionRecord, got tuple"):
        build_caption_cache([("a.png", "cat")], out, HashEncoder())  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"encoder must have a str \.name"):
        build_caption_cache(RECORDS, out, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        build_caption_cache(RECORDS, out, HashEncoder(), chunk_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_caption_cache(RECORDS, out, HashEncoder(), dtype="bfloat16")
    with pytest.raises(ValueError, match="lock_timeout"):
        build_caption_cache(RECORDS, out, HashEncoder(), lock_timeout=-1)
    with pytest.raises(TypeError, match="out_dir must be a folder path"):
        build_caption_cache(RECORDS, 5, HashEncoder())  # type: ignore[arg-type]
    assert not out.exists()  # nothing created before the arguments were checked
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        build_caption_cache(RECORDS, tmp_path / "f", HashEncoder())
    cache = build_caption_cache(
        RECORDS, tmp_path / "np", HashEncoder(), dtype=np.float32, progress=False
    )
    assert cache.dtype == "float32"
    with pytest.raises(TypeError, match="path must be a cache folder"):
        CaptionCache.open(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="records must be a sequence"):
        CaptionCache.open(built.path, records="img_00.png")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encoder must be an encoder"):
        CaptionCache.open(built.path, encoder=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filenames must be a sequence"):
        built.lookup("img_00.png")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Row index must be an integer"):
        built[True]
    table = CaptionTable(_expected(), [r.filename for r in RECORDS])
    with pytest.raises(TypeError, match="filenames must be a sequence"):
        table.lookup("img_00.png")  # type: ignore[arg-type]


def test_encoder_output_that_is_not_an_embedding(tmp_path: Path) -> None:
    class Zero(HashEncoder):
        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            out = super().encode(texts)
            out[-1] = 0
            return out

    with pytest.raises(ValueError, match=r"zero or overflows float16 for row 4"):
        build_caption_cache(
            RECORDS[:5], tmp_path / "z", Zero(), chunk_size=5, progress=False
        )

    class Huge(HashEncoder):
        def encode(self, texts: Sequence[str]) -> torch.Tensor:
            return super().encode(texts) * 1e6

    with pytest.raises(ValueError, match="overflows float16"):
        build_caption_cache(RECORDS[:2], tmp_path / "h", Huge(), progress=False)
    cache = build_caption_cache(
        RECORDS[:2], tmp_path / "h32", Huge(), dtype="float32", progress=False
    )
    torch.testing.assert_close(cache[:], _expected()[:2])

    class Listy(HashEncoder):
        def encode(self, texts: Sequence[str]) -> Any:
            return super().encode(texts).tolist()

    with pytest.raises(ValueError, match="returned a list; expected a tensor"):
        build_caption_cache(RECORDS[:2], tmp_path / "l", Listy(), progress=False)


def test_read_only_folder_uses_a_finished_cache(
    built: CaptionCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cache this user cannot write: the lock file cannot be created."""

    class ReadOnly(filelock.FileLock):  # type: ignore[misc, valid-type]
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            raise PermissionError(30, "Read-only file system", str(self.lock_file))

    monkeypatch.setattr(filelock, "FileLock", ReadOnly)
    encoder = CountingEncoder()
    again = build_caption_cache(RECORDS, built.path, encoder, progress=False)
    assert encoder.embedded == 0 and again.manifest == built.manifest
    with pytest.raises(
        ValueError, match=r"Cannot build the caption cache in .*Read-only"
    ):
        build_caption_cache(RECORDS, tmp_path / "empty", encoder, progress=False)


def test_full_disk_is_an_error_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory-mapped write into a sparse file on a full disk is a SIGBUS crash."""
    import errno

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    encoder = CountingEncoder()
    with pytest.raises(OSError, match="Not enough disk space for the caption cache"):
        build_caption_cache(RECORDS, tmp_path / "c", encoder, progress=False)
    assert encoder.embedded == 0


def test_a_worker_refuses_a_data_file_replaced_after_open(built: CaptionCache) -> None:
    """Rebuilt with other captions (same keys) while a job runs: a new DataLoader
    worker used to map the new file under the old manifest, silently."""
    import pickle

    opened = CaptionCache.open(built.path, records=RECORDS)
    worker_copy = pickle.dumps(opened)
    other = [CaptionRecord(r.filename, r.caption + " changed") for r in RECORDS]
    build_caption_cache(
        other, built.path, HashEncoder(), overwrite=True, progress=False
    )
    worker = pickle.loads(worker_copy)
    with pytest.raises(ValueError, match="was replaced after the cache was opened"):
        worker.lookup([RECORDS[0].filename])
    CaptionCache.open(built.path, records=other).lookup([RECORDS[0].filename])
