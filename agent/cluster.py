"""The training cluster a monitor runs in, from ``TF_CONFIG``: which task this process is, which
one delivers, and the run id every worker of the job shares.

Under ``tf.distribute.MultiWorkerMirroredStrategy`` every worker all-reduces the same
gradients, so every worker's monitor measures and clips the same numbers. Only the chief (the
``chief`` task, else ``worker`` 0, as TensorFlow and Keras decide who writes checkpoints and
summaries) delivers them: N workers sending N identical copies would only multiply traffic.
The run id is derived from the project, the run name and the cluster's addresses, so every
worker (and a worker restarted by the job) names the same run without being told.

Pure Python (``json``, ``uuid``); never imports TensorFlow. Thread-safe (immutable values).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ConfigError, MonitorConfig

__all__ = ["ClusterTask", "cluster_task", "in_cluster", "shared_run_id"]

_NAMESPACE = uuid.UUID("6f0c7d1e-8a4b-5c2d-9e3f-0a1b2c3d4e5f")
"""uuid5 namespace of run ids derived from a cluster (fixed forever: ids must not change)."""

_TRAINING_TASKS = ("chief", "worker")
"""Task types that train (and so run a monitor's train step); ``ps`` and ``evaluator`` don't."""


@dataclass(frozen=True, slots=True)
class ClusterTask:
    """This process's task in a multi-worker cluster.

    Attributes:
        task_type: ``chief`` or ``worker`` (``TF_CONFIG``'s ``task.type``).
        index: ``TF_CONFIG``'s ``task.index``.
        workers: Training tasks in the cluster (chief plus workers, >= 2).
        chief: The task that delivers, as ``type:index``.
        addresses: Every training task's address, in cluster order (what the run id hashes).
    """

    task_type: str
    index: int
    workers: int
    chief: str
    addresses: tuple[str, ...]

    @property
    def name(self) -> str:
        """This task as ``type:index`` (``worker:1``)."""
        return f"{self.task_type}:{self.index}"

    @property
    def is_chief(self) -> bool:
        """Whether this task delivers the run's steps."""
        return self.name == self.chief

    @property
    def delegation(self) -> str:
        """What a non-chief worker's monitor says at construction."""
        return (
            f"{self.name} of {self.workers} workers; the chief ({self.chief}) delivers the "
            "run's steps"
        )

    def describe(self) -> dict[str, object]:
        """JSON-able summary sent with the run's config."""
        return {"workers": self.workers, "chief": self.chief, "delivered_by": "chief"}


def cluster_task(environ: Mapping[str, str] = os.environ) -> ClusterTask | None:
    """This process's task from ``TF_CONFIG``, or None outside a multi-worker cluster.

    None when ``TF_CONFIG`` is unset or empty, names one training task only, or this task does
    not train (``ps``, ``evaluator``).

    Raises:
        ConfigError: ``TF_CONFIG`` is not the JSON TensorFlow expects (the message says what).
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster = config.get("cluster") or {}
        task = config.get("task") or {}
        task_type, index = str(task.get("type", "")), int(task.get("index", 0))
        addresses = tuple(
            str(address) for kind in _TRAINING_TASKS for address in cluster.get(kind, [])
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            "TF_CONFIG: expected JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            f'"index": 0}}, got {raw[:200]!r} ({error})'
        ) from None
    if len(addresses) < 2 or task_type not in _TRAINING_TASKS:
        return None
    chief = "chief:0" if cluster.get("chief") else "worker:0"
    return ClusterTask(task_type, index, len(addresses), chief, addresses)


def shared_run_id(project: str, run: str, task: ClusterTask) -> str:
    """The run id every task of ``task``'s cluster derives for ``project``/``run``.

    The same job relaunched on the same hosts and ports with the same run name continues the
    same run (a restarted job resumes it); give a new launch a new run name, or pass
    ``run_id``, to start a new run.
    """
    key = json.dumps([project, run, list(task.addresses)], separators=(",", ":"))
    return str(uuid.uuid5(_NAMESPACE, key))


def in_cluster(
    config: MonitorConfig, run_id_given: bool
) -> tuple[MonitorConfig, ClusterTask | None]:
    """``config`` for this process's task (the shared run id unless one was given) and the task,
    or ``config`` unchanged and None outside a multi-worker cluster.

    Raises:
        ConfigError: ``TF_CONFIG`` is malformed.
    """
    task = cluster_task()
    if task is None or run_id_given:
        return config, task
    return dataclasses.replace(config, run_id=shared_run_id(config.project, config.run, task)), task
