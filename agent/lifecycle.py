"""Process events for the agent's long-lived objects: interpreter exit and ``os.fork``.

Objects register bound methods; the registry holds only weak references, so
registering never keeps a monitor or a sender alive. At interpreter exit the
exit calls run, newest first (a monitor registered after its sender closes
first). In a forked child the parent's exit calls are forgotten (the parent's
monitors must not set its run's status from the child), and the fork calls run
so each object can renew its locks and connections (and register again).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import weakref
from collections.abc import Callable

__all__ = ["close_at_exit", "reset_after_fork"]

log = logging.getLogger("gradwatch.agent")

_keys = itertools.count()
_exit_calls: dict[int, weakref.WeakMethod[Callable[[], object]]] = {}
_fork_calls: dict[int, weakref.WeakMethod[Callable[[], object]]] = {}


def _register(
    registry: dict[int, weakref.WeakMethod[Callable[[], object]]], method: Callable[[], object]
) -> None:
    key = next(_keys)

    def forget(_: object) -> None:
        registry.pop(key, None)

    registry[key] = weakref.WeakMethod(method, forget)  # type: ignore[arg-type]


def close_at_exit(method: Callable[[], object]) -> None:
    """Call the bound ``method`` at interpreter exit, unless its object was collected.

    Holds only a weak reference, so registering never keeps an object alive.
    Calls run in reverse order of registration (a monitor registered after its
    sender closes first). Exceptions are logged, never raised. Thread-safe;
    never blocks.
    """
    _register(_exit_calls, method)


def reset_after_fork(method: Callable[[], object]) -> None:
    """Call the bound ``method`` in the child after ``os.fork``, unless its object was collected.

    Holds only a weak reference. The child's exit calls are cleared first, so
    ``method`` registers its object's exit call again if it wants one.
    Thread-safe; never blocks.
    """
    _register(_fork_calls, method)


def _run_exit_calls() -> None:
    for key in sorted(_exit_calls, reverse=True):
        reference = _exit_calls.pop(key, None)
        method = reference() if reference is not None else None
        if method is None:
            continue
        try:
            method()
        except Exception:
            log.exception("gradwatch: error while closing at interpreter exit")


def _after_fork_in_child() -> None:
    _exit_calls.clear()
    for key in sorted(_fork_calls):
        reference = _fork_calls.get(key)
        method = reference() if reference is not None else None
        if method is not None:
            method()


atexit.register(_run_exit_calls)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
