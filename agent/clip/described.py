"""A policy from its description (``policy.describe()``), as a run's configuration and an
incident bundle's manifest hold it: the replay rebuilds the run's policy with it.

Stateless; safe from any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config import ConfigError
from .adaptive import agc, autoclip, zclip
from .base import ClipPolicy
from .chain import chain
from .norm import by_norm, by_value, global_norm, layer_norm
from .skip import skip_nonfinite, skip_spike

__all__ = ["from_description"]

_FACTORIES: dict[str, Callable[..., ClipPolicy]] = {
    "by_value": by_value,
    "by_norm": by_norm,
    "global_norm": global_norm,
    "layer_norm": layer_norm,
    "agc": agc,
    "autoclip": autoclip,
    "zclip": zclip,
    "skip_nonfinite": skip_nonfinite,
    "skip_spike": skip_spike,
}


def from_description(described: Mapping[str, Any]) -> ClipPolicy:
    """The policy ``described`` (``{"policy": name, <argument>: value, ...}``).

    Raises:
        ConfigError: An unknown policy name or arguments its factory refuses.
    """
    if not isinstance(described, Mapping):
        raise ConfigError(f"policy: expected a policy's description, got {described!r}")
    arguments = dict(described)
    name = arguments.pop("policy", None)
    if name == "chain":
        return chain(*(from_description(item) for item in arguments.get("policies", [])))
    factory = _FACTORIES.get(str(name))
    if factory is None:
        raise ConfigError(
            f"policy: unknown policy {name!r} (known: chain, {', '.join(_FACTORIES)})"
        )
    try:
        return factory(**arguments)
    except TypeError as error:
        raise ConfigError(f"policy {name}: {error}") from None
