"""``xclr-openclip-train``: open_clip's own trainer with ``--loss NAME``.

Every argument of ``python -m open_clip_train.main`` keeps its meaning; this command adds

- ``--loss NAME``: any image-text loss of the registry (:mod:`xclr_plugin.registry`),
  e.g. ``clip``, ``siglip``, ``xclr-clip``. Without it the command is
  ``open_clip_train.main`` unchanged.
- X-CLR options (for losses with caption targets, e.g. ``xclr-clip``):
  ``--xclr-target-mode {captions,clip-text}``, ``--xclr-target-temperature``,
  ``--xclr-text-encoder``, ``--xclr-text-device``, ``--xclr-caption-cache``.

open_clip's training loop, data pipeline, checkpointing, logging and evaluation run as
they are. This module is the whole adaptation layer; it is pinned to the open_clip 3.x
API (``open_clip_torch>=3.3,<4``) and refuses other major versions with a clear error.
While :func:`main` runs, :func:`patch_open_clip_train` replaces these module globals,
and restores them afterwards:

====================================================  ===================================
``open_clip_train.main.parse_args``                   takes the plugin flags
                                                      (``parse_known_args``), passes the
                                                      rest to open_clip's parser, checks
                                                      everything before training starts
                                                      and stores the flags on ``args``
                                                      (so they show in ``params.txt``)
``open_clip_train.main.create_loss``                  builds ``--loss`` from the registry
``open_clip_train.main.create_model_and_transforms``  captions mode only: registers the
                                                      sample-index hooks on the model
``open_clip_train.data.CsvDataset``                   captions mode only: appends each
                                                      sample's row index to its tokens
``open_clip_train.data.get_wds_dataset``              captions mode only: the training
                                                      pipeline's last ``to_tuple`` also
                                                      appends the cache row of the
                                                      sample's ``__key__`` (:class:`KeyToRow`)
====================================================  ===================================

How captions reach the loss per sample (``--xclr-target-mode captions``): the CSV
dataset appends the row index to each token row; a forward pre-hook on the model
strips it again before the model runs and a forward hook adds it to the model's output
dict as ``xclr_sample_index`` (training mode only). open_clip passes every output key to
the loss, and with ``--accum-freq N > 1`` it caches and concatenates that key like the
features, so the indices always line up with the features. The loss wrapper
:class:`SampleCaptionTargets` looks up the caption embeddings of those rows, from a
caption cache built for the training CSV (``xclr-embed-captions``; checked against the
CSV before training) or embedded at start-up with a frozen sentence encoder. Webdataset
shards take the same route with the row of each sample's ``__key__`` in a cache built
from the shards (``xclr-embed-captions --format webdataset``); the training shards'
keys are checked against the cache before training (:mod:`xclr_plugin.shards` reads
only the tar headers and captions). Every cache row must be finite, and a non-finite
loss stops training before its update (:class:`FiniteLossCheck`).
With ``--xclr-target-mode clip-text`` the targets come from the batch's text features
and nothing is patched but the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SAMPLE_INDEX_KEY",
    "FiniteLossCheck",
    "KeyToRow",
    "NonFiniteLossError",
    "OpenClipTrainError",
    "PluginOptions",
    "SampleCaptionTargets",
    "SampleIndexHooks",
    "build_loss",
    "main",
    "parse_plugin_args",
    "patch_open_clip_train",
    "plugin_parser",
    "preserve_logging",
    "require_open_clip_3",
]

PROG = "xclr-openclip-train"
#: Output-dict key (and loss keyword) carrying each sample's caption-embedding row
#: (its training CSV row, or the cache row of its webdataset ``__key__``).
SAMPLE_INDEX_KEY = "xclr_sample_index"
SUPPORTED_OPEN_CLIP_MAJOR = 3
TARGET_MODES = ("captions", "clip-text")
_XCLR_FLAGS = (
    "xclr_target_mode",
    "xclr_target_temperature",
    "xclr_text_encoder",
    "xclr_text_device",
    "xclr_caption_cache",
)


class OpenClipTrainError(ValueError):
    """A configuration error found before training starts (printed by :func:`main`)."""


@dataclass(frozen=True)
class PluginOptions:
    """The flags this command adds to ``open_clip_train.main``.

    Attributes:
        loss: Registered loss name, or None for open_clip's own choice.
        xclr_target_mode: ``captions`` or ``clip-text``; None means ``captions`` for a
            loss with caption targets.
        xclr_target_temperature: ``tau_s``; None keeps the loss's default.
        xclr_text_encoder: Sentence encoder (name or folder) for captions mode; None is
            the packaged all-MiniLM-L6-v2.
        xclr_text_device: Device of the sentence encoder.
        xclr_caption_cache: Caption-embedding cache of the training CSV, or None to
            embed the captions at start-up.
    """

    loss: str | None = None
    xclr_target_mode: str | None = None
    xclr_target_temperature: float | None = None
    xclr_text_encoder: str | None = None
    xclr_text_device: str = "cpu"
    xclr_caption_cache: str | None = None

    def xclr_flags_given(self) -> list[str]:
        """The X-CLR flags set on the command line (those differing from the default)."""
        default = PluginOptions()
        return [
            "--" + name.replace("_", "-")
            for name in _XCLR_FLAGS
            if getattr(self, name) != getattr(default, name)
        ]


def plugin_parser() -> argparse.ArgumentParser:
    """The parser of the flags this command adds (open_clip's flags are not in it)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "open_clip_train.main with --loss NAME (X-CLR and any registered image-text "
            "loss). All open_clip_train arguments are accepted unchanged."
        ),
        add_help=False,
        allow_abbrev=False,  # never swallow an abbreviated open_clip flag such as --lo
    )
    group = parser.add_argument_group("loss selection (xclr-plugin)")
    group.add_argument(
        "--loss",
        default=None,
        metavar="NAME",
        help="image-text loss from the xclr-plugin registry, e.g. clip, siglip, "
        "xclr-clip (default: open_clip's choice)",
    )
    group = parser.add_argument_group("X-CLR targets (losses with caption targets)")
    group.add_argument(
        "--xclr-target-mode",
        choices=TARGET_MODES,
        default=None,
        help="captions: frozen sentence-encoder embeddings of each sample's caption "
        "(needs a CSV/TSV or webdataset --train-data); clip-text: the batch's "
        "detached text features "
        "(default: captions)",
    )
    group.add_argument(
        "--xclr-target-temperature",
        type=float,
        default=None,
        metavar="TAU_S",
        help="temperature of the soft target distribution (default: the loss's, 0.1)",
    )
    group.add_argument(
        "--xclr-text-encoder",
        default=None,
        metavar="MODEL",
        help="sentence-transformers model name or folder (default: the packaged "
        "all-MiniLM-L6-v2, offline)",
    )
    group.add_argument(
        "--xclr-text-device",
        default="cpu",
        help="device of the sentence encoder when embedding at start-up (default: cpu)",
    )
    group.add_argument(
        "--xclr-caption-cache",
        default=None,
        metavar="DIR",
        help="caption-embedding cache of the training data, built with "
        "'xclr-embed-captions TRAIN.csv -o DIR' or 'xclr-embed-captions --format "
        "webdataset SHARDS -o DIR' (default: embed the captions at start-up)",
    )
    return parser


