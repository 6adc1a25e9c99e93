"""Per-shard caption caches: built by one process or many (torchrun), resumed, checked.

Shards hold tiny stand-in images and real captions; the encoder is the deterministic
:class:`HashEncoder` (the real one is exercised by tests/test_open_clip_webdataset.py).
The oracle of a distributed or resumed build is the one-process build: the same files'
rows, keys and caption digests, bit for bit.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _cache_builder import HashEncoder
from _shard_embed_worker import Encoder

from xclr_plugin.cache.shards import (
    INDEX_FILE,
    SHARDS_DIR,
    ShardCache,
    caption_digests,
    shard_name,
)
from xclr_plugin.captions.shards import read_shard, read_webdataset_captions
from xclr_plugin.cli.embed_captions import main

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_shard_embed_worker.py"
SHARDS, PER_SHARD = 5, 6


def write_shard(path: Path, samples: list[tuple[str, str]], **members: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        for key, caption in samples:
            for ext, data in (
                ("jpg", b"\xff\xd8" + key.encode()),
                ("txt", caption.encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        samples = [
            (f"{s:02d}{i:03d}", f"caption {i} of shard {s}") for i in range(PER_SHARD)
        ]
        write_shard(root / f"{s:05d}.tar", samples)
    return f"{root}/{{00000..{SHARDS - 1:05d}}}.tar"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def embed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Done]:
    """The command in this process, with the stand-in encoder."""
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", Encoder)

    def run(*args: str) -> Done:
        capsys.readouterr()
        status = main(["--format", "webdataset", "--no-progress", *args])
        out = capsys.readouterr()
        return Done(status, out.out, out.err)

    return run


def torchrun(*args: str, nproc: int, kill: str | None = None) -> Done:
    """The command in ``nproc`` fresh processes under torchrun (gloo)."""
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    env.pop("XCLR_TEST_KILL", None)
    if kill:
        env["XCLR_TEST_KILL"] = kill
    done = subprocess.run(
        [*launcher, str(WORKER), "--format", "webdataset", "--no-progress", *args],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    return Done(done.returncode, done.stdout, done.stderr)


def contents(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((folder / SHARDS_DIR).glob("*.npz")):
        with np.load(path) as data:
            out[path.stem] = {k: data[k] for k in ("keys", "embeddings", "digests")}
    return out


@pytest.mark.distributed
def test_two_processes_killed_and_resumed_equal_one_process(
    shards: str, tmp_path: Path, embed: Callable[..., Done]
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    done = embed(shards, "-o", str(one))
    assert done.returncode == 0, done.stderr
    assert f"{SHARDS * PER_SHARD} captions embedded now by 1 process(es)" in done.stdout

    # Rank 1 dies while writing its second shard file (shards 1 and 3 are its own).
    killed = torchrun(shards, "-o", str(two), nproc=2, kill="1:2")
    assert killed.returncode != 0
    assert not (two / INDEX_FILE).exists()  # no index: the build is not finished
    assert (two / SHARDS_DIR / "00001.npz").exists()
    assert not (two / SHARDS_DIR / "00003.npz").exists()
    assert list((two / SHARDS_DIR).glob(".00003.npz.*.tmp"))  # the interrupted write

    resumed = torchrun(shards, "-o", str(two), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    # Only the unfinished shards are embedded again: 00003 and whatever rank 0 had
    # left when torchrun stopped it.
    redone = int(resumed.stdout.split(" captions embedded now")[0].split()[-1])
    assert PER_SHARD <= redone < SHARDS * PER_SHARD
    assert not list((two / SHARDS_DIR).glob(".*.tmp"))
    got, want = contents(two), contents(one)
    assert list(got) == list(want) == [f"{s:05d}" for s in range(SHARDS)]
    for name in want:
        for key in ("keys", "embeddings", "digests"):
            assert np.array_equal(got[name][key], want[name][key]), (name, key)
    ShardCache.open(two, [f"{shards.split('{')[0]}{s:05d}.tar" for s in range(SHARDS)])


def test_rows_are_the_encoders_in_shard_order(
    shards: str, tmp_path: Path, embed: Callable[..., Done]
) -> None:
    out = tmp_path / "cache"
    assert embed(shards, "-o", str(out), "--dtype", "float32").returncode == 0
    records = read_webdataset_captions(shards)
    urls = [f"{shards.split('{')[0]}{s:05d}.tar" for s in range(SHARDS)]
    cache = ShardCache.open(out, urls, encoder_name="hash-encoder")
    want = HashEncoder().encode([r.caption for r in records]).numpy()
    got = np.stack([cache.target(u, k, c) for u in urls for k, c in read_shard(u)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [k for u in urls for k, _ in read_shard(u)] == [r.filename for r in records]
    again = embed(shards, "-o", str(out), "--dtype", "float32")
    assert "0 captions embedded now" in again.stdout  # finished shards are kept
    with pytest.raises(ValueError, match="built with the encoder 'hash-encoder'"):
        ShardCache.open(out, urls, encoder_name="another")


@pytest.mark.parametrize("layout", ["user-files", "other-settings"])
def test_a_folder_the_builder_did_not_write_is_refused(
    shards: str, tmp_path: Path, layout: str, embed: Callable[..., Done]
) -> None:
    """Issue 21.2: files of the user's own are never replaced without --overwrite."""
    out = tmp_path / "cache"
    if layout == "user-files":
        out.mkdir()
        (out / "keys.json").write_text('["mine"]')
        (out / "embeddings.npy").write_bytes(b"mine")
        expected = "files this builder did not write (embeddings.npy, keys.json)"
    else:
        assert embed(shards, "-o", str(out)).returncode == 0
        expected = "a shard cache of other settings"
    refused = embed(shards, "-o", str(out), "--dtype", "float32")
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("xclr-embed-captions: error: ")
    )
    assert expected in refused.stderr and "--overwrite" in refused.stderr
    if layout == "user-files":
        assert (out / "keys.json").read_text() == '["mine"]'
    assert (
        embed(shards, "-o", str(out), "--dtype", "float32", "--overwrite").returncode
        == 0
    )


