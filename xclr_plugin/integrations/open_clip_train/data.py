"""Each sample's caption embedding: looked up in the data workers, carried with its tokens.

Datasets append a marker and the embedding's float32 bits to each token row; model
hooks strip them (whatever the tokenizer's context length) and put the embeddings in
the output dict, which open_clip passes to the loss (and concatenates like the
features under --accum-freq). CSV rows come from a caption cache (or are embedded at
start-up); webdataset samples from a per-shard cache, one shard at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from xclr_plugin import text
from xclr_plugin.cache import CacheMismatchError, caption_lookup
from xclr_plugin.cache.shards import (
    ShardCache,
    embed_shards,
    prepare_shard_cache,
    publish_index,
)
from xclr_plugin.captions import CaptionRecord, shards
from xclr_plugin.errors import UsageError
from xclr_plugin.integrations.open_clip_train.options import (
    Options,
    train_data_kind,
    world_size,
)

#: Output-dict key (and loss keyword) carrying each sample's caption embedding.
TARGETS_KEY = "xclr_caption_targets"
_MARK = -1  # never a token id: tells a packed row from a plain one


def pack(tokens: Tensor, target: Any) -> Tensor:
    """``tokens`` followed by the marker and the bits of the float32 ``target``."""
    bits = torch.as_tensor(target, dtype=torch.float32).contiguous().view(torch.int32)
    return torch.cat([tokens, tokens.new_tensor([_MARK]), bits.to(tokens.dtype)])


def unpack(text: Tensor, dim: int) -> tuple[Tensor, Tensor] | None:
    """The tokens and float32 targets of packed rows; None for rows without them."""
    if text.ndim != 2 or text.shape[1] <= dim + 1:
        return None
    if not bool((text[:, -dim - 1] == _MARK).all()):
        return None
    bits = text[:, -dim:].to(torch.int32).contiguous()
    return text[:, : -dim - 1], bits.view(torch.float32)


def caption_targets(
    options: Options, args: argparse.Namespace, stack: contextlib.ExitStack
) -> Any:
    """The training data's checked caption embeddings: by CSV row, or per shard."""
    kind = train_data_kind(args)
    if kind == "csv":
        return _csv_targets(options, args)
    if kind == "webdataset":
        return _shard_targets(options, args, stack)
    raise UsageError(
        "--xclr-target-mode captions needs each sample's caption: give a CSV/TSV "
        "or webdataset --train-data (got --train-data "
        f"{args.train_data!r}, --dataset-type {args.dataset_type!r}), or use "
        "--xclr-target-mode clip-text, which needs no captions."
    )


def _csv_targets(options: Options, args: argparse.Namespace) -> Any:
    cache, name = options.xclr_caption_cache, options.xclr_text_encoder
    records = _train_csv_records(args)
    if len(records) < args.batch_size * world_size():
        raise UsageError(
            f"--train-data has {len(records)} samples, fewer than one global batch "
            f"(--batch-size {args.batch_size} x {world_size()} process(es)); "
            "open_clip drops incomplete batches and would train on nothing."
        )
    try:
        return caption_lookup(
            records,
            cache,
            lambda: _text_encoder(options),
            encoder_name=name and text.encoder_name(name),
            build=False,
        )
    except UsageError:
        raise  # the encoder did not load
    except FileNotFoundError as err:
        raise UsageError(
            f"--xclr-caption-cache: {err} Build it for the training data first: "
            f"{_embed_command(options, args)}"
        ) from None
    except CacheMismatchError as err:
        raise UsageError(
            f"--xclr-caption-cache does not belong to --train-data {args.train_data!r}: "
            f"{err} Rebuild it: {_embed_command(options, args)} --overwrite"
        ) from None
    except ValueError as err:  # bad records, a damaged cache, or NaN rows
        flag = "--xclr-caption-cache" if cache else "--train-data/--xclr-text-encoder"
        raise UsageError(f"{flag}: {err}") from None