def parse_plugin_args(argv: Sequence[str]) -> tuple[PluginOptions, list[str]]:
    """Splits the command line into this command's flags and open_clip's.

    Args:
        argv: The full argument list.

    Returns:
        The plugin options and the arguments left for ``open_clip_train``.
    """
    namespace, rest = plugin_parser().parse_known_args(list(argv))
    return PluginOptions(**vars(namespace)), rest


def require_open_clip_3() -> None:
    """Checks that the installed open_clip is 3.x with the patch points this module uses.

    Raises:
        OpenClipTrainError: Naming the installed version (or missing piece) and the fix.
    """
    try:
        import open_clip
        import open_clip_train.data as ocd
        import open_clip_train.main as ocm
    except ImportError as err:
        raise OpenClipTrainError(
            f"{PROG} needs open_clip_torch 3.x with its training extra ({err}). Install "
            'it: pip install "xclr-plugin[openclip]"'
        ) from err
    version = str(getattr(open_clip, "__version__", "unknown"))
    major = version.split(".")[0]
    if major != str(SUPPORTED_OPEN_CLIP_MAJOR):
        raise OpenClipTrainError(
            f"{PROG} supports open_clip_torch {SUPPORTED_OPEN_CLIP_MAJOR}.x (the "
            f"open_clip_train.main API it patches), found {version}. Install a supported "
            'version: pip install "open_clip_torch[training]>=3.3,<4".'
        )
    needed = [
        (ocm, n)
        for n in ("main", "parse_args", "create_loss", "create_model_and_transforms")
    ]
    needed.append((ocd, "CsvDataset"))
    missing = [
        f"{mod.__name__}.{name}" for mod, name in needed if not hasattr(mod, name)
    ]
    if missing:
        raise OpenClipTrainError(
            f"open_clip_torch {version} lacks {', '.join(missing)}, which {PROG} patches; "
            "install open_clip_torch[training]>=3.3,<4."
        )


# -- checks before training ----------------------------------------------------------


@dataclass
class _Setup:
    """What :func:`_prepare` found: the loss spec and the caption embeddings."""

    options: PluginOptions
    targets: str  # "captions", "labels" or "none", from the registry
    target_mode: str | None  # for losses with caption targets
    caption_embeddings: Any = None  # Tensor, CaptionCache or CaptionTable


