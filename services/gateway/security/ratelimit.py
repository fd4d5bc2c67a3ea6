"""Per-principal token buckets and a cap on concurrent work.

A bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; each request takes one.
An empty bucket answers how long until the next token, which the edges send back as
``Retry-After`` (HTTP 429) or in the RESOURCE_EXHAUSTED message (gRPC). In a pod of several
gateway processes the buckets are the pod's (``podstate.PodState``), so a key's rate is the same
however its requests spread over the processes. The concurrency cap stays per process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.gateway.security.podstate import PodState, refill

# Buckets of principals not seen for this long are dropped (bounded memory).
IDLE_DROP_S = 600.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per principal name; ``rate_per_s`` 0 turns limiting off."""

    def __init__(self, rate_per_s: float, burst: float,
                 clock: Callable[[], float] = time.monotonic,
                 shared: PodState | None = None) -> None:
        """``shared``: the pod's buckets (several gateway processes); None keeps them here."""
        if rate_per_s < 0 or (rate_per_s > 0 and burst < 1):
            raise ValueError("rate_per_s must be >= 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._shared = shared
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, who: str, rate_per_s: float | None = None,
             burst: float | None = None) -> float:
        """Takes a token for ``who``: 0.0 when allowed, else the seconds until one is due.
        ``rate_per_s``/``burst`` override the defaults for this principal (keys file)."""
        rate = self.rate_per_s if rate_per_s is None else rate_per_s
        cap = self.burst if burst is None else max(burst, 1.0)
        if rate <= 0:
            return 0.0
        if self._shared is not None:
            return self._shared.take(who, rate, cap)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(who)
            if bucket is None:
                bucket = self._buckets[who] = _Bucket(cap, now)
                self._drop_idle(now)
            bucket.tokens, wait = refill(bucket.tokens, bucket.stamp, now, rate, cap)
            bucket.stamp = now
            return wait

    def _drop_idle(self, now: float) -> None:
        idle = [k for k, b in self._buckets.items() if now - b.stamp > IDLE_DROP_S]
        for k in idle:
            del self._buckets[k]


class ConcurrencyCap:
    """At most ``limit`` pieces of work at once; ``limit`` 0 means no cap. Never blocks:
    over the cap the caller is refused at once (and told to retry) rather than queued."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit) if limit else None
        self._lock = threading.Lock()
        self.active = 0

    def try_enter(self) -> bool:
        if self._sem is not None and not self._sem.acquire(blocking=False):
            return False
        with self._lock:
            self.active += 1
        return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
        if self._sem is not None:
            self._sem.release()