def _shard_targets(
    options: Options, args: argparse.Namespace, stack: contextlib.ExitStack
) -> ShardCache:
    """The per-shard cache of the shards, checked in O(shards); built now without one."""
    urls = shards.expand_shard_urls(args.train_data)
    folder, name = options.xclr_caption_cache, options.xclr_text_encoder
    command = _embed_command(options, args)
    if folder is None:  # small data: embed every shard now, in this process
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="xclr-"))
        encoder = _text_encoder(options)
        try:
            manifest = prepare_shard_cache(folder, encoder)
            with tqdm(total=len(urls), unit="shard", desc="Embedding captions") as bar:
                entries = embed_shards(
                    urls, folder, encoder, manifest, on_shard=lambda *_: bar.update()
                )
            publish_index(folder, entries)
        except ValueError as err:
            raise UsageError(f"--train-data: {err}") from None
    try:
        cache = ShardCache.open(
            folder, urls, encoder_name=name and text.encoder_name(name)
        )
    except FileNotFoundError as err:
        raise UsageError(
            f"--xclr-caption-cache: {err} Webdataset shards need a per-shard cache; "
            f"build it first: {command}"
        ) from None
    except ValueError as err:
        raise UsageError(
            f"--xclr-caption-cache: {err} Build the missing or changed shards (the "
            f"build redoes only those): {command}"
        ) from None
    if cache.caption_key != "txt":
        raise UsageError(
            f"--xclr-caption-cache {folder!r} holds the embeddings of the "
            f"{cache.caption_key!r} members; open_clip trains on the 'txt' captions."
        )
    return cache


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


def attach_target_hooks(
    model: nn.Module, dim: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks stripping packed ``dim``-wide targets from the text rows (the CSV dataset
    also serves evaluation) and, in training mode, putting them in the output dict."""
    pending: list[Tensor] = []

    def strip(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        pending.clear()  # open_clip's training loop calls model(images, texts)
        packed = args[1] if len(args) >= 2 else None
        if not isinstance(packed, Tensor):
            return None
        if (parts := unpack(packed, dim)) is None:
            return None
        pending.append(parts[1])
        return (args[0], parts[0], *args[2:])

    def carry(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not pending or not module.training or not isinstance(output, dict):
            return None
        return {**output, TARGETS_KEY: pending.pop()}

    return [model.register_forward_pre_hook(strip), model.register_forward_hook(carry)]


def targets_csv_dataset(base: type[Any], lookup: Any) -> type[Any]:
    """A ``CsvDataset`` subclass whose token rows carry the row's caption embedding."""

    class CaptionedCsvDataset(base):  # type: ignore[valid-type,misc]
        def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
            images, texts = super().__getitem__(idx)
            return images, pack(texts, lookup[idx])

    return CaptionedCsvDataset


class ShardTargets:
    """webdataset stage after ``rename``: each sample's embedding, checked against its caption."""

    def __init__(self, rename: Callable[..., Any], cache: ShardCache) -> None:
        self.rename, self.cache = rename, cache

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in self.rename(source):
            url, key = sample.get("__url__"), sample["__key__"]
            try:
                target = self.cache.target(str(url), key, sample["text"])
            except ValueError as err:  # one line, also from a DataLoader worker
                raise UsageError(str(err)) from None
            yield {**sample, TARGETS_KEY: target}


class PackTargets:
    """webdataset stage in place of ``to_tuple("image", "text")``: tokens + target."""

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, Tensor]:
        return sample["image"], pack(sample["text"], np.asarray(sample[TARGETS_KEY]))


def targets_get_wds_dataset(ocd: Any, cache: ShardCache) -> Callable[..., Any]:
    """``get_wds_dataset`` whose training pipeline carries each sample's embedding."""
    original = ocd.get_wds_dataset

    def get_wds_dataset(args: Any, preprocess: Any, is_train: bool, **kw: Any) -> Any:
        if not is_train:  # evaluation data is not looked up in the training cache
            return original(args, preprocess, is_train, **kw)
        rename, to_tuple = ocd.wds.rename, ocd.wds.to_tuple

        def with_targets(*keys: Any, **kwargs: Any) -> Any:
            stage = rename(*keys, **kwargs)
            return ShardTargets(stage, cache) if kwargs.get("text") == "txt" else stage

        def packed(*keys: str, **kwargs: Any) -> Any:
            if keys == ("image", "text") and not kwargs:
                return ocd.wds.map(PackTargets())
            return to_tuple(*keys, **kwargs)

        with (
            mock.patch.object(ocd.wds, "rename", with_targets),
            mock.patch.object(ocd.wds, "to_tuple", packed),
        ):
            return original(args, preprocess, is_train, **kw)

    return get_wds_dataset