def _prepare(options: PluginOptions, args: argparse.Namespace) -> _Setup:
    """Checks the plugin flags against open_clip's and loads the caption embeddings.

    Raises:
        OpenClipTrainError: For any inconsistency, before anything is written.
    """
    from xclr_plugin import registry

    name = options.loss
    assert name is not None
    try:
        spec = registry.loss_info(name)
    except ValueError as err:
        raise OpenClipTrainError(f"--loss: {err}") from None
    if spec.inputs != "image-text":
        fitting = [n for n in registry.list_losses() if _is_image_text(n)]
        raise OpenClipTrainError(
            f"--loss {name!r} is a {spec.inputs} (lightly-style) loss; open_clip trains "
            f"image-text models and needs an image-text loss: {', '.join(fitting)}."
        )
    if getattr(args, "distill_model", None) and getattr(
        args, "distill_pretrained", None
    ):
        raise OpenClipTrainError(
            "--loss cannot be combined with --distill-model/--distill-pretrained "
            "(distillation has its own loss in open_clip); drop one of them."
        )
    if "coca" in str(args.model).lower():
        raise OpenClipTrainError(
            f"--loss does not support CoCa models (--model {args.model}), whose "
            "captioning loss open_clip builds itself; drop --loss."
        )
    _check_open_clip_args(args)
    if spec.targets != "captions":
        given = options.xclr_flags_given()
        if given:
            raise OpenClipTrainError(
                f"{', '.join(given)} only apply to losses with caption targets (such as "
                f"xclr-clip); --loss {name!r} takes none."
            )
        return _Setup(options, spec.targets, None)

    if options.xclr_target_temperature is not None:
        from xclr_plugin.functional import validate_temperature

        try:
            validate_temperature(
                "--xclr-target-temperature", options.xclr_target_temperature
            )
        except ValueError as err:
            raise OpenClipTrainError(str(err)) from None
    mode = options.xclr_target_mode or "captions"
    setup = _Setup(options, spec.targets, mode)
    if mode == "clip-text":
        for flag in ("xclr_text_encoder", "xclr_caption_cache"):
            if getattr(options, flag) is not None:
                raise OpenClipTrainError(
                    f"--{flag.replace('_', '-')} is only used with --xclr-target-mode "
                    "captions; clip-text targets come from the model's text features."
                )
        return setup
    setup.caption_embeddings = _caption_embeddings(options, args)
    return setup


def _is_image_text(name: str) -> bool:
    from xclr_plugin import registry

    try:
        return registry.loss_info(name).inputs == "image-text"
    except (ValueError, ImportError):
        return False


def _train_data_kind(args: argparse.Namespace) -> str | None:
    """Which open_clip dataset ``--train-data`` selects (``get_dataset_fn``'s rule)."""
    dataset_type = args.dataset_type
    if dataset_type == "synthetic":
        return "synthetic"
    if not args.train_data:
        return None
    if dataset_type in ("csv", "webdataset"):
        return str(dataset_type)
    ext = str(args.train_data).split(".")[-1]
    if dataset_type == "auto" and ext in ("csv", "tsv"):
        return "csv"
    if dataset_type == "auto" and ext == "tar":
        return "webdataset"
    raise OpenClipTrainError(
        f"--train-data {args.train_data!r}: open_clip cannot tell its type from the "
        f"extension {ext!r}; give --dataset-type csv or --dataset-type webdataset."
    )


def _is_local(url: str) -> bool:
    """Whether a shard URL is a local file path (not ``pipe:``, ``http:``, ...)."""
    head = url.split("/", 1)[0]
    return url.startswith("file:") or ":" not in head or len(head) == 2  # C: drives


def _local_path(url: str) -> str:
    return url[5:] if url.startswith("file:") else url


