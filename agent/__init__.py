"""gradwatch agent: per-layer gradient statistics and clipping inside the compiled train step.

Typical use::

    from gradwatch.agent import GradientMonitor, clip

    monitor = GradientMonitor(run="resnet", server="http://127.0.0.1:8000",
                              policy=clip.global_norm(1.0))
    model.fit(x, y, callbacks=[monitor])
    monitor.close()

Never imports FastAPI or SQLAlchemy. TensorFlow and Keras are imported on first use of
a name that needs them (PEP 562), so the transport, spool, local, upload, delivery and
records modules, which ``gradwatch upload`` uses, work without loading TensorFlow.
``MonitoredOptimizer`` is registered with Keras as soon as Keras is imported (before or
after this package), so ``keras.models.load_model`` of a model compiled with
``monitor.wrap(...)`` needs nothing more than ``import gradwatch.agent``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ConfigError, MonitorClosedError, MonitorConfig
from .records import StepBatch
from .registration import register_when_keras_loads

if TYPE_CHECKING:
    from . import clip
    from .monitor import GradientMonitor
    from .optimizer import MonitoredOptimizer

__all__ = [
    "ConfigError",
    "GradientMonitor",
    "MonitorClosedError",
    "MonitorConfig",
    "MonitoredOptimizer",
    "StepBatch",
    "clip",
]

_LAZY = {
    "GradientMonitor": ".monitor",
    "MonitoredOptimizer": ".optimizer",
}


def __getattr__(name: str) -> Any:
    if name == "clip":
        return importlib.import_module(".clip", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'gradwatch.agent' has no attribute {name!r}")


register_when_keras_loads()
