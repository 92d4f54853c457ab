"""``gradwatch server --workers N``: N uvicorn worker processes that act as one server.

The workers are separate interpreters (uvicorn spawns them and each builds its app with
``create_app()``), so everything they must agree on travels through the environment:

- the settings, as ``GRADWATCH_*`` variables (``require_auth`` included, as decided here);
- ``GRADWATCH_RATE_LIMIT_FILE``: the rate-limit buckets, one memory-mapped table shared by
  every worker (``ratelimit.FileBuckets``), so a token's rate and an address's failed
  authentications are limited for the server as a whole, not N times over;
- ``PROMETHEUS_MULTIPROC_DIR``: the self-metrics' files, so ``/metrics`` on any worker
  reports the sum over all of them and counters never jump between scrapes.

Both live in a temporary directory that exists while the server runs. POSIX only (the
bucket table is locked with ``flock``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..config import Settings
from ..export.prometheus import MULTIPROCESS_ENV
from ..ratelimit import FileBuckets

__all__ = ["serve_workers", "settings_environment"]

_APP_FACTORY = "gradwatch.server.app:create_app"
_ENV_PREFIX = "GRADWATCH_"


def settings_environment(settings: Settings) -> dict[str, str | None]:
    """Each setting as its ``GRADWATCH_*`` variable (None: leave it unset). Pure."""
    out: dict[str, str | None] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        key = _ENV_PREFIX + name.upper()
        if value is None:
            out[key] = None
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def serve_workers(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve with ``workers`` processes until interrupted; blocks.

    Sets the environment of this process (which the workers inherit), then runs uvicorn's
    process manager; the shared directory is removed when it returns.
    """
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="gradwatch-workers-") as shared:
        metrics_dir = Path(shared) / "metrics"
        metrics_dir.mkdir()
        limits = FileBuckets.create(Path(shared) / "rate-limits")
        shared_settings = settings.model_copy(update={"rate_limit_file": str(limits)})
        for key, value in settings_environment(shared_settings).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ[MULTIPROCESS_ENV] = str(metrics_dir)
        uvicorn.run(_APP_FACTORY, factory=True, host=host, port=port, workers=workers)