def _check_open_clip_args(args: argparse.Namespace) -> None:
    """Refuses what open_clip would only refuse after creating ``logs/NAME``.

    open_clip creates the run folder first and then fails on these with an
    ``AssertionError``/``RuntimeError``; a re-run then says "Experiment already exists".

    Raises:
        OpenClipTrainError: Naming the flag and the fix.
    """
    kind = _train_data_kind(args)
    if kind is None:
        raise OpenClipTrainError(
            f"--loss {args.loss} trains a model: give --train-data (a CSV/TSV file or "
            "webdataset shards), or --dataset-type synthetic."
        )
    if args.accum_freq < 1:
        raise OpenClipTrainError(f"--accum-freq must be >= 1, got {args.accum_freq}.")
    if args.batch_size < 1:
        raise OpenClipTrainError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.workers < 0:
        raise OpenClipTrainError(f"--workers must be >= 0, got {args.workers}.")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    log_file = "out-0" if args.log_local else "out.log"
    run = os.path.join(args.logs, args.name) if args.name else None
    if run and args.resume != "latest" and os.path.exists(os.path.join(run, log_file)):
        # open_clip returns -1 on the first rank only; the other ranks would hang.
        raise OpenClipTrainError(
            f"the experiment {run!r} already exists; give another --name (or "
            "--resume latest to continue it)."
        )
    if args.lock_text and not args.lock_text_freeze_layer_norm:
        text_cfg = (open_clip_model_config(args.model) or {}).get("text_cfg", {})
        if not text_cfg.get("hf_model_name"):
            raise OpenClipTrainError(
                "--lock-text needs --lock-text-freeze-layer-norm with open_clip's own "
                "text towers (open_clip does not support unfreezing their LayerNorm)."
            )
    if kind == "csv" and not os.path.isfile(args.train_data):
        raise OpenClipTrainError(f"--train-data {args.train_data!r} does not exist.")
    if kind != "webdataset":
        return
    from xclr_plugin.shards import expand_shard_urls

    try:
        shards = expand_shard_urls(args.train_data)
    except ValueError as err:
        raise OpenClipTrainError(f"--train-data: {err}") from None
    missing = [u for u in shards if _is_local(u) and not os.path.isfile(_local_path(u))]
    if missing:
        raise OpenClipTrainError(
            f"--train-data: {len(missing)} of {len(shards)} shard(s) do not exist, the "
            f"first is {missing[0]!r}."
        )
    # open_clip skips unreadable shards; with nothing left to read it loops forever.
    empty = [u for u in shards if _is_local(u) and os.path.getsize(_local_path(u)) == 0]
    if empty:
        raise OpenClipTrainError(
            f"--train-data: {len(empty)} of {len(shards)} shard(s) are empty files, the "
            f"first is {empty[0]!r}."
        )
    if args.train_num_samples is None:
        from open_clip_train.data import get_dataset_size

        if get_dataset_size(args.train_data)[0] is None:
            raise OpenClipTrainError(
                "--dataset-type webdataset needs --train-num-samples (no sizes.json or "
                "__len__ file next to the shards tells open_clip how many samples an "
                "epoch has)."
            )
    elif args.train_num_samples < 1:
        raise OpenClipTrainError(
            f"--train-num-samples must be >= 1, got {args.train_num_samples}."
        )
    if not args.dataset_resampled and len(shards) < args.workers * world_size:
        raise OpenClipTrainError(
            f"--train-data has {len(shards)} shard(s), fewer than --workers "
            f"{args.workers} x {world_size} process(es); open_clip gives every worker "
            "its own shards. Use fewer --workers, more shards or --dataset-resampled."
        )


def open_clip_model_config(name: str) -> dict[str, Any] | None:
    """open_clip's config of a model name (None for hub or unknown names)."""
    try:
        from open_clip import get_model_config

        config = get_model_config(name)
    except Exception:
        return None
    return config if isinstance(config, dict) else None


