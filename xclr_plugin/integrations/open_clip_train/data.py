"""How each sample's caption-embedding row travels with its batch to the loss.

The training ``CsvDataset`` appends the sample's row to its token row, the webdataset
pipeline the cache row of its ``__key__``. Hooks on the model strip that column before
the model runs and put it in the output dict as :data:`SAMPLE_INDEX_KEY`, which open_clip
passes to the loss (and, with ``--accum-freq N > 1``, caches and concatenates like the
features, so rows and features always line up).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from xclr_plugin.integrations.open_clip_train.options import PROG

#: Output-dict key (and loss keyword) carrying each sample's caption-embedding row.
SAMPLE_INDEX_KEY = "xclr_sample_index"


def attach_sample_index_hooks(
    model: nn.Module, context_length: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks moving the last token column (the row) of ``model``'s text to its output.

    Only token rows one longer than ``context_length`` (the tokenizer's) carry a row;
    the output dict gets it in training mode only (evaluation never sees it).
    """
    pending: list[Tensor] = []

    def pre_hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        pending.clear()
        text = args[1] if len(args) >= 2 else kwargs.get("text")
        if not isinstance(text, Tensor) or text.shape[1:] != (context_length + 1,):
            return None
        pending.append(text[:, -1])
        if len(args) >= 2:
            return (args[0], text[:, :-1], *args[2:]), kwargs
        return args, {**kwargs, "text": text[:, :-1]}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        indices = pending.pop() if pending else None
        if indices is None or not module.training or not isinstance(output, dict):
            return None
        return {**output, SAMPLE_INDEX_KEY: indices}

    return [
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.register_forward_hook(hook),
    ]


def indexed_csv_dataset(base: type[Any]) -> type[Any]:
    """A ``CsvDataset`` subclass whose token rows end with the sample's row index."""

    class IndexedCsvDataset(base):  # type: ignore[valid-type,misc]
        """open_clip's ``CsvDataset``, tokens followed by the row index (xclr-plugin)."""

        def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
            images, texts = super().__getitem__(idx)
            return images, torch.cat([texts, torch.tensor([idx], dtype=texts.dtype)])

    return IndexedCsvDataset


class KeyToRow:
    """webdataset stage: ``sample -> (image, tokens + [lookup.index_of(__key__)])``.

    It replaces the last ``to_tuple("image", "text")`` of open_clip's training
    pipeline, after any shuffling, resampling, worker or node split.
    """

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, Tensor]:
        """The training tuple with the sample's row appended to its tokens."""
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
    """open_clip's ``get_wds_dataset`` whose training pipeline ends in :class:`KeyToRow`."""
    original = ocd.get_wds_dataset

    def get_wds_dataset(
        args: argparse.Namespace, preprocess: Any, is_train: bool, *a: Any, **kw: Any
    ) -> Any:
        if not is_train:  # evaluation data is not looked up in the training cache
            return original(args, preprocess, is_train, *a, **kw)
        to_tuple = ocd.wds.to_tuple

        def keyed(*keys: str, **kwargs: Any) -> Any:
            if keys == ("image", "text") and not kwargs:
                return ocd.wds.map(KeyToRow(lookup))
            return to_tuple(*keys, **kwargs)

        with mock.patch.object(ocd.wds, "to_tuple", keyed):
            return original(args, preprocess, is_train, *a, **kw)

    return get_wds_dataset
