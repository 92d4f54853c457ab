"""Map trainable variables to the layers they belong to.

A *layer* is the owner of a variable: its Keras path minus the last part
(``sub_seq/dense_1/kernel`` → ``sub_seq/dense_1``). Variables that no layer
owns (a weight added directly on a subclassed model) are grouped under the
model's path the same way, so nothing goes unreported. A shared layer owns its
variables once, so it is one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LayerLayout", "layout_of", "variable_path"]


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """Which layer each variable belongs to.

    Attributes:
        names: Layer names in order of first appearance among the variables.
        segment_ids: For variable ``i``, the index into ``names`` of its layer.
    """

    names: tuple[str, ...]
    segment_ids: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        """Number of layer groups."""
        return len(self.names)


def variable_path(variable: Any) -> str:
    """Return a variable's readable path (``layer/sub_layer/kernel``).

    Keras 3 variables carry ``path``; plain ``tf.Variable`` names end in ``:0``.
    """
    path = getattr(variable, "path", None)
    if not isinstance(path, str) or not path:
        path = str(getattr(variable, "name", "variable"))
    return path.removesuffix(":0")


def layout_of(variables: Sequence[Any]) -> LayerLayout:
    """Group ``variables`` into layers by their path.

    Args:
        variables: The trainable variables, in the order the optimizer sees them.

    Returns:
        The layout; deterministic for a given model.
    """
    names: list[str] = []
    index: dict[str, int] = {}
    segment_ids: list[int] = []
    for variable in variables:
        path = variable_path(variable)
        owner = path.rsplit("/", 1)[0] if "/" in path else path
        if owner not in index:
            index[owner] = len(names)
            names.append(owner)
        segment_ids.append(index[owner])
    return LayerLayout(names=tuple(names), segment_ids=tuple(segment_ids))
