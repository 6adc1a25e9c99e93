"""Contrastive losses by name, found through the ``xclr_plugin.losses`` entry points.

A distribution registers a :class:`torch.nn.Module` class or factory in its
``pyproject.toml`` (``[project.entry-points."xclr_plugin.losses"]``, ``my-loss =
"my_package.losses:MyLoss"``); nothing is imported until a name is asked for. Every
error raised here is a :class:`~xclr_plugin.errors.UsageError`: a command prints it as
one line.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import numbers
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

from xclr_plugin.errors import UsageError
from xclr_plugin.loss import XCLRLoss

ENTRY_POINT_GROUP = "xclr_plugin.losses"

InputKind = Literal["two-view", "image-text"]
TargetKind = Literal["captions", "labels", "none"]

# By entry-point value, so that loss_info() imports nothing for xclr-plugin's losses;
# others set ``loss_inputs`` / ``loss_targets`` on the registered object.
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

_INSTALL_HINTS: dict[str, str] = {
    "open_clip": 'pip install "xclr-plugin[openclip]"',
    "lightly": 'pip install "xclr-plugin"',
}


class LossImportError(UsageError, ImportError):
    """A registered loss cannot be imported (whatever its module raises) or names
    nothing callable."""


class LossArgumentError(UsageError, TypeError):
    """Arguments a loss does not take or of the wrong type; a factory's non-module."""


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: where it comes from and what its ``forward`` expects.

    ``inputs``: ``"two-view"`` (``forward(out0, out1[, targets])``, lightly style) or
    ``"image-text"`` (``forward(image_features, text_features, logit_scale, ...)``,
    open_clip style). ``targets``: ``"captions"`` (caption embeddings), ``"labels"``
    (integer class labels) or ``"none"``. ``value`` is ``"module:attribute"``.
    """

    name: str
    value: str
    distribution: str | None
    inputs: InputKind
    targets: TargetKind

    @property
    def module(self) -> str:
        return self.value.partition(":")[0].strip()

    def load(self) -> Callable[..., nn.Module]:
        """Imports the registered class or factory.

        Raises:
            LossImportError: If importing it fails, whatever the error (naming the
                loss, its entry point, its distribution, the error and, if known, the
                install command), or it names something not callable.
        """
        ep = importlib.metadata.EntryPoint(self.name, self.value, ENTRY_POINT_GROUP)
        try:
            obj = ep.load()
        except Exception as err:  # a plugin may raise anything at import
            hint = _INSTALL_HINTS.get(self.module.split(".")[0])
            extra = f" Install it: {hint}" if hint else ""
            kind = "" if isinstance(err, ImportError) else f"{type(err).__name__}: "
            raise LossImportError(
                f"Loss '{self.name}' is provided by '{self.value}' (registered by "
                f"{self.distribution or 'an unknown distribution'}), but importing it "
                f"failed: {kind}{err}.{extra}"
            ) from err
        if not callable(obj):
            raise LossImportError(
                f"Loss '{self.name}': entry point '{self.value}' must name a class or "
                f"factory function, got {type(obj).__name__}."
            )
        return obj  # type: ignore[no-any-return]


@functools.cache
def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Registered name -> its entry points, one per distinct value."""
    found: dict[str, dict[str, importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, {}).setdefault(ep.value, ep)
    return {name: list(eps.values()) for name, eps in found.items()}


def clear_cache() -> None:
    """Forgets the registered names, so that packages installed since are found."""
    _entry_points.cache_clear()
    importlib.invalidate_caches()


def list_losses(inputs: InputKind | None = None) -> list[str]:
    """The names accepted by :func:`create_loss`, sorted (imports nothing).

    With ``inputs``, only the losses whose ``forward`` takes those inputs. Finding a
    third-party loss's kind imports it; one that cannot be loaded is left out with a
    warning naming it and its error.
    """
    names = sorted(_entry_points())
    if inputs is None:
        return names
    if inputs not in get_args(InputKind):
        raise UsageError(
            f"inputs must be one of {get_args(InputKind)} or None, got {inputs!r}."
        )
    fitting = []
    for name in names:
        try:
            if loss_info(name).inputs == inputs:
                fitting.append(name)
        except UsageError as err:
            warnings.warn(f"Leaving out loss '{name}': {err}", stacklevel=2)
    return fitting


def loss_info(name: str) -> LossSpec:
    """Describes a registered loss without building it.

    Nothing is imported for xclr-plugin's losses; for others the registered object is
    imported and its optional ``loss_inputs`` / ``loss_targets`` attributes are read
    (default ``"two-view"``, ``"none"``).

    Raises:
        UsageError: If the name is not registered (naming the available names and the
            closest match), is registered for different objects (naming them and their
            distributions), or declares an unknown kind.
        LossImportError: If a third-party loss cannot be imported.
    """
    eps = _entry_points().get(name, []) if isinstance(name, str) else None
    if not eps:  # [] for an unregistered string, None for a non-string
        names = list_losses()
        close = difflib.get_close_matches(name, names, 1) if eps is not None else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(
            f"Unknown loss name {name!r}.{hint} Available losses: "
            f"{', '.join(names) or 'none'} (registered under the entry-point group "
            f"'{ENTRY_POINT_GROUP}')."
        )
    if len(eps) > 1:
        owners = "; ".join(f"'{ep.value}' by {_origin(ep)}" for ep in eps)
        raise UsageError(
            f"Loss name '{name}' is registered {len(eps)} times for different objects: "
            f"{owners}. Uninstall one of the distributions or rename its entry point."
        )
    ep = eps[0]
    value, distribution = ep.value.strip(), _distribution_name(ep)
    if value in _KNOWN_KINDS:
        return LossSpec(name, value, distribution, *_KNOWN_KINDS[value])
    obj = LossSpec(name, value, distribution, "two-view", "none").load()
    inputs: InputKind = getattr(obj, "loss_inputs", "two-view")
    targets: TargetKind = getattr(obj, "loss_targets", "none")
    if inputs not in get_args(InputKind) or targets not in get_args(TargetKind):
        raise UsageError(
            f"Loss '{name}' ('{value}') declares loss_inputs={inputs!r} and "
            f"loss_targets={targets!r}; expected loss_inputs in {get_args(InputKind)} "
            f"and loss_targets in {get_args(TargetKind)}."
        )
    return LossSpec(name, value, distribution, inputs, targets)


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.metadata["Name"])


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    """``name version (at folder)`` of the distribution registering ``ep``."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version} (at {dist.locate_file('')})"


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: the call checks
        return None


def parameter_names(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword parameters a class or factory accepts, in signature order.

    The one signature-introspection helper (registry and both trainers). None if the
    factory takes ``**kwargs`` or has no signature: the call itself checks.
    """
    signature = _signature(factory)
    if signature is None:
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword]


