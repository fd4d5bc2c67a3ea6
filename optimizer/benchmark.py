"""Latency and throughput measurement, PyTorch and ONNX Runtime alike.

Every figure comes from a warm-up followed by a stability window (at least ``min_runs`` calls
and ``min_seconds``), never from one run. Batch sizes double from 1 until throughput stops
improving by ``min_gain``.

Time is bounded twice, so that a slow baseline (PyTorch eager at batch 32 on two cores) cannot
take most of an optimization: one point stops after ``max_seconds`` once it has ``floor_runs``
calls, and a sweep stops doubling at its ``deadline`` (the pipeline shares its benchmark budget
among the runtimes); batch 1 is always measured.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from optimizer.request import BenchOptions  # declared with the request it belongs to

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Per-call latency percentiles in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int


@dataclass(frozen=True)
class BatchPoint:
    batch: int
    latency: Latency
    throughput: float  # items per second


@dataclass(frozen=True)
class Profile:
    """A runtime's figures: one point per batch size, and its peak memory growth."""

    points: tuple[BatchPoint, ...]
    peak_memory_mb: float | None  # growth of peak RSS while loading and running; Linux only

    @property
    def batch1(self) -> Latency:
        return self.points[0].latency

    @property
    def best(self) -> BatchPoint:
        return max(self.points, key=lambda p: p.throughput)


def time_calls(
    call: Callable[[], object], warmup: int = 10, min_runs: int = 50, min_seconds: float = 1.0,
    max_seconds: float = float("inf"), floor_runs: int = 10,
) -> Latency:
    """Run ``call`` until both ``min_runs`` and ``min_seconds`` are reached, after a warm-up;
    or, for slow calls, until ``max_seconds`` once ``floor_runs`` calls are in."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_seconds:
        if len(samples) >= floor_runs and time.perf_counter() - start >= max_seconds:
            break
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000.0)
    arr = np.asarray(samples)
    return Latency(
        p50_ms=float(np.percentile(arr, 50)), p95_ms=float(np.percentile(arr, 95)),
        p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()), runs=len(samples),
    )


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak-RSS growth over a block: resets the kernel's high-water mark, then reads it."""

    def __enter__(self) -> PeakMemory:
        self.mb: float | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (Linux >= 4.0)
            self._reset = True
        except OSError:  # without a reset the high-water mark would be someone else's: no figure
            self._reset = False
        self._before = _rss_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _rss_kib("VmHWM")
        if self._reset and peak is not None and self._before is not None:
            self.mb = max(0.0, (peak - self._before) / 1024.0)


def sweep(make_call: Callable[[int], Callable[[], object]], opts: BenchOptions,
          deadline: float | None = None) -> list[BatchPoint]:
    """Latency and throughput at batch 1, 2, 4, ... until gains stop, ``max_batch``, or the
    ``deadline`` (time.monotonic()) has passed."""
    points: list[BatchPoint] = []
    batch = 1
    while batch <= opts.max_batch:
        lat = time_calls(make_call(batch), opts.warmup, opts.min_runs, opts.min_seconds,
                         opts.max_seconds, opts.floor_runs)
        point = BatchPoint(batch=batch, latency=lat, throughput=batch * 1000.0 / lat.mean_ms)
        best = max((p.throughput for p in points), default=0.0)
        points.append(point)
        if points[:-1] and point.throughput < best * (1.0 + opts.min_gain):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        batch *= 2
    return points


def profile_onnx(path: Path, sample: np.ndarray, threads: int, opts: BenchOptions,
                 deadline: float | None = None) -> Profile:
    with PeakMemory() as mem:
        session = onnx_session(path, threads)
        name, dtype = session.get_inputs()[0].name, input_dtype(session)

        def make(batch: int) -> Callable[[], object]:
            x = np.ascontiguousarray(np.repeat(sample[:1], batch, axis=0).astype(dtype))
            return lambda: session.run(None, {name: x})

        points = sweep(make, opts, deadline)
    return Profile(points=tuple(points), peak_memory_mb=mem.mb)


def profile_torch(model: nn.Module, sample: np.ndarray, threads: int,
                  opts: BenchOptions, deadline: float | None = None) -> Profile:
    torch.set_num_threads(threads)
    with PeakMemory() as mem, torch.inference_mode():

        def make(batch: int) -> Callable[[], object]:
            x = torch.from_numpy(np.repeat(sample[:1], batch, axis=0))
            return lambda: model(x)

        points = sweep(make, opts, deadline)
    return Profile(points=tuple(points), peak_memory_mb=mem.mb)


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so runtimes are compared on equal cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def input_dtype(session: ort.InferenceSession) -> type[np.floating]:
    """float16 for variants converted with FP16 I/O, else float32."""
    return np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32


def run_onnx(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    name, dtype = session.get_inputs()[0].name, input_dtype(session)
    parts = [session.run(None, {name: inputs[i : i + batch].astype(dtype)})[0]
             for i in range(0, len(inputs), batch)]
    return np.concatenate(parts).astype(np.float32)


def run_torch(model: nn.Module, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        parts = [model(torch.from_numpy(inputs[i : i + batch])).numpy()
                 for i in range(0, len(inputs), batch)]
    return np.concatenate(parts).astype(np.float32)


class Budget:
    """Shares one benchmark time budget among ``parts`` runtimes in order: part k's sweep must
    end by start + budget * (k + 1) / parts, so time a fast runtime leaves is passed on, and a
    slow one (PyTorch eager) cannot take everyone else's. Logs progress with an estimate."""

    def __init__(self, budget_s: float | None, parts: int) -> None:
        self._budget = budget_s if budget_s is not None and math.isfinite(budget_s) else None
        self._parts = max(1, parts)
        self._start = time.monotonic()

    def deadline(self, part: int, name: str) -> float | None:
        elapsed = time.monotonic() - self._start
        if part > 0:
            estimate = elapsed / part * (self._parts - part)
            if self._budget is not None:
                estimate = min(estimate, max(0.0, self._budget - elapsed))
            LOG.info("benchmark %d/%d: %s (%.0f s so far, about %.0f s left)", part + 1,
                     self._parts, name, elapsed, estimate)
        else:
            LOG.info("benchmark 1/%d: %s (budget %s)", self._parts, name,
                     "none" if self._budget is None else f"{self._budget:.0f} s")
        if self._budget is None:
            return None
        return self._start + self._budget * (part + 1) / self._parts
