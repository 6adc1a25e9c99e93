"""xclr-openclip-train on webdataset shards: caption targets from a per-shard cache.

Real img2dataset-style shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) are written with
``webdataset.TarWriter``; open_clip's own ``get_wds_dataset`` pipeline reads them
(shuffling, resampling, worker split). A probe records what the loss receives.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from _clip_helpers import dense_xclr_clip
from _openclip_helpers import (
    TINY,
    assert_loads_back,
    checkpoint,
    common_args,
    install_probe,
    register_tiny,
    rows_of,
    shard_table,
    state_dict,
    write_shards,
)

from xclr_plugin.cache import build_caption_cache
from xclr_plugin.cache.shards import ShardCache
from xclr_plugin.captions.shards import (
    expand_shard_urls,
    read_shard,
    read_webdataset_captions,
)
from xclr_plugin.cli.embed_captions import main as embed_main
from xclr_plugin.cli.openclip_train import main
from xclr_plugin.clip_loss import XCLRClipLoss
from xclr_plugin.integrations.open_clip_train.data import TARGETS_KEY
from xclr_plugin.integrations.open_clip_train.loss import CaptionTargets
from xclr_plugin.text import TextEncoder


@dataclass
class Shards:
    root: Path
    urls: str  # brace notation and a '::' list, as open_clip accepts
    captions: dict[str, str]
    cache: Path
    logs: Path


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """4 shards x 10 samples; the per-shard cache built by the CLI (``--format webdataset``)."""
    root = tmp_path_factory.mktemp("wds")
    register_tiny(root)
    captions = write_shards(root / "shards", shards=4, per_shard=10)
    base = root / "shards"
    urls = f"{base}/{{00000..00001}}.tar::{base}/0000{{2,3}}.tar"
    cache = root / "cache"
    assert embed_main(["--format", "webdataset", urls, "-o", str(cache)]) == 0
    return Shards(root, urls, captions, cache, root / "logs")


def wds_args(s: Shards, name: str, *extra: str) -> list[str]:
    return [
        "--train-data", s.urls, "--dataset-type", "webdataset",
        "--train-num-samples", "32",
        *common_args(s.logs, name, *extra),
    ]  # fmt: skip


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Any:
    return install_probe(monkeypatch)


# -- the shard reader ------------------------------------------------------------------


def open_clip_samples(urls: str) -> list[tuple[str, str]]:
    """(key, caption) as open_clip's webdataset pipeline groups and decodes them."""
    from open_clip_train.data import tarfile_to_samples_nothrow

    out = []
    for sample in tarfile_to_samples_nothrow(
        [{"url": u} for u in expand_shard_urls(urls)]
    ):
        if "txt" in sample:
            out.append((sample["__key__"], sample["txt"].decode("utf-8")))
    return out


def test_reader_keys_and_captions_equal_open_clips_pipeline(tmp_path: Path) -> None:
    """Long names (pax), GNU long names, sub-folders, upper-case extensions, metadata."""
    long_key = "sub/dir/" + "k" * 150
    members = [
        ("plain.txt", "a plain caption"),
        ("plain.jpg", "<jpg>"),
        (f"{long_key}.txt", "a caption under a 158-character key"),
        ("UPPER.TXT", "an upper-case extension"),
        ("multi.part.txt", "key is up to the first dot"),
        ("__index__", "metadata, skipped"),
        ("unicode-é.txt", "ünïcödé caption ✓"),
        ("noext", "no extension, skipped"),
    ]
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for member, text in members:
                data = text.encode()
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            folder = tarfile.TarInfo("sub")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        records = read_webdataset_captions(str(path))
        got = [(r.filename, r.caption) for r in records]
        assert got == open_clip_samples(str(path)), name
        assert (long_key, "a caption under a 158-character key") in got


def test_reader_reads_writer_shards_in_order(shards: Shards) -> None:
    records = read_webdataset_captions(shards.urls)
    assert [r.filename for r in records] == list(shards.captions)
    assert [r.caption for r in records] == list(shards.captions.values())
    assert [(r.filename, r.caption) for r in records] == open_clip_samples(shards.urls)


def test_reader_errors_name_the_shards(shards: Shards, tmp_path: Path) -> None:
    first = f"{shards.root}/shards/00000.tar"
    copy = tmp_path / "copy.tar"
    copy.write_bytes(Path(first).read_bytes())
    with pytest.raises(ValueError, match="Duplicate key '000000000'") as err:
        read_webdataset_captions(f"{first}::{copy}")
    assert first in str(err.value) and str(copy) in str(err.value)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(first).read_bytes()[:700] + b"x" * 600)
    with pytest.raises(ValueError, match=r"broken\.tar"):
        read_webdataset_captions(str(broken))
    with pytest.raises(ValueError, match="Cannot read shard"):
        read_webdataset_captions(str(tmp_path / "missing.tar"))
    with pytest.raises(ValueError, match="non-empty string"):
        read_webdataset_captions("")


