"""``xclr-embed-captions``: builds from each source, one-line errors before any work."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xclr_plugin.cache import DATA_FILE, MANIFEST_FILE, CaptionCache
from xclr_plugin.cache.shards import ShardCache
from xclr_plugin.cache.store import file_sha256
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.cli.embed_captions import main
from xclr_plugin.text import TextEncoder

sys.path.insert(0, str(Path(__file__).parent))
from _cache_builder import HashEncoder

RECORDS = [CaptionRecord(f"img_{i:02d}.png", f"caption number {i}") for i in range(12)]
FP16_ATOL = 2e-3


def _expected() -> torch.Tensor:
    return HashEncoder().encode([r.caption for r in RECORDS])


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """What the real packaged encoder gives the captions."""
    return TextEncoder().encode([r.caption for r in RECORDS])


# -- the command (rough) -----------------------------------------------------------------


class _NoEncoder:
    """Fails the test if the command loads the encoder before checking its flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the encoder was loaded before the flags were checked")


class _FakeTextEncoder(HashEncoder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs the command; argparse's own errors exit, ours return: the same here."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "classes", "--template", "a {} {name}"], "exactly one '{}'"),
        (["--format", "classes", "--template", "a {"], "malformed"),
        (["--format", "csv", "--template", "a {}"], "--template does not apply"),
        (["--format", "classes", "--csv-img-key", "x"], "--csv-img-key does not apply"),
        (["--format", "webdataset", "--csv-separator", ","], "does not apply"),
        (["--csv-separator", ""], "--csv-separator must not be empty"),
        (["--batch-size", "0"], "argument --batch-size: must be positive"),
        (["--chunk-size", "x"], "expected an integer"),
        (["--lock-timeout", "-1"], "must be finite and >= 0"),
    ],
)
def test_cli_flag_errors_are_one_line_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", _NoEncoder)
    source = tmp_path / "train.tsv"
    source.write_text("filepath\ttitle\na.png\ta cat\n")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    if "classes" in extra:
        source = tmp_path / "classes"
    status, _, err = _run([str(source), "-o", str(tmp_path / "o"), *extra], capsys)
    assert status == 2
    assert message in err
    assert err.startswith("xclr-embed-captions: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_output_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", _NoEncoder)
    source = tmp_path / "train.tsv"
    source.write_text("filepath\ttitle\na.png\ta cat\n")
    target = tmp_path / "existing.txt"
    target.write_text("keep me")
    status, _, err = _run([str(source), "-o", str(target)], capsys)
    assert status == 2 and "is a file; give a folder" in err and err.count("\n") == 1
    status, _, err = _run([str(source), "-o", str(target / "sub")], capsys)
    assert status == 2 and "which is a file" in err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    ("sep", "text"),
    [("\\t", "filepath\ttitle\n{rows}"), (";;", "filepath;;title\n{rows}")],
)
def test_cli_separators_typed_in_a_shell(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sep: str,
    text: str,
) -> None:
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", _FakeTextEncoder)
    real_sep = "\t" if sep == "\\t" else sep
    rows = "".join(f"{r.filename}{real_sep}{r.caption}\n" for r in RECORDS)
    source = tmp_path / "train.csv"
    source.write_text(text.format(rows=rows))
    out = tmp_path / "cache"
    status, stdout, err = _run(
        [str(source), "-o", str(out), "--csv-separator", sep, "--no-progress"], capsys
    )
    assert status == 0, err
    assert "Caption cache ready: 12 embeddings" in stdout
    cache = CaptionCache.open(out, records=RECORDS, check_finite=True)
    torch.testing.assert_close(cache[:], _expected(), atol=FP16_ATOL, rtol=0)


def test_cli_rerun_verifies_and_repairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run used to print "ready" over a cache with unwritten (zero) rows."""
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", _FakeTextEncoder)
    source = tmp_path / "train.tsv"
    source.write_text(
        "filepath\ttitle\n" + "".join(f"{r.filename}\t{r.caption}\n" for r in RECORDS)
    )
    out = tmp_path / "cache"
    assert _run([str(source), "-o", str(out), "--no-progress"], capsys)[0] == 0
    # What the old concurrent builders published: half the rows zero, a manifest
    # whose checksum matches the damaged file.
    array = np.load(out / DATA_FILE, mmap_mode="r+")
    array[6:] = 0
    array.flush()
    del array
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["data_sha256"] = file_sha256(out / DATA_FILE)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    CaptionCache.open(out, records=RECORDS, verify_checksum=True)  # looks fine...
    status, _, err = _run([str(source), "-o", str(out), "--no-progress"], capsys)
    assert status == 0, err
    assert "Rebuilding the damaged caption cache" in err and "6 all-zero row(s)" in err
    CaptionCache.open(out, records=RECORDS, check_finite=True, verify_checksum=True)


def test_cli_webdataset_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("webdataset")
    monkeypatch.setattr("xclr_plugin.text.TextEncoder", _FakeTextEncoder)
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for record in RECORDS[shard * 6 : shard * 6 + 6]:
                key = record.filename.removesuffix(".png")
                for ext, payload in (
                    ("jpg", b"\xff\xd8"),
                    ("txt", record.caption.encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "cache"
    spec = str(tmp_path / "shard-{0..1}.tar")
    status, _, err = _run([spec, "-o", str(out), "--no-progress"], capsys)
    assert status == 0, err
    urls = [str(tmp_path / f"shard-{s}.tar") for s in range(2)]
    cache = ShardCache.open(out, urls, encoder_name="hash-encoder")  # a per-shard cache
    rows = [cache.target(urls[i // 6], r.filename.removesuffix(".png"), r.caption)
            for i, r in enumerate(RECORDS)]  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(np.stack(rows)), _expected(), atol=FP16_ATOL, rtol=0
    )


def test_cli_builds_cache_from_open_clip_tsv(
    tmp_path: Path, reference: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "filepath\ttitle\n"
        + "".join(f"{r.filename}\t{r.caption}\n" for r in RECORDS[:6])
    )
    out = tmp_path / "cache"
    assert main([str(tsv), "-o", str(out), "--batch-size", "4", "--no-progress"]) == 0
    assert "Caption cache ready: 6 embeddings" in capsys.readouterr().out
    cache = CaptionCache.open(
        out, records=[CaptionRecord(r.filename, r.caption) for r in RECORDS[:6]]
    )
    torch.testing.assert_close(cache[:], reference[:6], atol=FP16_ATOL, rtol=0)


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "out")]) == 2
    assert "Captions file not found" in capsys.readouterr().err
    csv = tmp_path / "comma.csv"
    csv.write_text("filepath,title\na.png,a cat\n")
    assert main([str(csv), "-o", str(tmp_path / "out")]) == 2
    assert "Is the separator right" in capsys.readouterr().err
