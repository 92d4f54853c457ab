"""Rate-limit buckets shared through a file, as ``gradwatch server --workers N`` uses them."""

from __future__ import annotations

import pytest

from gradwatch.server.errors import RateLimitedError
from gradwatch.server.ratelimit import FileBuckets, MemoryBuckets, RateLimiter


def test_ratelimit_file_buckets_are_one_budget_for_every_opener(tmp_path):
    path = FileBuckets.create(tmp_path / "buckets")
    now = [50.0]
    first, second = FileBuckets(path), FileBuckets(path)  # as two worker processes open it
    try:
        a = RateLimiter(1.0, 3, lambda: now[0], buckets=first, namespace="token:")
        b = RateLimiter(1.0, 3, lambda: now[0], buckets=second, namespace="token:")
        other = RateLimiter(1.0, 3, lambda: now[0], buckets=second, namespace="address:")
        a.acquire("k")
        b.acquire("k")
        a.acquire("k")
        with pytest.raises(RateLimitedError) as raised:
            b.acquire("k")
        other.acquire("k")  # another namespace is another bucket
        now[0] += 1.0  # one request's worth
        b.acquire("k")
        with pytest.raises(RateLimitedError):
            a.check("k")
    finally:
        first.close()
        second.close()
    assert raised.value.retry_after_seconds == 1


def test_ratelimit_check_never_takes():
    limiter = RateLimiter(1.0, 1, lambda: 0.0, buckets=MemoryBuckets())
    for _ in range(5):
        limiter.check("k")
    limiter.acquire("k")
    with pytest.raises(RateLimitedError):
        limiter.check("k")


def test_ratelimit_file_buckets_survive_a_flood_of_keys(tmp_path):
    buckets = FileBuckets(FileBuckets.create(tmp_path / "buckets"))
    try:
        limiter = RateLimiter(0.001, 2, lambda: 7.0, buckets=buckets)
        for index in range(40_000):  # more keys than slots: the table stays usable
            limiter.check(f"flood-{index}")
            buckets.take(f"flood-{index}", 0.001, 2.0, 7.0, consume=True)
        limiter.acquire("k")
        limiter.acquire("k")
        with pytest.raises(RateLimitedError):
            limiter.acquire("k")
    finally:
        buckets.close()
