"""``xclr-embed-captions``: build a caption cache from any caption source (every error one line, exit 2, flags checked before reading)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xclr_plugin.cache import DEFAULT_CHUNK_SIZE, DTYPES, build_caption_cache
from xclr_plugin.captions import (
    DEFAULT_TEMPLATE,
    FORMATS,
    check_template,
    detect_format,
    read_captions,
)
from xclr_plugin.errors import ArgumentParser, UsageError, print_error

PROG = "xclr-embed-captions"
# Reader flag -> (its reader keyword, the formats that take it, help).
_READER_FLAGS = {
    "--captions-file": ("captions_file", ("folder",), "sidecar filename,caption CSV for --format folder"),
    "--csv-separator": ("sep", ("csv", "folder"), "CSV separator as open_clip passes it to pandas.read_csv (default: tab; ',' for a sidecar); longer than one character it is a regular expression, so a literal '\\t' is a tab and ';;' two semicolons"),
    "--csv-img-key": ("img_key", ("csv", "folder", "jsonl"), "image column (default: filepath; filename for JSONL/sidecar)"),
    "--csv-caption-key": ("caption_key", ("csv", "folder", "jsonl", "webdataset"), "caption column (default: title; caption for JSONL/sidecar; the caption member's extension for webdataset, default txt)"),
    "--template": ("template", ("classes",), "caption template with one {} for --format classes (default: 'a photo of a {}')"),
}  # fmt: skip


@dataclass(frozen=True)
class EmbedOptions:
    """The checked command line: what to read, with which encoder, into where."""

    source: str
    output: Path
    fmt: str
    reader: dict[str, Any]
    encoder: str | None
    device: str
    batch_size: int
    chunk_size: int
    dtype: str
    overwrite: bool
    lock_timeout: float | None
    progress: bool


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Embed a dataset's captions once with a frozen sentence encoder "
        "and store them as a memory-mapped X-CLR caption cache (resumes if "
        "interrupted; a second build of the same folder waits for the first).",
    )
    add = parser.add_argument
    # fmt: off
    add("source", help="captions source: open_clip CSV/TSV, JSONL, an image folder with a captions.csv sidecar, a labelled folder "
        "(one subfolder per class), or webdataset shards ('shards/{00000..00009}.tar', '::'-joined lists)")
    add("-o", "--output", required=True, help="cache folder to write")
    add("--format", default="auto", choices=("auto", *FORMATS),
        help="how to read SOURCE (default: from the path; '.tar' shards are webdataset)")
    for flag, (_, _, text) in _READER_FLAGS.items():
        add(flag, help=text)
    add("--encoder", help="sentence-transformers name or local folder (default: packaged all-MiniLM-L6-v2)")
    add("--device", default="cpu", help="encoder device (default: cpu)")
    add("--batch-size", type=_positive_int, default=256, help="encoder batch size")
    add("--chunk-size", type=_positive_int, help=f"rows committed per step (default: {DEFAULT_CHUNK_SIZE}; "
        "webdataset: one shard)")
    add("--dtype", default="float16", choices=DTYPES, help="storage dtype")
    add("--overwrite", action="store_true", help="replace a different cache in OUTPUT")
    add("--lock-timeout", type=_seconds, help="seconds to wait for another build of OUTPUT before giving up "
        "(default: wait until it finishes; not for webdataset, whose processes share the shards out)")
    add("--allow-multiline-captions", action="store_true", help="accept CSV captions that span lines containing "
        "the separator (refused by default: the sign of an unbalanced quote)")
    add("--no-progress", action="store_true", help="hide the progress bar")
    # fmt: on
    return parser


def _reader_kwargs(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    given = {f: getattr(args, f[2:].replace("-", "_")) for f in _READER_FLAGS}
    given = {flag: value for flag, value in given.items() if value is not None}
    if wrong := [f for f in given if fmt not in _READER_FLAGS[f][1]]:
        takes = sorted(
            f for f, (_, formats, _) in _READER_FLAGS.items() if fmt in formats
        )
        raise UsageError(
            f"{', '.join(wrong)} does not apply to --format {fmt} (it takes "
            f"{', '.join(takes) or 'none of the reader options'})."
        )
    if args.allow_multiline_captions and fmt not in ("csv", "folder"):
        raise UsageError(
            f"--allow-multiline-captions does not apply to --format {fmt}."
        )
    if given.get("--csv-separator") == "":
        raise UsageError("--csv-separator must not be empty.")
    kwargs = {_READER_FLAGS[flag][0]: value for flag, value in given.items()}
    if fmt == "classes":
        kwargs["template"] = check_template(args.template or DEFAULT_TEMPLATE)
    if args.allow_multiline_captions:
        kwargs["allow_multiline"] = True
    return kwargs


def _check_output(output: str) -> Path:
    path = existing = Path(output)
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"-o/--output {output} is a file; give a folder for the cache."
        )
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"-o/--output {output}: cannot create a folder inside {existing}, which is "
            "a file."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"-o/--output {output}: {existing} is not writable.")
    return path


def parse_args(argv: Sequence[str] | None = None) -> EmbedOptions:
    """The checked options; UsageError for a flag the format does not take or a bad output."""
    args = _parser().parse_args(argv)
    fmt = args.format
    if fmt == "auto":
        fmt = detect_format(args.source, captions_file=args.captions_file)
    reader = _reader_kwargs(args, fmt)
    for flag in ("chunk_size", "lock_timeout"):
        if fmt == "webdataset" and getattr(args, flag) is not None:
            raise UsageError(
                f"--{flag.replace('_', '-')} does not apply to --format webdataset "
                "(each shard is written whole; under torchrun every process takes "
                "its own shards)."
            )
    return EmbedOptions(
        args.source, _check_output(args.output), fmt, reader, args.encoder,
        args.device, args.batch_size, args.chunk_size or DEFAULT_CHUNK_SIZE, args.dtype, args.overwrite,
        args.lock_timeout, not args.no_progress,
    )  # fmt: skip


def _encoder(options: EmbedOptions, device: str) -> Any:
    from xclr_plugin import text  # looked up now, so tests can stand in for it

    return text.TextEncoder(
        options.encoder, device=device, batch_size=options.batch_size
    )


def _build(options: EmbedOptions) -> int:
    if options.fmt == "webdataset":
        from xclr_plugin.cli.embed_shards import build_shards

        return build_shards(
            options.source, options.output, lambda device: _encoder(options, device),
            device=options.device, dtype=options.dtype,
            caption_key=options.reader.get("caption_key", "txt"),
            overwrite=options.overwrite, progress=options.progress,
        )  # fmt: skip
    records = read_captions(options.source, options.fmt, **options.reader)
    encoder = _encoder(options, options.device)
    start = time.perf_counter()
    cache = build_caption_cache(
        records, options.output, encoder, dtype=options.dtype,
        chunk_size=options.chunk_size, overwrite=options.overwrite,
        progress=options.progress, verify=True, lock_timeout=options.lock_timeout,
    )  # fmt: skip
    print(
        f"Caption cache ready: {cache.count} embeddings ({cache.dim}-d {cache.dtype}, "
        f"encoder {cache.encoder}) in {cache.path} after "
        f"{time.perf_counter() - start:.1f} s."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the cache is ready, 2 after a one-line error on stderr."""
    # The build's notes (waiting for another builder, resuming, repairing) reach the
    # user as "xclr-embed-captions: ..." lines on stderr.
    logger, handler = logging.getLogger("xclr_plugin.cache"), logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _build(parse_args(argv))
    except (ValueError, TypeError, OSError, ImportError) as err:
        # OSError covers FileNotFoundError, TimeoutError and a full or read-only disk.
        print_error(PROG, err)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
