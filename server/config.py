"""Server settings, read from ``GRADWATCH_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]

_MIB = 1024 * 1024


class Settings(BaseSettings):
    """Configuration of one gradwatch server.

    Each field can be set by the environment variable ``GRADWATCH_<FIELD>`` (for example
    ``GRADWATCH_DATABASE_URL``); explicit constructor arguments win. Instances are immutable
    and safe to share between threads. Construction reads the environment and does not block.

    Attributes:
        database_url: SQLAlchemy URL. ``sqlite:///./gradwatch.db`` (the default) is a file in the
            working directory; ``postgresql+psycopg://user:pass@host/db`` uses PostgreSQL.
        max_body_bytes: Largest accepted request body in bytes, applied both to the bytes on
            the wire and to the body after gzip decoding.
        max_steps_per_batch: Most steps one ``StepBatch`` may carry.
        max_layers: Most layers one ``StepBatch`` may name.
        require_auth: Refuse requests without a valid token even while no token exists.
            ``gradwatch server`` sets it when bound to a non-loopback address without
            ``--insecure``. Otherwise the server is open (no token needed) until the first
            token is created, and requires one from then on.
        rate_limit_per_second: Sustained requests per second allowed to one token; 0 turns
            the limit off. Requests over it get 429 with ``Retry-After``.
        rate_limit_burst: Requests one token may send at once before the rate applies.
        auth_failure_rate_per_second: Failed authentications (a token sent that is unknown,
            malformed or revoked) allowed per second to one client address; 0 turns the
            limit off. An address over it gets 429 with ``Retry-After`` before its token is
            even checked. Requests without a token do not count.
        auth_failure_burst: Failed authentications one address may make at once.
        rate_limit_file: File holding the rate-limit buckets shared by the worker processes
            of one server, so both limits hold for the server as a whole. ``gradwatch server
            --workers N`` (N > 1) creates it and sets it for its workers; None (the default)
            keeps the buckets in the process.
        metrics_cache_seconds: How long a ``/metrics`` answer is reused, in seconds, so several
            scrapers (or a scrape storm) cost one set of queries; 0 turns the cache off.
        metrics_top_k_layers: Layers exported per run as ``gradwatch_layer_grad_norm`` (those
            with the largest latest norm; NaN first); 0 exports none.
        finished_run_grace_seconds: How long a finished or failed run stays exported after its
            status changed, in seconds; afterwards its series go stale in Prometheus.
        inactive_run_seconds: A running run that has stored nothing for this long, in seconds,
            stops being exported (an abandoned run; ``GradwatchRunSilent`` fires well before).
        norm_window_seconds: Window of ``gradwatch_global_grad_norm_window_max`` in seconds
            (ingest time): the largest global norm of the current and previous window, so a
            spike stays visible for at least this long whatever the scrape interval.
        retention_days: When set, the server deletes every finished or failed run last
            active more than this many days ago (its samples, events and the run itself), in
            the background, like ``gradwatch db prune --older-than``; None (the default)
            keeps every run.
        retention_interval_seconds: Seconds between two background prunes (the first runs
            when the server starts).
    """

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", frozen=True, extra="ignore")

    database_url: str = "sqlite:///./gradwatch.db"
    max_body_bytes: int = Field(default=32 * _MIB, gt=0)
    max_steps_per_batch: int = Field(default=100_000, gt=0)
    max_layers: int = Field(default=10_000, gt=0)
    require_auth: bool = False
    rate_limit_per_second: float = Field(default=20.0, ge=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    auth_failure_rate_per_second: float = Field(default=1.0, ge=0)
    auth_failure_burst: int = Field(default=20, ge=1)
    rate_limit_file: str | None = None
    metrics_cache_seconds: float = Field(default=1.0, ge=0)
    metrics_top_k_layers: int = Field(default=10, ge=0)
    finished_run_grace_seconds: float = Field(default=600.0, ge=0)
    inactive_run_seconds: float = Field(default=86_400.0, gt=0)
    norm_window_seconds: float = Field(default=60.0, gt=0)
    retention_days: float | None = Field(default=None, gt=0)
    retention_interval_seconds: float = Field(default=3600.0, gt=0)
