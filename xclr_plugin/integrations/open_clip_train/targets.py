"""The caption embeddings of the training data, looked up by CSV row or ``__key__``."""

from __future__ import annotations

import argparse
import logging
import shlex
from typing import Any

from xclr_plugin import text
from xclr_plugin.cache import CacheMismatchError, caption_lookup
from xclr_plugin.captions import CaptionRecord
from xclr_plugin.captions.shards import (
    expand_shard_urls,
    iter_webdataset_captions,
    read_webdataset_captions,
)
from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train.options import (
    PROG,
    Options,
    is_local,
    train_data_kind,
    world_size,
)


def caption_embeddings(options: Options, args: argparse.Namespace) -> Any:
    """Rows of the training data's caption embeddings (finite), by CSV row or ``__key__``.

    Every key of local shards is checked to have a row before training, the keys of
    other shards as they arrive.
    """
    kind = train_data_kind(args)
    if kind not in ("csv", "webdataset"):
        raise UsageError(
            "--xclr-target-mode captions needs each sample's caption: give a CSV/TSV "
            "or webdataset --train-data (got --train-data "
            f"{args.train_data!r}, --dataset-type {args.dataset_type!r}), or use "
            "--xclr-target-mode clip-text, which needs no captions."
        )
    cache = options.xclr_caption_cache
    records = None
    if kind == "csv":
        records = _train_csv_records(args)
        if len(records) < args.batch_size * world_size():
            raise UsageError(
                f"--train-data has {len(records)} samples, fewer than one global batch "
                f"(--batch-size {args.batch_size} x {world_size()} process(es)); "
                "open_clip drops incomplete batches and would train on nothing."
            )
    elif cache is None or all(is_local(u) for u in expand_shard_urls(args.train_data)):
        try:
            records = read_webdataset_captions(args.train_data, progress=True)
        except ValueError as err:
            raise UsageError(f"--train-data: {err}") from None
    else:
        logging.warning(
            "%s: --train-data has non-local shards; every sample's key is checked "
            "against --xclr-caption-cache as it is loaded.",
            PROG,
        )
    encoder = options.xclr_text_encoder
    try:
        return caption_lookup(
            records,
            cache,
            lambda: _text_encoder(options),
            encoder_name=None if encoder is None else text.encoder_name(encoder),
            build=False,
            subset=kind == "webdataset",
        )
    except UsageError:
        raise  # the encoder did not load
    except FileNotFoundError as err:
        raise UsageError(
            f"--xclr-caption-cache: {err} Build it for the training data first: "
            f"{_embed_command(options, args)}"
        ) from None
    except CacheMismatchError as err:
        if err.missing:  # webdataset: keys without a row
            raise UsageError(
                f"--xclr-caption-cache {cache!r} has no caption embedding for "
                f"{len(err.missing)} of the {len(records or ())} samples of --train-data, "
                f"the first is key {err.missing[0]!r}"
                f"{_shard_of(args.train_data, err.missing[0])}. Build the cache from "
                f"these shards: {_embed_command(options, args)}"
            ) from None
        raise UsageError(
            f"--xclr-caption-cache does not belong to --train-data {args.train_data!r}: "
            f"{err} Rebuild it: {_embed_command(options, args)} --overwrite"
        ) from None
    except ValueError as err:  # bad records, a damaged cache, or NaN rows
        flag = "--xclr-caption-cache" if cache else "--train-data/--xclr-text-encoder"
        raise UsageError(f"{flag}: {err}") from None


def _train_csv_records(args: argparse.Namespace) -> list[CaptionRecord]:
    """The training CSV's (image, caption) rows, read exactly as open_clip reads them."""
    from open_clip_train.data import CsvDataset

    try:
        keys = (args.csv_img_key, args.csv_caption_key)
        table = CsvDataset(args.train_data, None, *keys, sep=args.csv_separator)
    except KeyError as err:
        raise UsageError(
            f"--train-data {args.train_data!r} has no column {err} (--csv-img-key "
            f"{args.csv_img_key!r}, --csv-caption-key {args.csv_caption_key!r}, "
            f"--csv-separator {args.csv_separator!r})."
        ) from None
    # CsvDataset tokenizes str(caption): the same strings are embedded.
    return [
        CaptionRecord(str(p), str(c))
        for p, c in zip(table.images, table.captions, strict=True)
    ]


def _shard_of(urls: str, key: str) -> str:
    """`` (shard URL)`` of the shard holding ``key``, for error messages."""
    for found, _, url in iter_webdataset_captions(urls):
        if found == key:
            return f" (shard {url!r})"
    return ""


def _embed_command(options: Options, args: argparse.Namespace) -> str:
    """The ``xclr-embed-captions`` command that builds the cache of the training data."""
    out, encoder = str(options.xclr_caption_cache), options.xclr_text_encoder
    if train_data_kind(args) == "webdataset":
        data, out = shlex.quote(str(args.train_data)), shlex.quote(out)
        command = f"xclr-embed-captions --format webdataset {data} -o {out}"
        return command + (f" --encoder {shlex.quote(encoder)}" if encoder else "")
    command = f"xclr-embed-captions {args.train_data} -o {out} --format csv"
    for key, default in (
        ("csv_separator", "\t"),
        ("csv_img_key", "filepath"),
        ("csv_caption_key", "title"),
    ):
        if getattr(args, key) != default:
            command += f" --{key.replace('_', '-')} {getattr(args, key)!r}"
    return command + (f" --encoder {encoder}" if encoder else "")


def _text_encoder(options: Options) -> text.TextEncoder:
    try:
        return text.TextEncoder(
            options.xclr_text_encoder,
            device=options.xclr_text_device,
            show_progress=True,
        )
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        # RuntimeError: e.g. --xclr-text-device cuda without a usable GPU
        raise UsageError(
            f"--xclr-text-encoder/--xclr-text-device {options.xclr_text_device!r}: "
            f"cannot load the encoder: {err}"
        ) from None