def _train_csv_captions(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The training CSV's image paths and captions, read exactly as open_clip reads them.

    Raises:
        OpenClipTrainError: If the training data is not a CSV/TSV file.
    """
    from open_clip_train.data import CsvDataset

    train_data = args.train_data
    if not os.path.isfile(train_data):
        raise OpenClipTrainError(f"--train-data {train_data!r} does not exist.")
    try:
        table = CsvDataset(
            train_data,
            transforms=None,
            img_key=args.csv_img_key,
            caption_key=args.csv_caption_key,
            sep=args.csv_separator,
        )
    except KeyError as err:
        raise OpenClipTrainError(
            f"--train-data {train_data!r} has no column {err} (--csv-img-key "
            f"{args.csv_img_key!r}, --csv-caption-key {args.csv_caption_key!r}, "
            f"--csv-separator {args.csv_separator!r})."
        ) from None
    # CsvDataset tokenizes str(caption): the same strings are embedded.
    return [str(p) for p in table.images], [str(c) for c in table.captions]


def _caption_embeddings(options: PluginOptions, args: argparse.Namespace) -> Any:
    """The training data's caption embeddings: a checked cache, or embedded now.

    For a CSV, row ``i`` belongs to CSV row ``i``. For webdataset shards the result
    has ``index_of(key)``, the row of a sample's ``__key__``.
    """
    kind = _train_data_kind(args)
    if kind not in ("csv", "webdataset"):
        raise OpenClipTrainError(
            "--xclr-target-mode captions needs each sample's caption: give a CSV/TSV "
            "or webdataset --train-data (got --train-data "
            f"{args.train_data!r}, --dataset-type {args.dataset_type!r}), or use "
            "--xclr-target-mode clip-text, which needs no captions."
        )
    if kind == "webdataset":
        return _webdataset_caption_embeddings(options, args)

    from xclr_plugin.captions import CaptionRecord

    images, captions = _train_csv_captions(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if len(captions) < args.batch_size * world_size:
        raise OpenClipTrainError(
            f"--train-data has {len(captions)} samples, fewer than one global batch "
            f"(--batch-size {args.batch_size} x {world_size} process(es)); open_clip "
            "drops incomplete batches and would train on nothing."
        )
    encoder = None
    if options.xclr_text_encoder is not None or options.xclr_caption_cache is None:
        encoder = _text_encoder(options)
    if options.xclr_caption_cache is None:
        embeddings = encoder.encode(captions)  # type: ignore[union-attr]
        _check_finite_embeddings(embeddings, images)
        return embeddings
    return _open_cache(
        options,
        args,
        encoder,
        [CaptionRecord(i, c) for i, c in zip(images, captions, strict=True)],
    )


def _check_finite_embeddings(embeddings: Tensor, keys: Sequence[str]) -> None:
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise OpenClipTrainError(
            f"The text encoder gave NaN or infinite embeddings for {bad.numel()} "
            f"caption(s), the first for {keys[int(bad[0])]!r}; check "
            "--xclr-text-encoder."
        )


def _open_cache(
    options: PluginOptions,
    args: argparse.Namespace,
    encoder: Any,
    records: Any,
) -> Any:
    """Opens ``--xclr-caption-cache`` for training: checked, every row finite."""
    from xclr_plugin.cache import CaptionCache

    path = options.xclr_caption_cache
    assert path is not None
    try:
        cache = CaptionCache.open(path, encoder=encoder, records=records)
    except FileNotFoundError as err:
        raise OpenClipTrainError(
            f"--xclr-caption-cache: {err} Build it for the training data first: "
            f"{_embed_command(args, path)}"
        ) from None
    except ValueError as err:
        raise OpenClipTrainError(
            f"--xclr-caption-cache does not belong to --train-data {args.train_data!r}: "
            f"{err} Rebuild it: {_embed_command(args, path)} --overwrite"
        ) from None
    try:
        # One NaN row makes every loss and gradient of its batches NaN.
        cache.check_finite()
    except ValueError as err:
        raise OpenClipTrainError(f"--xclr-caption-cache: {err}") from None
    return cache


def _webdataset_caption_embeddings(
    options: PluginOptions, args: argparse.Namespace
) -> Any:
    """Caption embeddings of webdataset shards, looked up by ``__key__``.

    With ``--xclr-caption-cache`` the cache (built by ``xclr-embed-captions --format
    webdataset``) is opened with every row checked finite, and the training shards are
    read (headers and captions only, see :mod:`xclr_plugin.shards`) to check, before
    training, that every sample's key has a row: exactly the cache's records when the
    shards are the ones it was built from, else key by key (a subset of its shards).
    Shards that are not local files are checked sample by sample as they arrive.
    Without a cache, the shards' captions are embedded now.
    """
    from xclr_plugin.shards import expand_shard_urls, read_webdataset_captions

    local = all(_is_local(u) for u in expand_shard_urls(args.train_data))
    records = None
    if local or options.xclr_caption_cache is None:
        try:
            records = read_webdataset_captions(args.train_data, progress=True)
        except ValueError as err:
            raise OpenClipTrainError(f"--train-data: {err}") from None
    encoder = None
    if options.xclr_text_encoder is not None or options.xclr_caption_cache is None:
        encoder = _text_encoder(options)
    if options.xclr_caption_cache is None:
        from xclr_plugin.cache import CaptionTable

        assert records is not None and encoder is not None
        keys = [r.filename for r in records]
        embeddings = encoder.encode([r.caption for r in records])
        _check_finite_embeddings(embeddings, keys)
        return CaptionTable(embeddings, keys)

    cache = _open_cache(options, args, encoder, None)
    if records is None:
        logging.warning(
            "%s: --train-data has non-local shards; every sample's key is checked "
            "against --xclr-caption-cache as it is loaded.",
            PROG,
        )
        return cache
    try:
        cache.check(records=records)  # the very shards the cache was built from
        exact = True
    except ValueError:
        exact = False
    if not exact:
        missing = [r.filename for r in records if not _has_key(cache, r.filename)]
        if missing:
            raise OpenClipTrainError(
                f"--xclr-caption-cache {options.xclr_caption_cache!r} has no caption "
                f"embedding for {len(missing)} of the {len(records)} samples of "
                f"--train-data, the first is key {missing[0]!r}"
                f"{_shard_of(args.train_data, missing[0])}. Build the cache from these "
                f"shards: {_embed_command(args, options.xclr_caption_cache)}"
            )
    else:
        _has_key(cache, records[0].filename)  # builds the key index before workers fork
    return cache


def _has_key(cache: Any, key: str) -> bool:
    try:
        cache.index_of(key)
    except ValueError:
        return False
    return True


def _shard_of(urls: str, key: str) -> str:
    """`` (shard URL)`` of the shard holding ``key``, for error messages."""
    from xclr_plugin.shards import iter_webdataset_captions

    for found, _, url in iter_webdataset_captions(urls):
        if found == key:
            return f" (shard {url!r})"
    return ""


def _embed_command(args: argparse.Namespace, out: str) -> str:
    """The ``xclr-embed-captions`` command that builds the cache of the training CSV."""
    if _train_data_kind(args) == "webdataset":
        command = ["xclr-embed-captions", "--format", "webdataset"]
        command += [shlex.quote(str(args.train_data)), "-o", shlex.quote(out)]
        if getattr(args, "xclr_text_encoder", None):
            command += ["--encoder", shlex.quote(str(args.xclr_text_encoder))]
        return " ".join(command)
    command = [
        "xclr-embed-captions",
        str(args.train_data),
        "-o",
        out,
        "--format",
        "csv",
    ]
    defaults = {
        "csv_separator": "\t",
        "csv_img_key": "filepath",
        "csv_caption_key": "title",
    }
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            command += ["--" + key.replace("_", "-"), repr(value)]
    if getattr(args, "xclr_text_encoder", None):
        command += ["--encoder", str(args.xclr_text_encoder)]
    return " ".join(command)


def _text_encoder(options: PluginOptions) -> Any:
    from xclr_plugin.text import TextEncoder

    try:
        return TextEncoder(
            options.xclr_text_encoder,
            device=options.xclr_text_device,
            show_progress=True,
        )
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        # RuntimeError: e.g. --xclr-text-device cuda without a usable GPU
        raise OpenClipTrainError(
            f"--xclr-text-encoder/--xclr-text-device {options.xclr_text_device!r}: "
            f"cannot load the encoder: {err}"
        ) from None


# -- the pieces patched into open_clip_train -----------------------------------------


class SampleIndexHooks:
    """Forward hooks that carry each sample's CSV row from the tokens to the output dict.

    The patched ``CsvDataset`` appends the row index to each token row, so the batch
    ``texts`` has ``context_length + 1`` columns. The pre-hook removes that column
    before the model runs; the forward hook adds it to the output dict under
    :data:`SAMPLE_INDEX_KEY` in training mode (evaluation code never sees it).

    Args:
        context_length: The tokenizer's context length (token rows without the index).
    """

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._pending: Tensor | None = None

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Registers both hooks on ``model``; returns their handles."""
        return [
            model.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
            model.register_forward_hook(self.hook),
        ]

    def pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Strips the index column from the text tokens, remembering it."""
        self._pending = None
        text = args[1] if len(args) >= 2 else kwargs.get("text")
        if (
            not isinstance(text, Tensor)
            or text.ndim != 2
            or text.shape[1] != self.context_length + 1
        ):
            return None
        self._pending = text[:, -1]
        text = text[:, :-1]
        if len(args) >= 2:
            return (args[0], text, *args[2:]), kwargs
        return args, {**kwargs, "text": text}

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Adds the remembered indices to the output dict (training mode only)."""
        indices, self._pending = self._pending, None
        if indices is None or not module.training or not isinstance(output, dict):
            return None
        return {**output, SAMPLE_INDEX_KEY: indices}


def _indexed_csv_dataset(base: type[Any]) -> type[Any]:
    """A ``CsvDataset`` subclass whose token rows end with the sample's row index."""

    class IndexedCsvDataset(base):  # type: ignore[valid-type,misc]
        """open_clip's ``CsvDataset``, tokens followed by the row index (xclr-plugin)."""

        def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
            images, texts = super().__getitem__(idx)
            index = torch.tensor([idx], dtype=texts.dtype)
            return images, torch.cat([texts, index])

    return IndexedCsvDataset


class KeyToRow:
    """webdataset stage: ``sample -> (image, tokens + [row of sample["__key__"]])``.

    Replaces the last ``to_tuple("image", "text")`` of open_clip's training pipeline
    (``get_wds_dataset``), so each sample's caption-embedding row travels with its
    tokens exactly as the CSV route's row index does, whatever the shuffling,
    resampling, worker or node split.

    Args:
        lookup: Has ``index_of(key) -> int`` (a caption cache or table); raises
            ``ValueError`` for an unknown key.
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


class _KeyedWebdataset:
    """The ``webdataset`` module, except that ``to_tuple("image", "text")`` is keyed."""

    def __init__(self, wds: Any, stage: KeyToRow) -> None:
        self._wds = wds
        self._stage = stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wds, name)

    def to_tuple(self, *keys: str, **kwargs: Any) -> Any:
        if keys == ("image", "text") and not kwargs:
            return self._wds.map(self._stage)
        return self._wds.to_tuple(*keys, **kwargs)


def _keyed_get_wds_dataset(ocd: Any, lookup: Callable[[], Any]) -> Callable[..., Any]:
    """open_clip's ``get_wds_dataset`` whose training pipeline carries caption rows.

    ``lookup()`` gives the caption embeddings (loaded by ``parse_args``, which runs
    before open_clip builds its data).
    """
    original = ocd.get_wds_dataset

    def get_wds_dataset(
        args: argparse.Namespace,
        preprocess_img: Any,
        is_train: bool,
        *a: Any,
        **kw: Any,
    ) -> Any:
        if not is_train:  # evaluation data is not looked up in the training cache
            return original(args, preprocess_img, is_train, *a, **kw)
        with _replaced(ocd, "wds", _KeyedWebdataset(ocd.wds, KeyToRow(lookup()))):
            return original(args, preprocess_img, is_train, *a, **kw)

    return get_wds_dataset


class NonFiniteLossError(RuntimeError):
    """The loss of a training step is NaN or infinite; training stops before the update."""


class FiniteLossCheck:
    """Forward hook on the loss: stops training at the first non-finite loss.

    Without it, open_clip logs such a loss, steps the optimizer with NaN gradients and
    saves checkpoints full of NaN (it never checks). The check runs before
    ``backward``, so no weight is changed by the bad step; the message names which
    inputs were already non-finite (features, logit scale, targets).
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        self.calls += 1
        values = out.values() if isinstance(out, dict) else [out]
        tensors = [v for v in values if isinstance(v, Tensor)]
        if all(bool(torch.isfinite(v.detach()).all()) for v in tensors):
            return
        bad = [
            name
            for name, value in kwargs.items()
            if isinstance(value, Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value.detach()).all())
        ]
        cause = (
            f"non-finite inputs: {', '.join(bad)}"
            if bad
            else "all inputs were finite (try a larger --xclr-target-temperature or "
            "--precision fp32/amp_bf16)"
        )
        shown = {
            k: _scalar(v)
            for k, v in (out.items() if isinstance(out, dict) else [("loss", out)])
        }
        raise NonFiniteLossError(
            f"non-finite loss {shown} at loss call {self.calls} ({cause}); training "
            "stopped before this update, no checkpoint of it was written."
        )


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach().float().item())
    return value


