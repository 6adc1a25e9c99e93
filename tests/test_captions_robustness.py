"""CSV/TSV captions are read exactly as open_clip reads them (issue 12, wrong #5).

The oracle is open_clip's own reader, ``open_clip_train.data.CsvDataset`` (which calls
``pd.read_csv(input_filename, sep=sep)`` and later uses ``str()`` of each cell): for
every file it accepts, ``read_csv_captions`` returns the same file names and captions
in the same order; every file it refuses is refused. Beyond it, rows that pandas would
merge or shift silently are refused with a message naming the file and row.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from xclr_plugin.captions import (
    CaptionRecord,
    check_template,
    detect_format,
    read_captions,
    read_csv_captions,
    validate_records,
)

CsvDataset = pytest.importorskip("open_clip_train.data").CsvDataset

NFC = "café.png"
ROWS = "".join(f"img{i}.png\tcaption {i}\n" for i in range(300))


def _open_clip_reads(path: Path, sep: str = "\t") -> list[tuple[str, str]] | None:
    """What open_clip's CsvDataset would train on, or None if it refuses the file."""
    try:
        table = CsvDataset(str(path), None, "filepath", "title", sep=sep)
    except Exception:
        return None
    return [(str(i), str(c)) for i, c in zip(table.images, table.captions, strict=True)]


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


