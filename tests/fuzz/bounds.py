"""Resource bounds for fuzz targets: an input must end in a result or a declared error within
a memory budget (traced Python and numpy allocations) - a hang is caught by the deadline."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class MemoryBoundExceeded(AssertionError):
    pass


def within_memory(limit_bytes: int, fn: Callable[[], T]) -> T:
    """``fn()``, failing if its traced allocations peaked above ``limit_bytes`` (whether it
    returned or raised)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        return fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak > limit_bytes:
            raise MemoryBoundExceeded(f"peak traced memory {peak} bytes > {limit_bytes}")