def _scalar_kind(parameter: inspect.Parameter) -> tuple[type, bool] | None:
    """``(bool | int | float, None allowed)`` for a parameter annotated (or without
    annotation, defaulting to) one of these types; None for any other."""
    annotation, default = parameter.annotation, parameter.default
    if annotation is inspect.Parameter.empty:
        kind = type(default)
        return (kind, False) if kind in (bool, int, float) else None
    if not isinstance(annotation, str):
        annotation = inspect.formatannotation(annotation)
    text = annotation.replace("typing.", "").replace(" ", "")
    bare = re.sub(r"^Optional\[(.*)\]$|\|None$|^None\|", r"\1", text)
    scalar = {"bool": bool, "int": int, "float": float}.get(bare)
    return None if scalar is None else (scalar, bare != text or default is None)


def _is_a(value: object, kind: type, optional: bool) -> bool:
    """Whether ``value`` fits: a bool is no int or float; numpy scalars are."""
    if value is None:
        return optional
    is_bool = type(value).__name__ in ("bool", "bool_")  # also numpy's bools
    if is_bool or kind is bool:
        return is_bool and kind is bool
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered loss by name, passing ``kwargs`` to its constructor.

    Raises:
        UsageError: If the name is not registered (naming the closest match).
        LossArgumentError: If the loss does not accept one of ``kwargs`` (naming the
            loss and its parameters), a bool, int or float parameter gets another type
            (``gather_distributed='false'``), or it returns no :class:`torch.nn.Module`.
        LossImportError: If the library that provides the loss cannot be imported.

    Examples:
        >>> criterion = create_loss("ntxent", temperature=0.5, gather_distributed=True)
    """
    spec = loss_info(name)
    factory = spec.load()
    try:
        if (signature := _signature(factory)) is not None:
            signature.bind(**kwargs)
    except TypeError as err:
        names = parameter_names(factory)
        accepted = "any keyword arguments" if names is None else ", ".join(names)
        raise LossArgumentError(
            f"Loss '{name}' ({spec.value}) does not accept the arguments "
            f"{sorted(kwargs)}: {err}. It accepts: {accepted or 'no keyword arguments'}."
        ) from None
    parameters = {} if signature is None else signature.parameters
    for key, value in kwargs.items():
        kind = _scalar_kind(parameters[key]) if key in parameters else None
        if kind is not None and not _is_a(value, *kind):
            expected = {bool: "a bool", int: "an int", float: "a float"}[kind[0]]
            raise LossArgumentError(
                f"Loss '{name}': {key} must be {expected}{' or None' * kind[1]}, got "
                f"{value!r} ({type(value).__name__})."
            )
    loss = factory(**kwargs)
    if not isinstance(loss, nn.Module):
        raise LossArgumentError(
            f"Loss '{name}': '{spec.value}' returned {type(loss).__name__}, expected a "
            f"torch.nn.Module."
        )
    return loss


def build_criterion(config: Mapping[str, Any]) -> nn.Module:
    """Builds a loss from a mapping: ``name`` plus the loss's keyword arguments.

    ``config`` may be a ``dict`` or an OmegaConf ``DictConfig`` (``xclr-train``'s
    ``criterion``). Keys whose value is ``None`` are left out: the loss's default.

    Raises:
        ValueError: If ``config`` has no ``name`` or the name is not registered.
        TypeError: If ``config`` is not a mapping or holds arguments the loss rejects.
    """
    omegaconf = sys.modules.get("omegaconf")  # a DictConfig implies it is imported
    if omegaconf is not None and isinstance(config, omegaconf.DictConfig):
        config = omegaconf.OmegaConf.to_container(config, resolve=True)
    elif not isinstance(config, Mapping):
        raise TypeError(
            f"The criterion config must be a mapping with a 'name' key, got "
            f"{type(config).__name__}."
        )
    kwargs = {str(k): v for k, v in config.items()}
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError(
            f"The criterion config needs a 'name' key naming the loss (one of: "
            f"{', '.join(list_losses())}); got keys {sorted(kwargs)}."
        )
    return create_loss(name, **{k: v for k, v in kwargs.items() if v is not None})


def supcon_loss(
    temperature: float = 0.1,
    target_temperature: float = 0.01,
    memory_bank_size: int | tuple[int, int] = 0,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
) -> nn.Module:
    """X-CLR with integer class labels as targets: supervised contrastive (SupCon).

    With labels, the target of view ``a`` weighs the other view and every view of a
    same-label sample by ``exp(1 / target_temperature)`` and the rest by ``exp(0)``;
    with the default ``0.01`` that is ``e^-100`` relative, so the target is uniform
    over the positives: soft-label SupCon (Khosla et al., 2020). Call the loss as
    ``loss(out0, out1, labels)``. Arguments as :class:`xclr_plugin.loss.XCLRLoss`.
    """
    return XCLRLoss(
        temperature,
        target_temperature,
        memory_bank_size,
        gather_distributed,
        chunk_size,
    )
