"""The flags ``xclr-openclip-train`` adds to ``open_clip_train.main``, parsed and checked.

:func:`check` refuses what open_clip would refuse only after creating ``logs/NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from xclr_plugin import registry
from xclr_plugin.captions.shards import expand_shard_urls, local_path
from xclr_plugin.errors import ArgumentParser, UsageError

PROG = "xclr-openclip-train"


def _flag(help: str, default: Any = None, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class Options:
    """This command's flags (open_clip's stay in its ``args``)."""

    loss: str | None = _flag(
        "image-text loss from the xclr-plugin registry, e.g. clip, siglip, xclr-clip "
        "(default: open_clip's choice)",
        metavar="NAME",
    )
    #: After :func:`check`: None exactly when the loss takes no captions.
    xclr_target_mode: str | None = _flag(
        "captions: frozen sentence-encoder embeddings of each sample's caption (needs "
        "a CSV/TSV or webdataset --train-data); clip-text: the batch's detached text "
        "features (default: captions)",
        choices=("captions", "clip-text"),
    )
    xclr_target_temperature: float | None = _flag(
        "temperature of the soft target distribution (default: the loss's, 0.1)",
        type=float,
        metavar="TAU_S",
    )
    xclr_text_encoder: str | None = _flag(
        "sentence-transformers model name or folder (default: the packaged "
        "all-MiniLM-L6-v2, offline)",
        metavar="MODEL",
    )
    xclr_text_device: str = _flag(
        "device of the sentence encoder when embedding at start-up (default: cpu)",
        "cpu",
    )
    xclr_caption_cache: str | None = _flag(
        "caption-embedding cache of the training data, built with 'xclr-embed-captions "
        "TRAIN.csv -o DIR' or 'xclr-embed-captions --format webdataset SHARDS -o DIR' "
        "(default: embed the captions at start-up)",
        metavar="DIR",
    )


def parse(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """Splits ``argv`` into this command's options and the arguments left for open_clip."""
    parser = ArgumentParser(
        prog=PROG,
        description="open_clip_train.main with --loss NAME (X-CLR and any registered "
        "image-text loss). All open_clip_train arguments are accepted unchanged.",
        add_help=False,
        allow_abbrev=False,  # never swallow an abbreviated open_clip flag such as --lo
    )
    loss = parser.add_argument_group("loss selection (xclr-plugin)")
    xclr = parser.add_argument_group("X-CLR targets (losses with caption targets)")
    for f in fields(Options):
        group = loss if f.name == "loss" else xclr
        group.add_argument(_dashed(f.name), default=f.default, **f.metadata)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nopen_clip_train.main arguments:\n")  # open_clip's parser prints them
    namespace, rest = parser.parse_known_args(list(argv))
    return Options(**vars(namespace)), rest


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(options: Options, args: argparse.Namespace) -> Options:
    """``options`` checked with open_clip's ``args``, ``xclr_target_mode`` resolved."""
    name, unset = options.loss, vars(Options(loss=options.loss))
    given = ", ".join(_dashed(k) for k, v in vars(options).items() if v != unset[k])
    if name is None:
        if given:
            raise UsageError(f"{given} need --loss (e.g. --loss xclr-clip).")
        if args.train_data and train_data_kind(args) == "webdataset":
            _readable_shards(args)  # open_clip alone would wait for ever
        return options
    try:
        spec = registry.loss_info(name)
    except ValueError as err:
        raise UsageError(f"--loss: {err}") from None
    if spec.inputs != "image-text":
        fitting = registry.list_losses(inputs="image-text")
        raise UsageError(
            f"--loss {name!r} is a {spec.inputs} (lightly-style) loss; open_clip trains "
            f"image-text models and needs an image-text loss: {', '.join(fitting)}."
        )
    if args.distill_model and args.distill_pretrained:
        raise UsageError(
            "--loss cannot be combined with --distill-model/--distill-pretrained "
            "(distillation has its own loss in open_clip); drop one of them."
        )
    if "coca" in str(args.model).lower():
        raise UsageError(
            f"--loss does not support CoCa models (--model {args.model}), whose "
            "captioning loss open_clip builds itself; drop --loss."
        )
    kind = train_data_kind(args)
    if kind is None:
        raise UsageError(
            f"--loss {name} trains a model: give --train-data (a CSV/TSV file or "
            "webdataset shards), or --dataset-type synthetic."
        )
    minimums = [("accum_freq", 1), ("batch_size", 1), ("workers", 0)]
    for flag, low in minimums + [("train_num_samples", 1)] * (kind == "webdataset"):
        if (value := getattr(args, flag)) is not None and value < low:
            raise UsageError(f"{_dashed(flag)} must be >= {low}, got {value}.")
    log_file = "out-0" if args.log_local else "out.log"
    run = os.path.join(args.logs, args.name) if args.name else None
    if run and args.resume != "latest" and os.path.exists(os.path.join(run, log_file)):
        # open_clip returns -1 on the first rank only; the other ranks would hang.
        raise UsageError(
            f"the experiment {run!r} already exists; give another --name (or "
            "--resume latest to continue it)."
        )
    if args.lock_text and not args.lock_text_freeze_layer_norm and not _hf_text(args):
        raise UsageError(
            "--lock-text needs --lock-text-freeze-layer-norm with open_clip's own "
            "text towers (open_clip does not support unfreezing their LayerNorm)."
        )
    if kind == "csv" and not os.path.isfile(args.train_data):
        raise UsageError(f"--train-data {args.train_data!r} does not exist.")
    if kind == "webdataset":
        _check_shards(args)
    if spec.targets != "captions":
        if given:
            raise UsageError(
                f"{given} only apply to losses with caption targets (such as "
                f"xclr-clip); --loss {name!r} takes none."
            )
        return options
    if (tau := options.xclr_target_temperature) is not None:
        from xclr_plugin.validation import validate_temperature

        try:
            validate_temperature("--xclr-target-temperature", tau)
        except ValueError as err:
            raise UsageError(str(err)) from None
    mode = options.xclr_target_mode or "captions"
    for flag in ("xclr_text_encoder", "xclr_caption_cache"):
        if mode == "clip-text" and getattr(options, flag) is not None:
            raise UsageError(
                f"{_dashed(flag)} is only used with --xclr-target-mode "
                "captions; clip-text targets come from the model's text features."
            )
    return dataclasses.replace(options, xclr_target_mode=mode)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by torchrun