def test_single_file_build_keeps_a_users_files(tmp_path: Path) -> None:
    """Issue 21.2, single-file cache: a folder with the user's keys.json is refused."""
    from xclr_plugin.cache import build_caption_cache
    from xclr_plugin.captions import CaptionRecord

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keys.json").write_text('["mine"]')
    (out / "embeddings.npy").write_bytes(b"mine")
    records = [CaptionRecord(f"{i}.png", f"caption {i}") for i in range(3)]
    with pytest.raises(
        ValueError,
        match=r"files this builder did not write \(embeddings\.npy, keys\.json\)",
    ):
        build_caption_cache(records, out, HashEncoder(), progress=False)
    assert (out / "keys.json").read_text() == '["mine"]'
    build_caption_cache(records, out, HashEncoder(), progress=False, overwrite=True)


def test_shard_reader_refuses_what_open_clip_would_read_in_part(tmp_path: Path) -> None:
    samples = [(f"k{i}", f"caption {i}") for i in range(4)]
    whole = tmp_path / "whole.tar"
    write_shard(whole, samples)
    data = whole.read_bytes()
    for cut in (1536, 1600, len(data) - 10240):  # after a member, mid-image, no end
        cut_file = tmp_path / f"cut-{cut}.tar"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"is not a readable tar file"):
            read_shard(str(cut_file))
    zipped = tmp_path / "zipped.tar.gz"
    zipped.write_bytes(gzip.compress(data))  # open_clip reads these too
    assert read_shard(str(zipped)) == read_shard(str(whole)) == samples
    assert (
        shard_name(str(zipped)) == "zipped"
        and shard_name("pipe:cat a/b/0001.tar") == "0001"
    )
    dotted = tmp_path / "dotted.tar"
    write_shard(dotted, [("a.b", "x"), ("c.d", "y")])
    with pytest.raises(
        ValueError, match=r"'a\.b\.txt' webdataset's key ends at the first dot"
    ):
        read_shard(str(dotted))
    twice = f"{whole}::{whole}"  # upsampling: one shard listed twice
    assert [(r.filename, r.caption) for r in read_webdataset_captions(twice)] == samples


def test_flags_that_do_not_apply_to_shards_are_refused(
    shards: str, tmp_path: Path, embed: Callable[..., Done]
) -> None:
    for flag in (["--chunk-size", "8"], ["--lock-timeout", "1"]):
        done = embed(shards, "-o", str(tmp_path / "c"), *flag)
        assert (
            done.returncode == 2
            and "does not apply to --format webdataset" in done.stderr
        )
    assert not (tmp_path / "c").exists()


def test_a_damaged_shard_file_is_rebuilt_and_refused_until_then(
    shards: str, tmp_path: Path, embed: Callable[..., Done]
) -> None:
    out = tmp_path / "cache"
    assert embed(shards, "-o", str(out)).returncode == 0
    urls = [f"{shards.split('{')[0]}{s:05d}.tar" for s in range(SHARDS)]
    path = out / SHARDS_DIR / "00002.npz"
    path.write_bytes(path.read_bytes()[:200])
    cache = ShardCache.open(out, urls)  # O(shards): the index, not every file
    with pytest.raises(ValueError, match=r"00002\.npz is missing, damaged"):
        cache.load(urls[2])
    rebuilt = embed(shards, "-o", str(out))
    assert f"{PER_SHARD} captions embedded now" in rebuilt.stdout
    assert "Ignoring the damaged shard embeddings" in rebuilt.stderr
    digests = ShardCache.open(out, urls).load(urls[2]).digests
    assert np.array_equal(digests, caption_digests([c for _, c in read_shard(urls[2])]))


def test_a_shard_cache_is_named_as_such_where_a_single_file_cache_is_expected(
    shards: str, tmp_path: Path, embed: Callable[..., Done]
) -> None:
    from xclr_plugin.cache import CaptionCache

    assert embed(shards, "-o", str(tmp_path / "c")).returncode == 0
    with pytest.raises(
        ValueError, match="it is a per-shard cache of webdataset shards"
    ):
        CaptionCache.open(tmp_path / "c")


def test_missing_shards_are_named_before_the_folder_is_made(
    tmp_path: Path, embed: Callable[..., Done]
) -> None:
    done = embed(str(tmp_path / "nope-{0..1}.tar"), "-o", str(tmp_path / "c"))
    assert done.returncode == 2
    assert "2 of the 2 shard(s) do not exist, the first is" in done.stderr
    assert not (tmp_path / "c").exists()
