"""gradwatch agent: per-layer gradient statistics and clipping inside the compiled train step.

Typical use::

    from gradwatch.agent import GradientMonitor, clip

    monitor = GradientMonitor(run="resnet", server="http://127.0.0.1:8000",
                              policy=clip.global_norm(1.0))
    model.fit(x, y, callbacks=[monitor])
    monitor.close()

Imports TensorFlow and Keras; never FastAPI or SQLAlchemy.
"""

from gradwatch.agent import clip
from gradwatch.agent.config import ConfigError, MonitorConfig
from gradwatch.agent.monitor import GradientMonitor, MonitoredOptimizer
from gradwatch.agent.records import StepBatch

__all__ = [
    "ConfigError",
    "GradientMonitor",
    "MonitorConfig",
    "MonitoredOptimizer",
    "StepBatch",
    "clip",
]
