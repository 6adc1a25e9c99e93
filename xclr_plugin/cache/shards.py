"""Caption embeddings of webdataset shards, one file per shard (as clip-retrieval keeps them).

A shard cache folder holds ``manifest.json`` (encoder, dim, dtype, caption member),
``shards/NAME.npz`` per shard (its keys in member order, their rows, a digest of each
caption, the shard's identity: size and mtime when it is a local file) and
``shards.json``, the index a finished build publishes. ``NAME`` is the shard's file
name without ``.tar``, so a moved shard folder keeps its cache. Training checks the
index against ``--train-data`` in O(shards) and a data worker loads one shard's file
when it opens that shard: no process ever holds more than a few shards' rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xclr_plugin.atomic import atomic_path, remove_temporaries, write_json_atomic
from xclr_plugin.cache.build import embed_rows
from xclr_plugin.cache.store import DTYPES, MANIFEST_FILE, read_json
from xclr_plugin.captions.shards import local_path, read_shard
from xclr_plugin.text import SupportsEncode

SHARD_CACHE_FORMAT, SHARD_CACHE_VERSION = "xclr-shard-caption-cache", 1
INDEX_FILE, SHARDS_DIR = "shards.json", "shards"
_SUFFIXES = (".tar.gz", ".tgz", ".tar")

logger = logging.getLogger("xclr_plugin.cache")


def shard_name(url: str) -> str:
    """The file name of a shard URL without ``.tar`` (``pipe:`` commands: their last word)."""
    words = str(url).split()
    base = (words[-1] if words else "").rstrip("/").rsplit("/", 1)[-1]
    base = base.removeprefix("file:")
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    if not base or base.startswith("."):
        raise ValueError(f"Cannot name the cache file of shard {url!r}.")
    return base


def shard_identity(url: str) -> dict[str, int] | None:
    """``{"size", "mtime_ns"}`` of a local shard (what a rewrite changes), else None."""
    if (path := local_path(url)) is None:
        return None
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _digest(caption: str) -> int:
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def caption_digests(captions: Sequence[str]) -> np.ndarray:
    """8-byte BLAKE2b of each caption: a re-captioned sample no longer matches its row."""
    return np.array([_digest(c) for c in captions], dtype=np.uint64)


def unique_shards(urls: Sequence[str]) -> dict[str, str]:
    """``name -> url``; a URL listed twice (upsampling) counts once, two URLs of one name are refused."""
    names: dict[str, str] = {}
    for url in urls:
        other = names.setdefault(shard_name(url), url)
        if other != url:
            raise ValueError(
                f"Shards {other!r} and {url!r} have the same file name; a shard cache "
                "names its files after the shards, so shard names must be unique."
            )
    return names


@dataclass(frozen=True)
class ShardEmbeddings:
    """One shard's rows, loaded by the worker that reads the shard."""

    url: str
    keys: list[str]
    embeddings: np.ndarray
    digests: np.ndarray
    _index: dict[str, int] = field(init=False, repr=False)
    _digests: list[int] = field(init=False, repr=False)

    def row(self, key: str, caption: str | None) -> np.ndarray:
        """The row of ``key``; ValueError naming key and shard if it has none (or another caption)."""
        index = self._index.get(key)
        if index is None:
            raise ValueError(
                f"sample {key!r} of shard {self.url!r} has no caption embedding in "
                "the shard cache; rebuild the shard's embeddings (xclr-embed-captions "
                "--format webdataset SHARDS -o DIR)."
            )
        if caption is not None and _digest(caption) != self._digests[index]:
            raise ValueError(
                f"sample {key!r} of shard {self.url!r} has another caption than the "
                "one embedded in the shard cache (the shard changed); rebuild its "
                "embeddings (xclr-embed-captions --format webdataset SHARDS -o DIR)."
            )
        return np.asarray(self.embeddings[index])

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {k: i for i, k in enumerate(self.keys)})
        object.__setattr__(self, "_digests", self.digests.tolist())


def _shard_file(folder: Path, name: str) -> Path:
    return folder / SHARDS_DIR / f"{name}.npz"


