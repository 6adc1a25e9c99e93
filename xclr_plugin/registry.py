"""Contrastive losses by name, found through the ``xclr_plugin.losses`` entry points.

Any installed distribution can register a loss by declaring, in its
``pyproject.toml``::

    [project.entry-points."xclr_plugin.losses"]
    my-loss = "my_package.losses:MyLoss"

The value may name a :class:`torch.nn.Module` class or a factory function returning
one. Nothing is imported until a name is asked for: :func:`list_losses` reads only the
installed distributions' metadata, and :func:`create_loss` imports the one module that
provides the requested name (so open_clip is imported only for ``clip``, ``siglip`` and
``xclr-clip``).

xclr-plugin registers ``xclr``, ``supcon`` (X-CLR with label targets), ``xclr-clip``,
and, under their own names, lightly's ``ntxent``, ``dcl``, ``dclw`` and open_clip's
``clip``, ``siglip``.

Examples:
    >>> from xclr_plugin.registry import create_loss, list_losses
    >>> list_losses()
    ['clip', 'dcl', 'dclw', 'ntxent', 'siglip', 'supcon', 'xclr', 'xclr-clip']
    >>> criterion = create_loss("xclr", temperature=0.1, target_temperature=0.1)
    >>> criterion = build_criterion({"name": "ntxent", "temperature": 0.5})
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "LossSpec",
    "build_criterion",
    "clear_cache",
    "create_loss",
    "list_losses",
    "loss_info",
    "supcon_loss",
]

#: The entry-point group that losses are registered under.
ENTRY_POINT_GROUP = "xclr_plugin.losses"

InputKind = Literal["two-view", "image-text"]
TargetKind = Literal["captions", "labels", "none"]

_INPUT_KINDS: tuple[str, ...] = ("two-view", "image-text")
_TARGET_KINDS: tuple[str, ...] = ("captions", "labels", "none")

# What the losses that xclr-plugin registers expect, keyed by entry-point value so that
# loss_info() needs no import for them (and holds whatever name they are registered
# under). Other losses describe themselves with ``loss_inputs`` / ``loss_targets``
# attributes on the registered object (default: two-view, no targets).
_KNOWN_KINDS: dict[str, tuple[InputKind, TargetKind]] = {
    "xclr_plugin.loss:XCLRLoss": ("two-view", "captions"),
    "xclr_plugin.registry:supcon_loss": ("two-view", "labels"),
    "xclr_plugin.clip_loss:XCLRClipLoss": ("image-text", "captions"),
    "lightly.loss:NTXentLoss": ("two-view", "none"),
    "lightly.loss:DCLLoss": ("two-view", "none"),
    "lightly.loss:DCLWLoss": ("two-view", "none"),
    "open_clip.loss:ClipLoss": ("image-text", "none"),
    "open_clip.loss:SigLipLoss": ("image-text", "none"),
}

# Extras that provide the host libraries, for the error message of a failed import.
_INSTALL_HINTS: dict[str, str] = {
    "open_clip": 'pip install "xclr-plugin[openclip]"',
    "lightly": 'pip install "xclr-plugin"',
}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: where it comes from and what its ``forward`` expects.

    Attributes:
        name: The registered name, as passed to :func:`create_loss`.
        value: The entry-point value, ``"module:attribute"``.
        distribution: The installed distribution that registered it (``None`` if
            unknown).
        inputs: ``"two-view"`` for ``forward(out0, out1[, targets])`` (lightly style) or
            ``"image-text"`` for ``forward(image_features, text_features, logit_scale,
            ...)`` (open_clip style).
        targets: What the loss uses as sample descriptions: ``"captions"`` (caption
            embeddings; X-CLR), ``"labels"`` (integer class labels; SupCon) or
            ``"none"``.
    """

    name: str
    value: str
    distribution: str | None
    inputs: InputKind
    targets: TargetKind

    @property
    def module(self) -> str:
        """The module that provides the loss (imported only by :meth:`load`)."""
        return self.value.partition(":")[0].strip()

    def load(self) -> Callable[..., nn.Module]:
        """Imports and returns the registered class or factory.

        Returns:
            The class or factory function.

        Raises:
            ImportError: If the providing module cannot be imported or lacks the
                attribute, with the install command where it is known.
        """
        ep = importlib.metadata.EntryPoint(self.name, self.value, ENTRY_POINT_GROUP)
        try:
            obj = ep.load()
        except (ImportError, AttributeError) as err:
            top = self.module.split(".")[0]
            hint = _INSTALL_HINTS.get(top)
            extra = f" Install it: {hint}" if hint else ""
            raise ImportError(
                f"Loss '{self.name}' is provided by '{self.value}' (registered by "
                f"{self.distribution or 'an unknown distribution'}), but importing it "
                f"failed: {err}.{extra}"
            ) from err
        if not callable(obj):
            raise TypeError(
                f"Loss '{self.name}': entry point '{self.value}' must name a class or "
                f"factory function, got {type(obj).__name__}."
            )
        return obj  # type: ignore[no-any-return]