class SampleCaptionTargets(nn.Module):
    """Wraps an image-text loss: passes each sample's caption embedding as ``targets``.

    Called by open_clip's training loop as ``loss(**model_out, output_dict=True)``
    where ``model_out`` holds :data:`SAMPLE_INDEX_KEY`; the wrapper looks those rows up
    and calls ``loss(..., targets=embeddings)``.

    Args:
        loss: The loss, e.g. :class:`xclr_plugin.clip_loss.XCLRClipLoss`.
        caption_embeddings: Row ``i`` is the embedding of row ``i`` of the training CSV
            (or of the cache of the training shards, looked up by ``__key__``):
            an ``(N, Dt)`` tensor or a :class:`xclr_plugin.cache.CaptionCache`.
    """

    def __init__(self, loss: nn.Module, caption_embeddings: Any) -> None:
        super().__init__()
        self.loss = loss
        self.caption_embeddings = caption_embeddings

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped loss with ``targets`` looked up from the sample indices."""
        indices = kwargs.pop(SAMPLE_INDEX_KEY, None)
        if indices is None:
            raise RuntimeError(
                f"No {SAMPLE_INDEX_KEY!r} reached the loss: captions mode needs the "
                "sample-index hooks of xclr-plugin on the model (run through "
                f"{PROG} / patch_open_clip_train)."
            )
        targets = self.caption_embeddings[indices.long().cpu()]
        targets = torch.as_tensor(targets).to(device=indices.device)
        return self.loss(*args, targets=targets, **kwargs)


def build_loss(args: argparse.Namespace, setup: _Setup) -> nn.Module:
    """Builds ``--loss`` through the registry with open_clip's distributed settings.

    Arguments are passed only where the loss's constructor accepts them, so a
    registered ``clip`` gets exactly what ``open_clip.create_loss`` would pass.
    """
    from xclr_plugin import registry

    name = setup.options.loss
    assert name is not None
    candidates: dict[str, Any] = {
        "local_loss": args.local_loss,
        "gather_with_grad": args.gather_with_grad,
        "cache_labels": True,
        "rank": args.rank,
        "world_size": args.world_size,
        "use_horovod": args.horovod,
        "dist_impl": args.loss_dist_impl,
    }
    if setup.target_mode is not None:
        candidates["target_mode"] = setup.target_mode
        if setup.options.xclr_target_temperature is not None:
            candidates["target_temperature"] = setup.options.xclr_target_temperature
    accepted = _keyword_parameters(registry.loss_info(name).load())
    kwargs = {k: v for k, v in candidates.items() if accepted is None or k in accepted}
    for key in ("target_mode", "target_temperature"):
        if key in candidates and key not in kwargs:
            raise OpenClipTrainError(f"--loss {name!r} does not accept {key}.")
    loss = registry.create_loss(name, **kwargs)
    if setup.caption_embeddings is not None:
        loss = SampleCaptionTargets(loss, setup.caption_embeddings)
    loss.register_forward_hook(FiniteLossCheck(), with_kwargs=True)
    return loss


def _keyword_parameters(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword parameters of a class or factory (None if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


@contextlib.contextmanager
def _replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def preserve_logging() -> Iterator[None]:
    """Undoes what ``open_clip_train``'s ``setup_logging`` does to global logging.

    It adds root handlers (one writing to the run's ``out.log``) and sets every
    logger's level on each run; without this, repeated runs in one process (tests,
    notebooks) log into each other's files and leave torch's loggers verbose.
    """
    handlers = list(logging.root.handlers)
    names = ["", *logging.root.manager.loggerDict]
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for handler in [h for h in logging.root.handlers if h not in handlers]:
            logging.root.removeHandler(handler)
            handler.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def patch_open_clip_train(options: PluginOptions) -> Iterator[None]:
    """Patches ``open_clip_train`` for ``options`` while the block runs.

    Args:
        options: The plugin flags. Without ``options.loss`` only ``parse_args`` is
            wrapped (to store the flags), so open_clip runs unchanged.

    Raises:
        OpenClipTrainError: On entry if open_clip is not 3.x; from the wrapped
            ``parse_args`` for inconsistent flags.
    """
    require_open_clip_3()
    import open_clip_train.data as ocd
    import open_clip_train.main as ocm

    original_parse_args = ocm.parse_args
    original_create_model = ocm.create_model_and_transforms
    state: dict[str, Any] = {}

    def parse_args(argv: Sequence[str]) -> argparse.Namespace:
        args: argparse.Namespace = original_parse_args(argv)
        for key, value in vars(options).items():
            setattr(args, key, value)
        if options.loss is None:
            if options.xclr_flags_given():
                raise OpenClipTrainError(
                    f"{', '.join(options.xclr_flags_given())} need --loss (e.g. --loss xclr-clip)."
                )
            return args
        state["setup"] = setup = _prepare(options, args)
        args.xclr_target_mode = setup.target_mode
        if options.loss == "siglip":
            args.siglip = True  # open_clip's SigLIP model init (logit scale and bias)
        return args

    def create_loss(args: argparse.Namespace) -> nn.Module:
        setup: _Setup = state["setup"]
        loss = build_loss(args, setup)
        logging.info(f"{PROG}: --loss {options.loss} -> {loss!r}")
        if setup.target_mode is not None:
            source = (
                "start-up embedding"
                if options.xclr_caption_cache is None
                else f"cache {options.xclr_caption_cache}"
            )
            if setup.target_mode == "clip-text":
                source = "detached text features"
            logging.info(f"{PROG}: X-CLR targets: {setup.target_mode} ({source})")
        return loss

    def create_model_and_transforms(*args: Any, **kwargs: Any) -> Any:
        model, preprocess_train, preprocess_val = original_create_model(*args, **kwargs)
        if "model" not in state:  # the trained model (a distill teacher is refused)
            state["model"] = model
            context_length = int(getattr(model, "context_length", 0) or 0)
            if context_length <= 0:
                raise OpenClipTrainError(
                    f"--xclr-target-mode captions: the model {args[0] if args else ''!r} "
                    "reports no context_length, needed to carry sample indices; use "
                    "--xclr-target-mode clip-text."
                )
            SampleIndexHooks(context_length).attach(model)
        return model, preprocess_train, preprocess_val

    with contextlib.ExitStack() as stack:
        stack.enter_context(preserve_logging())
        stack.enter_context(_replaced(ocm, "parse_args", parse_args))
        if options.loss is not None:
            stack.enter_context(_replaced(ocm, "create_loss", create_loss))
            captions = options.xclr_target_mode in (None, "captions")
            if captions and _loss_has_caption_targets(options.loss):
                stack.enter_context(
                    _replaced(
                        ocm, "create_model_and_transforms", create_model_and_transforms
                    )
                )
                stack.enter_context(
                    _replaced(ocd, "CsvDataset", _indexed_csv_dataset(ocd.CsvDataset))
                )
                stack.enter_context(
                    _replaced(
                        ocd,
                        "get_wds_dataset",
                        _keyed_get_wds_dataset(
                            ocd, lambda: state["setup"].caption_embeddings
                        ),
                    )
                )
        yield


def _loss_has_caption_targets(name: str) -> bool:
    from xclr_plugin import registry

    try:
        return registry.loss_info(name).targets == "captions"
    except (ValueError, ImportError):
        return False  # reported by parse_args with the full message


def main(argv: Sequence[str] | None = None) -> int | None:
    """Entry point of ``xclr-openclip-train``: ``open_clip_train.main`` plus ``--loss``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``): any of ``open_clip_train.main``
            plus this command's (see :func:`plugin_parser`).

    Returns:
        open_clip's return value (None on success, -1 if the run name exists), or 2
        after printing a configuration error (nothing written, no training).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        plugin_parser().print_help()
        print("\nopen_clip_train.main arguments:\n")
    options, rest = parse_plugin_args(argv)
    try:
        with patch_open_clip_train(options):
            import open_clip_train.main as ocm

            result: int | None = ocm.main(rest)
            return result
    except OpenClipTrainError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
