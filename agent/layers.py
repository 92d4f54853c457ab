"""Map trainable variables to the layers they belong to, and name those layers.

A *layer* is the Keras layer object that owns a variable: the deepest layer
(in the model's layer tree) whose weights include it. Its name is its path in
that tree from the root model, joined by ``/``: ``vae/encoder/conv2d``,
``twin/enc_a/proj``, ``transformer/block/multi_head_attention/query``. So two
sub-models that both hold a ``Dense(name="proj")`` give two layers, a shared
layer (the same object reached twice) gives one, and a weight added directly
to a model is reported under the model's own path.

Names that Keras generated (``dense_7``: the class name in snake case, with a
process-wide counter) are renumbered per parent in order of appearance
(``dense``, ``dense_1``, ...), so the same architecture gets the same names in
every build and every process; names given explicitly are kept as they are.

Without a model (a custom loop that never called ``monitor.set_model``), the
owner is taken from the variable's Keras path minus its last part
(``seq/dense_1/kernel`` → ``seq/dense_1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LayerLayout", "layer_paths", "layout_of", "variable_path"]


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


def _snake_case(name: str) -> str:
    """Keras' class-name → layer-name rule: ``MultiHeadAttention`` → ``multi_head_attention``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _stable_names(children: Sequence[Any]) -> list[str]:
    """The children's names, with Keras-generated ones renumbered in order of appearance."""
    seen: dict[str, int] = {}
    names = []
    for child in children:
        name = str(child.name)
        base = _snake_case(type(child).__name__)
        if name == base or re.fullmatch(re.escape(base) + r"_\d+", name):
            count = seen.get(base, 0)
            seen[base] = count + 1
            name = base if count == 0 else f"{base}_{count}"
        names.append(name)
    return names


def layer_paths(
    root: Any, children: Callable[[Any], Sequence[Any]], key: Callable[[Any], object]
) -> dict[object, str]:
    """Name the owner of every trainable variable of ``root`` by its path in the layer tree.

    Args:
        root: The model (any Keras layer).
        children: A layer's direct sub-layers, in tracking order.
        key: A variable's identity (the same across replicas and wrappers).

    Returns:
        ``key(variable)`` → the path of the deepest layer holding it. Host-side, pure
        Python; call it once per build (it walks every layer).
    """
    names: dict[object, str] = {}
    visited: set[int] = set()

    def visit(layer: Any, path: str) -> None:
        visited.add(id(layer))
        kids = [c for c in children(layer) if id(c) not in visited]
        for kid, name in zip(kids, _stable_names(kids), strict=True):
            if id(kid) not in visited:  # a layer listed twice under one parent
                visit(kid, f"{path}/{name}")
        for variable in layer.trainable_weights:
            names.setdefault(key(variable), path)

    visit(root, _stable_names([root])[0])
    return names


def layout_of(
    variables: Sequence[Any],
    owners: Mapping[object, str] | None = None,
    key: Callable[[Any], object] | None = None,
    group: str | None = None,
) -> LayerLayout:
    """Group ``variables`` into layers.

    Args:
        variables: The trainable variables, in the order the optimizer sees them.
        owners: ``key(variable)`` → layer path (:func:`layer_paths`); a variable
            missing from it is named by its own path (:func:`variable_path`).
        key: The identity used in ``owners`` (required with ``owners``).
        group: An optimizer group's name: the layer names become
            ``group/<path relative to the deepest layer holding all the group's
            variables>`` (``discriminator/conv2d``), so each group reads the same
            whether or not its model sits inside another.

    Returns:
        The layout; deterministic for a given model.
    """
    paths = [_owner(v, owners, key) for v in variables]
    if group is not None:
        paths = _relative(paths, group)
    names: list[str] = []
    index: dict[str, int] = {}
    segment_ids: list[int] = []
    for path in paths:
        if path not in index:
            index[path] = len(names)
            names.append(path)
        segment_ids.append(index[path])
    return LayerLayout(names=tuple(names), segment_ids=tuple(segment_ids))


def _owner(variable: Any, owners: Mapping[object, str] | None, key: Any) -> str:
    if owners is not None and key is not None:
        found = owners.get(key(variable))
        if found is not None:
            return found
    path = variable_path(variable)
    return path.rsplit("/", 1)[0] if "/" in path else path


def _relative(paths: list[str], group: str) -> list[str]:
    """``group/`` + each path without the parent folders all of them share."""
    parents = [p.split("/")[:-1] for p in paths]
    common = 0
    if parents:
        shortest = min(len(p) for p in parents)
        while common < shortest and len({tuple(p[: common + 1]) for p in parents}) == 1:
            common += 1
    return [f"{group}/" + "/".join(p.split("/")[common:]) for p in paths]