@functools.cache
def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Reads the registered names from the installed distributions (cached).

    Returns:
        Name -> entry points with that name, one per distinct value.
    """
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        same = found.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return found


def clear_cache() -> None:
    """Forgets the registered names, so that newly installed packages are found.

    Distributions installed while the interpreter runs (or added to ``sys.path``) are
    seen after this call.
    """
    _entry_points.cache_clear()
    importlib.invalidate_caches()


def list_losses() -> list[str]:
    """Returns the names of all registered losses, sorted.

    Nothing is imported: the names come from the installed distributions' metadata.

    Returns:
        The names accepted by :func:`create_loss`.
    """
    return sorted(_entry_points())


def _unknown_name_error(name: object) -> ValueError:
    """Builds the error for an unregistered name, with the closest match."""
    names = list_losses()
    close = (
        difflib.get_close_matches(str(name), names, n=1)
        if isinstance(name, str)
        else []
    )
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(
        f"Unknown loss name {name!r}.{hint} Available losses: {', '.join(names) or 'none'}"
        f" (registered under the entry-point group '{ENTRY_POINT_GROUP}')."
    )


def loss_info(name: str) -> LossSpec:
    """Describes a registered loss without building it.

    For the losses xclr-plugin registers nothing is imported. For other losses the
    registered object is imported and its optional ``loss_inputs`` and
    ``loss_targets`` attributes are read (defaults: ``"two-view"``, ``"none"``).

    Args:
        name: A registered name (see :func:`list_losses`).

    Returns:
        The loss's :class:`LossSpec`.

    Raises:
        ValueError: If the name is not registered (the message lists the available
            names and the closest match), if several distributions register the name
            with different targets, or if a loss declares an unknown kind.
    """
    eps = _entry_points().get(name) if isinstance(name, str) else None
    if not eps:
        raise _unknown_name_error(name)
    if len(eps) > 1:
        owners = ", ".join(f"'{ep.value}' ({_distribution_name(ep)})" for ep in eps)
        raise ValueError(
            f"Loss name '{name}' is registered more than once with different targets: "
            f"{owners}. Uninstall one of the distributions."
        )
    ep = eps[0]
    value = ep.value.strip()
    if value in _KNOWN_KINDS:
        inputs, targets = _KNOWN_KINDS[value]
        return LossSpec(name, value, _distribution_name(ep), inputs, targets)
    spec = LossSpec(name, value, _distribution_name(ep), "two-view", "none")
    obj = spec.load()
    inputs = getattr(obj, "loss_inputs", "two-view")
    targets = getattr(obj, "loss_targets", "none")
    if inputs not in _INPUT_KINDS or targets not in _TARGET_KINDS:
        raise ValueError(
            f"Loss '{name}' ('{value}') declares loss_inputs={inputs!r} and "
            f"loss_targets={targets!r}; expected loss_inputs in {_INPUT_KINDS} and "
            f"loss_targets in {_TARGET_KINDS}."
        )
    return LossSpec(name, value, _distribution_name(ep), inputs, targets)


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str | None:
    """The name of the distribution that declares an entry point, if known."""
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.metadata["Name"])


def _parameter_names(factory: Callable[..., Any]) -> list[str]:
    """The keyword parameters a class or factory accepts, for error messages."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered loss by name.

    Args:
        name: A registered name (see :func:`list_losses`), e.g. ``"xclr"``,
            ``"supcon"``, ``"ntxent"`` or ``"clip"``.
        **kwargs: Passed to the loss's constructor (or factory).

    Returns:
        The loss module.

    Raises:
        ValueError: If the name is not registered; the message lists the available
            names and the closest match.
        TypeError: If the loss does not accept one of ``kwargs`` (the message names the
            loss and its accepted parameters), or if the registered object does not
            return a :class:`torch.nn.Module`.
        ImportError: If the library that provides the loss is not installed.

    Examples:
        >>> criterion = create_loss("xclr", temperature=0.1, target_temperature=0.1)
        >>> criterion = create_loss("ntxent", temperature=0.5, gather_distributed=True)
    """
    spec = loss_info(name)
    factory = spec.load()
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call check
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            accepted = ", ".join(_parameter_names(factory)) or "no keyword arguments"
            raise TypeError(
                f"Loss '{name}' ({spec.value}) does not accept the arguments "
                f"{sorted(kwargs)}: {err}. It accepts: {accepted}."
            ) from None
    loss = factory(**kwargs)
    if not isinstance(loss, nn.Module):
        raise TypeError(
            f"Loss '{name}': '{spec.value}' returned {type(loss).__name__}, expected a "
            f"torch.nn.Module."
        )
    return loss


def build_criterion(config: Mapping[str, Any]) -> nn.Module:
    """Builds a loss from a config mapping: ``name`` plus keyword arguments.

    This is the entry for code-based configs (a ``dict``, or an OmegaConf/hydra
    ``DictConfig`` such as the ``criterion`` node of ``xclr-train``). Keys whose value
    is ``None`` are left out, so the loss uses its own default for them.

    Args:
        config: Mapping with a ``"name"`` key (a registered loss name) and the loss's
            keyword arguments.

    Returns:
        The loss module.

    Raises:
        ValueError: If ``config`` has no ``name`` or the name is not registered.
        TypeError: If ``config`` is not a mapping or holds arguments the loss rejects.

    Examples:
        >>> build_criterion({"name": "xclr", "temperature": 0.1})
        >>> build_criterion(OmegaConf.create({"name": "ntxent", "temperature": 0.5}))
    """
    kwargs = _to_plain_dict(config)
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError(
            f"The criterion config needs a 'name' key naming the loss (one of: "
            f"{', '.join(list_losses())}); got keys {sorted(kwargs)}."
        )
    if not isinstance(name, str):
        raise _unknown_name_error(name)
    return create_loss(name, **{k: v for k, v in kwargs.items() if v is not None})


def _to_plain_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """Converts a mapping (OmegaConf containers included) into plain Python objects."""
    omegaconf = sys.modules.get("omegaconf")  # a DictConfig implies it is imported
    if omegaconf is not None and isinstance(config, omegaconf.DictConfig):
        plain = omegaconf.OmegaConf.to_container(config, resolve=True)
        return {str(k): v for k, v in plain.items()}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"The criterion config must be a mapping with a 'name' key, got "
            f"{type(config).__name__}."
        )
    return {str(k): v for k, v in config.items()}


def supcon_loss(
    temperature: float = 0.1,
    target_temperature: float = 0.01,
    memory_bank_size: int | tuple[int, int] = 0,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
) -> nn.Module:
    """X-CLR with integer class labels as targets: supervised contrastive (SupCon).

    With labels, the X-CLR target of view ``a`` puts weight
    ``exp(1 / target_temperature)`` on the other view and every view of a same-label
    sample, and ``exp(0)`` on the rest; with the default ``target_temperature=0.01`` the
    latter is ``e^-100`` relative, so the target is uniform over the positives: the
    soft-label SupCon form (Khosla et al., 2020). Call the loss as
    ``loss(out0, out1, labels)`` with ``labels`` an integer ``(batch_size,)`` tensor.

    Args:
        temperature: Logit temperature.
        target_temperature: Temperature of the label graph; small means hard SupCon
            targets.
        memory_bank_size: ``(num_entries, dim)`` for a MoCo-style bank, or 0.
        gather_distributed: Gather embeddings and labels from all processes.
        chunk_size: Samples per block (memory linear in the batch), or None.

    Returns:
        An :class:`xclr_plugin.loss.XCLRLoss`.
    """
    from xclr_plugin.loss import XCLRLoss

    return XCLRLoss(
        temperature=temperature,
        target_temperature=target_temperature,
        memory_bank_size=memory_bank_size,
        gather_distributed=gather_distributed,
        chunk_size=chunk_size,
    )