# -- training --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(shards: Shards) -> Path:
    """An earlier run on the shards (captions embedded at start-up, no cache)."""
    name = "wds-first"
    args = wds_args(shards, name, "--workers", "0", "--loss", "xclr-clip")
    assert main(args) is None
    return checkpoint(shards.logs, name)


def test_finetune_from_checkpoint_with_workers_resampling_and_accum(
    shards: Shards, first_run: Path, probe: Any, encoder: TextEncoder
) -> None:
    """Targets reaching the loss are the embeddings of exactly those samples' captions."""
    tokenizer = open_clip.get_tokenizer(TINY)
    captions, table = shard_table(shards.cache, shards.urls)

    def text_features_are_those_samples(model: Any, kw: dict[str, Any]) -> None:
        batch = [captions[i] for i in rows_of(kw[TARGETS_KEY], table)]
        with torch.no_grad():
            want = model.encode_text(tokenizer(batch), normalize=True)
        torch.testing.assert_close(
            kw["text_features"].detach(), want, rtol=1e-4, atol=1e-5
        )

    probe.on_call = text_features_are_those_samples
    name = "wds-finetune"
    args = wds_args(
        shards, name,
        "--pretrained", str(first_run), "--workers", "2", "--dataset-resampled",
        "--accum-freq", "2",
        "--loss", "xclr-clip", "--xclr-caption-cache", str(shards.cache),
        "--xclr-target-temperature", "0.2",
    )  # fmt: skip
    assert main(args) is None

    assert isinstance(probe.loss, CaptionTargets)
    assert isinstance(probe.loss.loss, XCLRClipLoss)
    # 32 samples / batch 4 = 8 batches = 4 optimizer steps x 2 micro-batches
    assert len(probe.calls) == 8
    seen: set[str] = set()
    for call in probe.calls:
        batch = [captions[i] for i in rows_of(call[TARGETS_KEY], table)]
        assert len(batch) == 8
        seen.update(batch)
        want = encoder.encode(batch)
        torch.testing.assert_close(call["inner"]["targets"], want, rtol=0, atol=2e-3)
        loss = dense_xclr_clip(
            call["image_features"].double(),
            call["text_features"].double(),
            call["logit_scale"].double(),
            descriptions=call["inner"]["targets"].double(),
            target_temperature=0.2,
        )
        torch.testing.assert_close(call["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    assert len(seen) > 10  # samples from several shards and both workers
    tuned = assert_loads_back(TINY, checkpoint(shards.logs, name))
    start = state_dict(first_run)
    assert not torch.equal(
        tuned.state_dict()["text_projection"], start["text_projection"]
    )


def test_start_up_check_names_missing_and_changed_shards(
    shards: Shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """O(shards) at start-up: every shard embedded, none rewritten since (issue 21.1)."""
    partial = tmp_path / "partial-cache"
    three = f"{shards.root}/shards/{{00000..00002}}.tar"
    assert embed_main(["--format", "webdataset", three, "-o", str(partial)]) == 0
    name = "wds-missing"
    args = wds_args(shards, name, "--workers", "0", "--loss", "xclr-clip",
                    "--xclr-caption-cache", str(partial))  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("xclr-openclip-train: error: ")
    assert "no caption embeddings for 1 of the 4 shard(s)" in err and "00003.tar" in err
    assert "xclr-embed-captions --format webdataset" in err
    assert not (shards.logs / name).exists()

    # Re-captioned shard (same keys): its size or mtime changed -> refused by name.
    copies = tmp_path / "shards"
    write_shards(copies, shards=2, per_shard=10)
    urls = f"{copies}/{{00000..00001}}.tar"
    cache = tmp_path / "cache"
    assert embed_main(["--format", "webdataset", urls, "-o", str(cache)]) == 0
    recaption(copies / "00001.tar", keep_stat=False)

    def run(name: str, workers: str = "0") -> int | None:
        return main([
            "--train-data", urls, "--dataset-type", "webdataset",
            "--train-num-samples", "8",
            *common_args(shards.logs, name, "--workers", workers, "--loss",
                         "xclr-clip", "--xclr-caption-cache", str(cache)),
        ])  # fmt: skip

    assert run("wds-changed") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "1 of the 2 shard(s) changed after their caption embeddings" in err
    assert "00001.tar" in err and not (shards.logs / "wds-changed").exists()
    # The build redoes exactly that shard.
    assert embed_main(["--format", "webdataset", urls, "-o", str(cache)]) == 0
    assert "10 captions embedded now" in capsys.readouterr().out

    # Same size, same mtime, other captions: caught when a DataLoader worker reads
    # the sample, still one line.
    recaption(copies / "00000.tar", keep_stat=True)
    assert run("wds-stale", workers="1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("xclr-openclip-train: error: sample '00000")
    assert "has another caption than the one embedded" in err and "00000.tar" in err


def recaption(path: Path, keep_stat: bool) -> None:
    """Rewrites a shard's captions (same keys, same lengths); ``keep_stat``: same mtime."""
    before = path.stat()
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if info.name.endswith(".txt"):
                data = data.replace(b"a ", b"A ")  # same length, another caption
            members.append((info, data))
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size == before.st_size
    if keep_stat:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_subset_of_the_cache_shards_trains(shards: Shards, probe: Any) -> None:
    """Training on two of the four shards the cache was built from."""
    name = "wds-subset"
    subset = f"{shards.root}/shards/{{00001..00002}}.tar"
    args = [
        "--train-data", subset, "--dataset-type", "webdataset",
        "--train-num-samples", "8",
        *common_args(shards.logs, name, "--workers", "0", "--loss", "xclr-clip",
                     "--xclr-caption-cache", str(shards.cache)),
    ]  # fmt: skip
    assert main(args) is None
    _, table = shard_table(shards.cache, subset)
    keys = [k for u in expand_shard_urls(subset) for k, _ in read_shard(u)]
    for call in probe.calls:
        rows = rows_of(call[TARGETS_KEY], table)
        assert all(keys[i][:5] in ("00001", "00002") for i in rows)


def test_shard_cache_lookup_names_key_and_shard(shards: Shards) -> None:
    first = f"{shards.root}/shards/00000.tar"
    cache = ShardCache.open(shards.cache, [first])
    caption = shards.captions["000000000"]
    row = cache.target(first, "000000000", caption)
    torch.testing.assert_close(
        torch.from_numpy(row), TextEncoder().encode([caption])[0], rtol=0, atol=2e-3
    )
    with pytest.raises(ValueError, match=r"sample 'lost' of shard '.*00000\.tar'"):
        cache.target(first, "lost", "x")
    with pytest.raises(ValueError, match="has another caption"):
        cache.target(first, "000000000", caption + "!")
    assert len(pickle.loads(pickle.dumps(cache))._loaded) == 0  # workers load their own


def test_a_single_file_cache_is_refused_for_shards(
    shards: Shards, encoder: TextEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    single = shards.root / "single-cache"
    build_caption_cache(
        read_webdataset_captions(shards.urls), single, encoder, progress=False
    )
    args = wds_args(shards, "wds-single", "--workers", "0", "--loss", "xclr-clip",
                    "--xclr-caption-cache", str(single))  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "holds a single-file caption cache" in err and "per-shard cache" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--loss", "xclr-clip", "--xclr-target-mode", "clip-text", "--workers", "9"],
         "fewer than --workers 9"),
        (["--loss", "clip", "--train-num-samples", "0"], "--train-num-samples must be"),
        (["--loss", "xclr-clip", "--xclr-caption-cache", "NOCACHE"],
         "xclr-embed-captions --format webdataset"),
        (["--loss", "xclr-clip", "--xclr-target-mode", "clip-text",
          "--train-data", "EMPTY"], "shard(s) are empty files"),
        # A valid tar without members: open_clip alone hangs, in every mode (21.8).
        (["--train-data", "NOMEMBERS"], "shard(s) are tar files without members"),
        (["--loss", "clip", "--train-data", "NOMEMBERS"], "without members"),
        (["--loss", "xclr-clip", "--xclr-target-mode", "clip-text",
          "--train-data", "NOMEMBERS"], "without members"),
    ],
)  # fmt: skip
def test_bad_webdataset_runs_fail_before_training(
    shards: Shards, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "wds-bad-" + "-".join(e.strip("-") for e in extra[:4])
    empty, no_members = shards.root / "empty.tar", shards.root / "no-members.tar"
    empty.touch()  # open_clip alone would loop forever over it
    tarfile.open(no_members, "w").close()
    urls = f"{shards.root}/shards/00000.tar::{no_members}"
    replace = {"NOCACHE": str(shards.root / "nothing"), "EMPTY": str(empty),
               "NOMEMBERS": urls}  # fmt: skip
    extra = [replace.get(e, e) for e in extra]
    args = wds_args(shards, name, *extra)  # a later flag overrides the default
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("xclr-openclip-train: error: ") and message in err, err
    assert not (shards.logs / name).exists()


def test_webdataset_without_sample_count_fails_before_training(
    shards: Shards, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "wds-no-count"
    args = wds_args(shards, name, "--loss", "clip")
    i = args.index("--train-num-samples")
    del args[i : i + 2]
    assert main(args) == 2
    assert "needs --train-num-samples" in capsys.readouterr().err
    assert not (shards.logs / name).exists()
    assert not os.path.exists(shards.root / "shards" / "sizes.json")
