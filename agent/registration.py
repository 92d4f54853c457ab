"""Make ``import gradwatch.agent`` enough for ``keras.models.load_model``, without TensorFlow.

A model compiled with ``monitor.wrap(optimizer)`` is saved with ``MonitoredOptimizer``
(registered as ``gradwatch>MonitoredOptimizer``); loading it needs that class in Keras'
registry. Importing the class imports TensorFlow, which ``gradwatch upload`` and the other
delivery modules must not pay for. So :func:`register_when_keras_loads` registers it at once
when Keras is already imported, and otherwise the moment Keras finishes importing, through a
one-shot import hook on the ``keras`` module (the pattern of ``wrapt``'s post-import hooks).

Import-time only; not thread-safe beyond what the import lock gives.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["register_when_keras_loads"]

_REGISTERING_MODULE = "gradwatch.agent.optimizer"


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds ``keras`` with the other finders and registers gradwatch once it has executed.

    It stays in ``sys.meta_path`` until Keras has really been executed: TensorFlow calls
    ``importlib.util.find_spec("keras")`` to probe for Keras long before importing it.
    """

    def __init__(self) -> None:
        self._finding = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "keras" or self._finding:
            return None
        self._finding = True  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = None if spec is None else spec.loader
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_keras = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            exec_keras(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module(_REGISTERING_MODULE)

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader only
        return spec


def register_when_keras_loads() -> None:
    """Register gradwatch's Keras classes now if Keras is loaded, else when it loads."""
    if "keras" in sys.modules:
        importlib.import_module(_REGISTERING_MODULE)
    elif not any(isinstance(finder, _AfterKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())
