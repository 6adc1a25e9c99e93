"""Contrastive losses by name, found through the ``xclr_plugin.losses`` entry points.

A distribution registers a :class:`torch.nn.Module` class or factory in its
``pyproject.toml`` (``[project.entry-points."xclr_plugin.losses"]``, ``my-loss =
"my_package.losses:MyLoss"``); nothing is imported until a name is asked for.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

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
            ImportError: If it cannot be imported (with the install command if known).
            TypeError: If the entry point names something not callable.
        """
        ep = importlib.metadata.EntryPoint(self.name, self.value, ENTRY_POINT_GROUP)
        try:
            obj = ep.load()
        except (ImportError, AttributeError) as err:
            hint = _INSTALL_HINTS.get(self.module.split(".")[0])
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
    """Registered name -> its entry points, one per distinct value."""
    found: dict[str, dict[str, importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, {}).setdefault(ep.value, ep)
    return {name: list(eps.values()) for name, eps in found.items()}


def clear_cache() -> None:
    """Forgets the registered names, so that packages installed since are found."""
    _entry_points.cache_clear()
    importlib.invalidate_caches()


def list_losses() -> list[str]:
    """The names accepted by :func:`create_loss`, sorted (imports nothing)."""
    return sorted(_entry_points())


def loss_info(name: str) -> LossSpec:
    """Describes a registered loss without building it.

    Nothing is imported for xclr-plugin's losses; for others the registered object is
    imported and its optional ``loss_inputs`` / ``loss_targets`` attributes are read
    (default ``"two-view"``, ``"none"``).

    Raises:
        ValueError: If the name is not registered (naming the available names and the
            closest match), is registered by several distributions with different
            targets, or declares an unknown kind.
    """
    eps = _entry_points().get(name, []) if isinstance(name, str) else None
    if not eps:  # [] for an unregistered string, None for a non-string
        names = list_losses()
        close = difflib.get_close_matches(name, names, 1) if eps is not None else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"Unknown loss name {name!r}.{hint} Available losses: "
            f"{', '.join(names) or 'none'} (registered under the entry-point group "
            f"'{ENTRY_POINT_GROUP}')."
        )
    if len(eps) > 1:
        owners = ", ".join(f"'{ep.value}' ({_distribution_name(ep)})" for ep in eps)
        raise ValueError(
            f"Loss name '{name}' is registered more than once with different targets: "
            f"{owners}. Uninstall one of the distributions."
        )
    ep = eps[0]
    value, distribution = ep.value.strip(), _distribution_name(ep)
    if value in _KNOWN_KINDS:
        return LossSpec(name, value, distribution, *_KNOWN_KINDS[value])
    obj = LossSpec(name, value, distribution, "two-view", "none").load()
    inputs: InputKind = getattr(obj, "loss_inputs", "two-view")
    targets: TargetKind = getattr(obj, "loss_targets", "none")
    if inputs not in get_args(InputKind) or targets not in get_args(TargetKind):
        raise ValueError(
            f"Loss '{name}' ('{value}') declares loss_inputs={inputs!r} and "
            f"loss_targets={targets!r}; expected loss_inputs in {get_args(InputKind)} "
            f"and loss_targets in {get_args(TargetKind)}."
        )
    return LossSpec(name, value, distribution, inputs, targets)


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.metadata["Name"])


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


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered loss by name, passing ``kwargs`` to its constructor.

    Raises:
        ValueError: If the name is not registered (naming the closest match).
        TypeError: If the loss does not accept one of ``kwargs`` (naming the loss and
            its parameters) or does not return a :class:`torch.nn.Module`.
        ImportError: If the library that provides the loss is not installed.

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
        raise TypeError(
            f"Loss '{name}' ({spec.value}) does not accept the arguments "
            f"{sorted(kwargs)}: {err}. It accepts: {accepted or 'no keyword arguments'}."
        ) from None
    loss = factory(**kwargs)
    if not isinstance(loss, nn.Module):
        raise TypeError(
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