def train_data_kind(args: argparse.Namespace) -> str | None:
    """Which open_clip dataset ``--train-data`` selects (``get_dataset_fn``'s rule)."""
    kind, ext = args.dataset_type, str(args.train_data).split(".")[-1]
    if kind == "auto" and args.train_data:
        kind = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext)
    if kind is None:
        raise UsageError(
            f"--train-data {args.train_data!r}: open_clip cannot tell its type from the "
            f"extension {ext!r}; give --dataset-type csv or --dataset-type webdataset."
        )
    return str(kind) if kind == "synthetic" or args.train_data else None


def _hf_text(args: argparse.Namespace) -> bool:
    """Whether ``--model`` has a Hugging Face text tower (unknown or unreadable: no)."""
    from open_clip import get_model_config

    try:
        return bool((get_model_config(args.model) or {})["text_cfg"]["hf_model_name"])
    except Exception:
        return False


def _size(path: str) -> int | None:
    """A regular file's size (one ``stat``), None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _no_members(path: str) -> bool:
    """Whether a local tar holds no member (its first block is end-of-archive zeros)."""
    with open(path, "rb") as handle:
        block = handle.read(512)
    return len(block) == 512 and not block.strip(b"\0")


def _readable_shards(args: argparse.Namespace) -> list[str]:
    """The shards; refuses missing, empty and member-less local ones (one read each)."""
    try:
        shards = expand_shard_urls(args.train_data)
    except ValueError as err:
        raise UsageError(f"--train-data: {err}") from None
    paths = {u: p for u in shards if (p := local_path(u)) is not None}
    sizes = {u: _size(p) for u, p in paths.items()}
    missing = [u for u, size in sizes.items() if size is None]
    # open_clip skips unreadable shards; with nothing left to read it loops for ever.
    empty = [] if missing else [u for u, size in sizes.items() if size == 0]
    hollow = [] if missing or empty else [u for u, p in paths.items() if _no_members(p)]
    for problem, bad in (
        ("do not exist", missing),
        ("are empty files", empty),
        ("are tar files without members", hollow),
    ):
        if bad:
            raise UsageError(
                f"--train-data: {len(bad)} of {len(shards)} shard(s) {problem}, the "
                f"first is {bad[0]!r}."
            )
    return shards


def _check_shards(args: argparse.Namespace) -> None:
    from open_clip_train.data import get_dataset_size

    shards = _readable_shards(args)
    if args.train_num_samples is None and get_dataset_size(args.train_data)[0] is None:
        raise UsageError(
            "--dataset-type webdataset needs --train-num-samples (no sizes.json or "
            "__len__ file next to the shards tells open_clip how many samples an "
            "epoch has)."
        )
    if not args.dataset_resampled and len(shards) < args.workers * world_size():
        raise UsageError(
            f"--train-data has {len(shards)} shard(s), fewer than --workers "
            f"{args.workers} x {world_size()} process(es); open_clip gives every worker "
            "its own shards. Use fewer --workers, more shards or --dataset-resampled."
        )
