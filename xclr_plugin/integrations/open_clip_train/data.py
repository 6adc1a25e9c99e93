"""Each sample's caption-embedding row: looked up, then carried with its batch.

Datasets append the row to the tokens; model hooks move it to the output dict, which
open_clip passes to the loss (and concatenates like the features under --accum-freq).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from xclr_plugin import text
from xclr_plugin.cache import CacheMismatchError, caption_lookup
from xclr_plugin.captions import CaptionRecord, shards
from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train.options import (
    PROG,
    Options,
    is_local,
    train_data_kind,
    world_size,
)

#: Output-dict key (and loss keyword) carrying each sample's caption-embedding row.
SAMPLE_INDEX_KEY = "xclr_sample_index"


def caption_embeddings(options: Options, args: argparse.Namespace) -> Any:
    """The training data's checked caption embeddings, by CSV row or ``__key__``."""
    kind, cache = train_data_kind(args), options.xclr_caption_cache
    name = options.xclr_text_encoder
    if kind not in ("csv", "webdataset"):
        raise UsageError(
            "--xclr-target-mode captions needs each sample's caption: give a CSV/TSV "
            "or webdataset --train-data (got --train-data "
            f"{args.train_data!r}, --dataset-type {args.dataset_type!r}), or use "
            "--xclr-target-mode clip-text, which needs no captions."
        )
    records = None
    if kind == "csv":
        records = _train_csv_records(args)
        if len(records) < args.batch_size * world_size():
            raise UsageError(
                f"--train-data has {len(records)} samples, fewer than one global batch "
                f"(--batch-size {args.batch_size} x {world_size()} process(es)); "
                "open_clip drops incomplete batches and would train on nothing."
            )
    elif cache is None or all(map(is_local, shards.expand_shard_urls(args.train_data))):
        try:
            records = shards.read_webdataset_captions(args.train_data, progress=True)
        except ValueError as err:
            raise UsageError(f"--train-data: {err}") from None
    else:
        logging.warning(
            "%s: --train-data has non-local shards; every sample's key is checked "
            "against --xclr-caption-cache as it is loaded.",
            PROG,
        )
    try:
        return caption_lookup(
            records,
            cache,
            lambda: _text_encoder(options),
            encoder_name=name and text.encoder_name(name),
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
            key = err.missing[0]
            urls = (
                u
                for k, _, u in shards.iter_webdataset_captions(args.train_data)
                if k == key
            )
            shard = next((f" (shard {u!r})" for u in urls), "")
            raise UsageError(
                f"--xclr-caption-cache {cache!r} has no caption embedding for "
                f"{len(err.missing)} of the {len(records or ())} samples of --train-data, "
                f"the first is key {key!r}{shard}. Build the cache from these shards: "
                f"{_embed_command(options, args)}"
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
    pairs = zip(table.images, table.captions, strict=True)
    return [CaptionRecord(str(p), str(c)) for p, c in pairs]


def _embed_command(options: Options, args: argparse.Namespace) -> str:
    """The ``xclr-embed-captions`` command that builds the cache of the training data."""
    kind, encoder = train_data_kind(args), options.xclr_text_encoder
    data, out = str(args.train_data), str(options.xclr_caption_cache)
    words = ["xclr-embed-captions", data, "-o", out, "--format", "csv"]
    if kind == "webdataset":
        words = ["xclr-embed-captions", "--format", "webdataset", data, "-o", out]
    keys = {
        "csv_separator": "\t",
        "csv_img_key": "filepath",
        "csv_caption_key": "title",
    }
    for key, default in keys.items() if kind == "csv" else ():
        if getattr(args, key) != default:
            words += [f"--{key.replace('_', '-')}", getattr(args, key)]
    return shlex.join(words + (["--encoder", encoder] if encoder else []))


def _text_encoder(options: Options) -> text.TextEncoder:
    device = options.xclr_text_device
    try:
        return text.TextEncoder(
            options.xclr_text_encoder, device=device, show_progress=True
        )
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        # RuntimeError: e.g. --xclr-text-device cuda without a usable GPU
        raise UsageError(
            f"--xclr-text-encoder/--xclr-text-device {device!r}: "
            f"cannot load the encoder: {err}"
        ) from None


def attach_sample_index_hooks(
    model: nn.Module, context_length: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks moving the row (the last token of text one longer than ``context_length``)
    to the model's output dict, in training mode only."""
    pending: list[Tensor] = []

    def strip(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        pending.clear()  # open_clip's training loop calls model(images, texts)
        text = args[1] if len(args) >= 2 else None
        if not isinstance(text, Tensor) or text.shape[1:] != (context_length + 1,):
            return None
        pending.append(text[:, -1])
        return (args[0], text[:, :-1], *args[2:])

    def carry(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not pending or not module.training or not isinstance(output, dict):
            return None
        return {**output, SAMPLE_INDEX_KEY: pending.pop()}

    return [model.register_forward_pre_hook(strip), model.register_forward_hook(carry)]


def indexed_csv_dataset(base: type[Any]) -> type[Any]:
    """A ``CsvDataset`` subclass whose token rows end with the sample's row index."""

    class IndexedCsvDataset(base):  # type: ignore[valid-type,misc]
        def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
            images, texts = super().__getitem__(idx)
            return images, torch.cat([texts, torch.tensor([idx], dtype=texts.dtype)])

    return IndexedCsvDataset


class KeyToRow:
    """webdataset stage: ``sample -> (image, tokens + [lookup.index_of(__key__)])``."""

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, Tensor]:
        key = sample["__key__"]
        try:
            row = self.lookup.index_of(key)
        except ValueError:
            raise ValueError(
                f"{PROG}: sample {key!r} of shard {sample.get('__url__')!r} has no "
                f"caption embedding in {getattr(self.lookup, 'path', 'the captions')}; "
                "build the cache from the training shards (xclr-embed-captions "
                "--format webdataset SHARDS -o DIR)."
            ) from None
        text = sample["text"]
        return sample["image"], torch.cat([text, text.new_tensor([row])])


def keyed_get_wds_dataset(ocd: Any, lookup: Any) -> Callable[..., Any]:
    """``get_wds_dataset`` whose last ``to_tuple("image", "text")`` is :class:`KeyToRow`."""
    original = ocd.get_wds_dataset

    def get_wds_dataset(args: Any, preprocess: Any, is_train: bool, **kw: Any) -> Any:
        if not is_train:  # evaluation data is not looked up in the training cache
            return original(args, preprocess, is_train, **kw)
        to_tuple = ocd.wds.to_tuple

        def keyed(*keys: str, **kwargs: Any) -> Any:
            if keys == ("image", "text") and not kwargs:
                return ocd.wds.map(KeyToRow(lookup))
            return to_tuple(*keys, **kwargs)

        with mock.patch.object(ocd.wds, "to_tuple", keyed):
            return original(args, preprocess, is_train, **kw)

    return get_wds_dataset