def _read_meta(path: Path) -> dict[str, Any] | None:
    """A shard file's metadata, None if it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
    except FileNotFoundError:
        return None
    except Exception as err:  # a damaged zip makes numpy raise almost anything
        logger.warning("Ignoring the damaged shard embeddings %s: %s", path, err)
        return None
    return meta if isinstance(meta, dict) else None


class ShardCache:
    """A shard cache folder: its manifest, and each shard's rows on demand."""

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest
        self.encoder: str = manifest["encoder"]
        self.dim: int = int(manifest["dim"])
        self.caption_key: str = manifest["caption_key"]
        self._loaded: OrderedDict[str, ShardEmbeddings] = OrderedDict()

    @staticmethod
    def manifest_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The folder's shard-cache manifest; None if the folder holds none."""
        try:
            manifest = read_json(Path(path) / MANIFEST_FILE, "shard cache manifest")
        except FileNotFoundError:
            return None
        if not isinstance(manifest, dict):
            return None
        return manifest if manifest.get("format") == SHARD_CACHE_FORMAT else None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        urls: Sequence[str],
        *,
        encoder_name: str | None = None,
    ) -> ShardCache:
        """The cache of ``urls``, checked in O(shards): each shard embedded, none changed since."""
        folder = Path(path)
        manifest = cls.manifest_of(folder)
        if manifest is None:
            what = "no shard cache"
            if (folder / MANIFEST_FILE).exists():
                what = "a single-file caption cache (for CSV/TSV and folder data)"
            raise FileNotFoundError(f"{folder} holds {what}, not a per-shard cache.")
        if encoder_name is not None and manifest["encoder"] != encoder_name:
            raise ValueError(
                f"The shard cache {folder} was built with the encoder "
                f"{manifest['encoder']!r}, not {encoder_name!r}."
            )
        try:
            index = read_json(folder / INDEX_FILE, "shard cache index")["shards"]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"The shard cache {folder} has no {INDEX_FILE}: its build has not "
                "finished. Run the build again; it resumes."
            ) from None
        shards = unique_shards(urls)
        missing = [url for name, url in shards.items() if name not in index]
        if missing:
            raise ValueError(
                f"The shard cache {folder} has no caption embeddings for "
                f"{len(missing)} of the {len(shards)} shard(s), the first is "
                f"{missing[0]!r}."
            )
        changed = [
            url
            for name, url in shards.items()
            if (now := shard_identity(url)) is not None
            and now != index[name]["identity"]
        ]
        if changed:
            raise ValueError(
                f"{len(changed)} of the {len(shards)} shard(s) changed after their "
                f"caption embeddings were written to {folder} (size or modification "
                f"time differ), the first is {changed[0]!r}."
            )
        return cls(folder, manifest)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": OrderedDict()}  # workers load their own

    def load(self, url: str) -> ShardEmbeddings:
        """``url``'s rows (the last few shards stay loaded), checked against the shard now."""
        if (shard := self._loaded.get(url)) is not None:
            self._loaded.move_to_end(url)
            return shard
        name = shard_name(url)
        path = _shard_file(self.path, name)
        meta = _read_meta(path)
        if meta is None or not _same_content(meta, self.manifest):
            raise ValueError(
                f"The shard cache {self.path} has no usable caption embeddings of "
                f"shard {url!r} ({path} is missing, damaged or from another build)."
            )
        if (now := shard_identity(url)) is not None and now != meta["identity"]:
            raise ValueError(
                f"Shard {url!r} changed after its caption embeddings were written to "
                f"{self.path}; rebuild them."
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = [str(k) for k in data["keys"]]
                rows = torch.from_numpy(np.asarray(data["embeddings"], np.float32))
                digests = np.asarray(data["digests"])
        except Exception as err:  # a damaged zip member: numpy raises almost anything
            raise ValueError(
                f"The caption embeddings {path} of shard {url!r} are damaged "
                f"({type(err).__name__}: {err}); rebuild them."
            ) from err
        # float32 and re-normalised (as CaptionCache): undoes the float16 rounding.
        unit = F.normalize(rows, dim=-1).numpy()
        shard = ShardEmbeddings(url, keys, unit, digests)
        self._loaded[url] = shard
        if len(self._loaded) > 8:  # a shuffle buffer mixes a few shards at most
            self._loaded.popitem(last=False)
        return shard

    def target(self, url: str, key: str, caption: str | None = None) -> np.ndarray:
        """The caption embedding of sample ``key`` of shard ``url`` (float32)."""
        return self.load(url).row(key, caption)


def _content(encoder: SupportsEncode, dtype: str, caption_key: str) -> dict[str, Any]:
    return {
        "encoder": encoder.name,
        "dim": int(encoder.dim),
        "dtype": dtype,
        "caption_key": caption_key,
    }


def _same_content(meta: dict[str, Any], manifest: dict[str, Any]) -> bool:
    return all(
        meta.get(k) == manifest.get(k)
        for k in ("encoder", "dim", "dtype", "caption_key")
    )


def prepare_shard_cache(
    out_dir: str | os.PathLike[str],
    encoder: SupportsEncode,
    *,
    dtype: str = "float16",
    caption_key: str = "txt",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the manifest of a new cache or checks an existing one (call in one process).

    A folder holding files this builder did not write, or a cache of another encoder,
    dtype or caption member, is refused unless ``overwrite``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The shard cache folder {out} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": SHARD_CACHE_FORMAT, "version": SHARD_CACHE_VERSION}
    manifest.update(_content(encoder, dtype, caption_key))
    existing = ShardCache.manifest_of(out)
    if existing is not None and _same_content(existing, manifest):
        return existing
    if not overwrite and (existing is not None or any(out.iterdir())):
        what = (
            f"a shard cache of other settings ({_content_text(existing)})"
            if existing is not None
            else "files this builder did not write ("
            + ", ".join(sorted(p.name for p in out.iterdir())[:3])
            + ")"
        )
        raise ValueError(
            f"{out} already holds {what}. Pass --overwrite (overwrite=True) or choose "
            "another folder."
        )
    with contextlib.suppress(FileNotFoundError):
        (out / INDEX_FILE).unlink()  # no shard counts as embedded under new settings
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def _content_text(manifest: dict[str, Any]) -> str:
    keys = ("encoder", "dim", "dtype", "caption_key")
    return ", ".join(f"{k} {manifest.get(k)!r}" for k in keys)


def embed_shards(
    urls: Sequence[str],
    out_dir: str | os.PathLike[str],
    encoder: SupportsEncode,
    manifest: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    on_shard: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Embeds this process's share (shard i on rank i mod world_size), skipping shards already done.

    Each shard's file is written atomically, so a killed build redoes only unfinished
    shards. ``on_shard(url, captions)`` follows each shard. Returns ``name -> entry``
    for the index (:func:`publish_index`).
    """
    out = Path(out_dir)
    folder = out / SHARDS_DIR
    folder.mkdir(exist_ok=True)
    names = unique_shards(urls)
    mine = list(names.items())[rank::world_size]
    remove_temporaries(folder, [f"{name}.npz" for name, _ in mine])
    entries = {}
    for name, url in mine:
        identity = shard_identity(url)
        meta = _read_meta(_shard_file(out, name))
        # A remote shard cannot be stat-ed: its file is reused, and training
        # compares each sample's caption with the digest stored for it.
        if (
            meta is not None
            and _same_content(meta, manifest)
            and meta["identity"] == identity
        ):
            done = 0  # embedded by an earlier build
        else:
            meta = _embed_shard(url, name, out, encoder, manifest, identity)
            done = meta["count"]
        entries[name] = {k: meta[k] for k in ("url", "identity", "count")}
        if on_shard is not None:
            on_shard(url, done)
    return entries


def _embed_shard(
    url: str,
    name: str,
    out: Path,
    encoder: SupportsEncode,
    manifest: dict[str, Any],
    identity: dict[str, int] | None,
) -> dict[str, Any]:
    pairs = read_shard(url, manifest["caption_key"])
    if not pairs:
        raise ValueError(
            f"Shard {url!r} has no {manifest['caption_key']!r} caption member."
        )
    keys, captions = [k for k, _ in pairs], [c for _, c in pairs]
    if (empty := next((k for k, c in pairs if not c.strip()), None)) is not None:
        raise ValueError(f"Shard {url!r}, key {empty!r}: empty caption.")
    rows = embed_rows(encoder, captions, 0, len(captions), manifest["dtype"])
    meta = {"shard": name, "url": url, "identity": identity, "count": len(keys)}
    meta.update({k: manifest[k] for k in ("encoder", "dim", "dtype", "caption_key")})
    with atomic_path(_shard_file(out, name)) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            keys=np.array(keys, dtype=str),
            embeddings=rows,
            digests=caption_digests(captions),
            meta=np.array(json.dumps(meta)),
        )
    return meta


def publish_index(
    out_dir: str | os.PathLike[str], entries: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Merges this build's shards into ``shards.json`` (call in one process, after every share is done)."""
    path = Path(out_dir) / INDEX_FILE
    try:
        shards = dict(read_json(path, "shard cache index")["shards"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        shards = {}  # none yet, or damaged: the shard files are what counts
    shards.update(entries)
    index = {"count": sum(e["count"] for e in shards.values()), "shards": shards}
    write_json_atomic(path, index)
    return index