ACCEPTED: dict[str, bytes | str] = {
    "plain": "filepath\ttitle\n" + ROWS,
    "bom": b"\xef\xbb\xbffilepath\ttitle\na.png\ta cat\n",
    "crlf": b"filepath\ttitle\r\na.png\ta cat\r\nb.png\ta dog\r\n",
    "cr_only": b"filepath\ttitle\ra.png\ta cat\rb.png\ta dog\r",
    "blank_lines": "filepath\ttitle\n\na.png\ta cat\n   \n\nb.png\ta dog\n",
    "no_final_newline": "filepath\ttitle\na.png\ta cat",
    "quoted_tab": 'filepath\ttitle\na.png\t"a cat\tsleeping"\n',
    "mid_quote": 'filepath\ttitle\na.png\tthe "big" cat\n',
    "multiline_caption": 'filepath\ttitle\na.png\t"a cat\non a mat"\nb.png\tdog\n',
    "duplicate_column": "filepath\ttitle\ttitle\na.png\tfirst\tsecond\n",
    "extra_column": "filepath\ttitle\tlabel\na.png\ta cat\t3\n",
    "numeric_caption": "filepath\ttitle\na.png\t42\nb.png\t1.50\n",
    "spaces_kept": "filepath\ttitle\n a.png \t a cat \n",
    "non_ascii": "filepath\ttitle\nкот.png\tкот на ковре 🐈\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_same_rows_as_open_clip(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, f"{name}.tsv", ACCEPTED[name])
    expected = _open_clip_reads(path)
    assert expected is not None, "open_clip accepts this file"
    records = read_csv_captions(path)
    assert [(r.filename, r.caption) for r in records] == expected


REFUSED: dict[str, tuple[bytes | str, str]] = {
    # Issue 12: an unclosed quote made the old reader return 3 rows out of 300.
    "unclosed_quote": (
        "filepath\ttitle\n" + ROWS.replace("caption 5\n", '"caption 5\n', 1),
        "malformed CSV.*EOF inside string",
    ),
    "ragged_row": (
        "filepath\ttitle\na.png\ta cat\nb.png\ta dog\textra\n",
        "Expected 2 fields in line 3, saw 3",
    ),
    "latin1": (b"filepath\ttitle\na.png\tcaf\xe9\n", "not UTF-8"),
    "utf16": ("filepath\ttitle\na.png\tcat\n".encode("utf-16"), "not UTF-8"),
    "empty": ("", "empty file, expected a header row"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_like_open_clip(tmp_path: Path, name: str) -> None:
    data, message = REFUSED[name]
    path = _write(tmp_path, f"{name}.tsv", data)
    assert _open_clip_reads(path) is None, "open_clip refuses this file"
    with pytest.raises(ValueError, match=message) as info:
        read_csv_captions(path)
    assert str(path) in str(info.value)


SILENTLY_WRONG_IN_OPEN_CLIP: dict[str, tuple[str, str]] = {
    # A quote opened in row 5 and closed in row 200: pandas reads 105 rows, and
    # row 5's caption holds rows 5-200.
    "quote_closed_later": (
        "filepath\ttitle\n"
        + ROWS.replace("caption 5\n", '"caption 5\n', 1).replace(
            "caption 200\n", 'caption 200"\n', 1
        ),
        r"line 7: the caption of 'img5\.png' spans 196 lines that contain the "
        r"separator '\\t': an unbalanced quote",
    ),
    # Every row has one field more than the header: pandas makes the first column
    # the index and shifts the others (open_clip would open 'a cat' as the image).
    "extra_field_every_row": (
        "filepath\ttitle\na.png\ta cat\tx\nb.png\ta dog\ty\n",
        "more fields than the header",
    ),
    "extra_field_first_row": (
        "filepath\ttitle\na.png\ta cat\tx\nb.png\ta dog\n",
        "more fields than the header",
    ),
    # pandas reads these cells as missing; open_clip would train on the text 'nan'.
    "empty_caption": (
        "filepath\ttitle\na.png\ta cat\nb.png\t\n",
        "line 3: image 'b.png' has no caption",
    ),
    "NA_caption": (
        "filepath\ttitle\na.png\tNA\n",
        "line 2: image 'a.png' has no caption",
    ),
    "missing_field": (
        "filepath\ttitle\na.png\n",
        "line 2: image 'a.png' has no caption",
    ),
    "tab_only_line": ("filepath\ttitle\na.png\tcat\n\t\n", "line 3: no image path"),
    "header_only": ("filepath\ttitle\n", "no captions found"),
    "duplicate_image": (
        "filepath\ttitle\na.png\tcat\nb.png\tdog\na.png\tcat again\n",
        r"line 4: duplicate file name 'a\.png' \(first at line 2\)",
    ),  # Issue 21, wrong 4: one image under two spellings (open_clip opens one file twice).
    "duplicate_image_spelt_twice": (
        "filepath\ttitle\na.png\tcat\nsub/../a.png\tdog\n./a.png\tcat again\n",
        r"line 3: duplicate file name 'sub/\.\./a\.png' \(first at line 2, as 'a\.png'\)",
    ),
    "duplicate_image_nfc_and_nfd": (
        f"filepath\ttitle\n{NFC}\tcat\n{unicodedata.normalize('NFD', NFC)}\tdog\n",
        rf"line 3: duplicate file name .* \(first at line 2, as '{NFC}'\)",
    ),
}


@pytest.mark.parametrize("name", sorted(SILENTLY_WRONG_IN_OPEN_CLIP))
def test_refuses_what_open_clip_would_misread(tmp_path: Path, name: str) -> None:
    data, message = SILENTLY_WRONG_IN_OPEN_CLIP[name]
    path = _write(tmp_path, f"{name}.tsv", data)
    with pytest.raises(ValueError, match=message) as info:
        read_csv_captions(path)
    assert str(path) in str(info.value)


def test_unbalanced_quote_row_count_never_shrinks(tmp_path: Path) -> None:
    """The exact issue-12 file: 300 rows must never come back as fewer records."""
    path = _write(
        tmp_path,
        "train.tsv",
        "filepath\ttitle\n" + ROWS.replace("caption 5\n", '"caption 5\n', 1),
    )
    with pytest.raises(ValueError, match="refused as open_clip's reader"):
        read_csv_captions(path)
    with pytest.raises(ValueError, match="refused as open_clip's reader"):
        read_csv_captions(path, allow_multiline=True)


def test_multiline_caption_with_separator_can_be_allowed(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "m.csv", 'filepath,title\na.png,"a cat,\nsitting, on a mat"\n'
    )
    with pytest.raises(ValueError, match="unbalanced quote"):
        read_csv_captions(path, sep=",")
    records = read_csv_captions(path, sep=",", allow_multiline=True)
    assert records == [CaptionRecord("a.png", "a cat,\nsitting, on a mat")]
    assert [(r.filename, r.caption) for r in records] == _open_clip_reads(path, ",")


@pytest.mark.parametrize(
    ("sep", "text"),
    [
        ("\\t", "filepath\ttitle\na.png\ta cat\n"),  # backslash-t typed in a shell
        (";;", "filepath;;title\na.png;;a cat\n"),  # multi-character separator
        ("|", "filepath|title\na.png|a cat\n"),
    ],
)
def test_separators_as_pandas_reads_them(tmp_path: Path, sep: str, text: str) -> None:
    path = _write(tmp_path, "sep.csv", text)
    assert _open_clip_reads(path, sep) == [("a.png", "a cat")]
    assert read_csv_captions(path, sep=sep) == [CaptionRecord("a.png", "a cat")]


def test_bad_separator_and_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.tsv", "filepath\ttitle\na.png\ta cat\n")
    for sep in ("", None, 9):
        with pytest.raises(ValueError, match="sep must be a non-empty string"):
            read_csv_captions(path, sep=sep)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Is the separator right"):
        read_csv_captions(path, sep="||")
    with pytest.raises(ValueError, match="img_key must be a non-empty column name"):
        read_csv_captions(path, img_key="")
    with pytest.raises(ValueError, match="Cannot read captions file"):
        read_csv_captions(path, sep="((")  # an invalid regular expression


def test_duplicate_header_takes_the_first_column_like_pandas(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.tsv", "filepath\ttitle\ttitle\na.png\tfirst\tsecond\n")
    assert read_csv_captions(path)[0].caption == "first"
    assert read_csv_captions(path, caption_key="title.1")[0].caption == "second"


def test_labels_from_pandas_cells(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "l.tsv", "filepath\ttitle\tlabel\na.png\tx\t3\nb.png\ty\t-1\n"
    )
    assert [r.label for r in read_csv_captions(path, label_key="label")] == [3, -1]
    bad = _write(tmp_path, "b.tsv", "filepath\ttitle\tlabel\na.png\tx\t3\nb.png\ty\t\n")
    with pytest.raises(
        ValueError, match="line 3: label column 'label' is not an integer"
    ):
        read_csv_captions(bad, label_key="label")
    frac = _write(tmp_path, "f.tsv", "filepath\ttitle\tlabel\na.png\tx\t2.5\n")
    with pytest.raises(ValueError, match=r"not an integer: 2\.5"):
        read_csv_captions(frac, label_key="label")


def test_rows_named_by_number_when_lines_cannot_be_told(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.csv", "filepath;;title\na.png;;a cat\nb.png;;\n")
    with pytest.raises(ValueError, match=r"r\.csv, data row 2: image 'b\.png'"):
        read_csv_captions(path, sep=";;")


def test_template_checks() -> None:
    assert check_template("a photo of a {}") == "a photo of a {}"
    assert check_template("{{literal}} {}") == "{{literal}} {}"
    for bad in ("a {} {name}", "no field", "a {0} {}", "a {", "{}{}", "a {name}"):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)
    with pytest.raises(ValueError, match="template must be a string"):
        check_template(None)


def test_webdataset_sources_are_detected_like_open_clip(tmp_path: Path) -> None:
    assert detect_format("shards/{00000..00009}.tar") == "webdataset"
    assert detect_format("a/{0..3}.tar::b/{0..1}.tar") == "webdataset"
    assert detect_format("pipe:cat shard.TAR") == "webdataset"
    assert detect_format("train.tsv") == "csv"
    assert detect_format("a.tar::train.tsv") == "csv"
    with pytest.raises(ValueError):
        read_captions(str(tmp_path / "missing-{0..1}.tar"), "webdataset")


def test_validate_records_refuses_wrong_types() -> None:
    with pytest.raises(TypeError, match="got a string"):
        validate_records("a.png")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a CaptionRecord, got tuple"):
        validate_records([("a.png", "a cat")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"label of 'a\.png' must be an int or None"):
        validate_records([CaptionRecord("a.png", "a cat", "3")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty image file name"):
        validate_records([CaptionRecord(None, "a cat")])  # type: ignore[arg-type]
