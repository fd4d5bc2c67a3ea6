"""Latency and throughput measurement, PyTorch and ONNX Runtime alike.

Every figure comes from a warm-up followed by a stability window (at least ``min_runs`` calls
and ``min_seconds``), never from one run. Batch sizes double from 1 until throughput stops
improving by ``min_gain``.

Runtimes are compared in one window (``measure``): the baseline and every variant are timed
in alternating slices (``alternate``, shared with loadtests.bench), so that other work on the
machine, which comes and goes, weighs on every side alike. Each figure keeps its spread (how far
its slices' medians lie apart) and the window its load average; a comparison whose spread,
tail or load says the machine was not quiet is re-measured, then marked unstable. Denormals are
flushed to zero in every runtime while timing (``flush_denormals``), so that a random-weight
model's subnormal arithmetic does not slow PyTorch alone.

Time is bounded twice, so that a slow baseline (PyTorch eager at batch 32 on two cores) cannot
take most of an optimization: one point stops after ``max_seconds`` once it has ``floor_runs``
calls, and a sweep stops doubling at its ``deadline`` (the pipeline shares its benchmark budget
among the runtimes); batch 1 is always measured.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from optimizer.request import BenchOptions  # declared with the request it belongs to

LOG = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Latency:
    """Per-call latency percentiles in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Latency:
        arr = np.asarray(samples_ms, dtype=np.float64)
        return cls(p50_ms=float(np.percentile(arr, 50)), p95_ms=float(np.percentile(arr, 95)),
                   p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()),
                   runs=len(arr))


@dataclass(frozen=True)
class BatchPoint:
    batch: int
    latency: Latency
    throughput: float  # items per second
    # (max - min) / median of the p50s of the alternating slices; None: measured in one go
    spread: float | None = None


@dataclass(frozen=True)
class Profile:
    """A runtime's figures: one point per batch size, and its peak memory growth."""

    points: tuple[BatchPoint, ...]
    peak_memory_mb: float | None  # growth of peak RSS while loading and running; Linux only
    unstable: tuple[str, ...] = ()  # why its batch-1 figure cannot be trusted; () when it can

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
    return Latency.of(_samples(call, warmup, min_runs, min_seconds, max_seconds, floor_runs))


def _samples(call: Callable[[], object], warmup: int, min_runs: int, min_seconds: float,
             max_seconds: float, floor_runs: int) -> list[float]:
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
    return samples


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


def onnx_session(path: Path, threads: int,
                 flush_denormals: bool = False) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so runtimes are compared on equal cores;
    ``flush_denormals`` for timing beside a PyTorch that flushes them (``measure``)."""
    opts = ort.SessionOptions()
    if flush_denormals:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
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


def alternate(sides: Sequence[Callable[[], T]], rounds: int) -> list[list[T]]:
    """Each side's slice in turn, ``rounds`` times, so that other work on the machine, which
    comes and goes, weighs on every side alike; per side, its slices in order."""
    out: list[list[T]] = [[] for _ in sides]
    for _ in range(rounds):
        for slices, side in zip(out, sides, strict=True):
            slices.append(side())
    return out


@contextmanager
def flush_denormals() -> Iterator[str]:
    """Subnormal floats flushed to zero in PyTorch (this thread's FTZ/DAZ, which ONNX Runtime
    also runs under on its calling thread; its own threads get ``session.set_denormal_as_zero``
    from ``onnx_session``) while the block runs; yields what the report says about it."""
    if torch.set_flush_denormal(True):
        try:
            yield ("flushed to zero in every runtime while timing (PyTorch "
                   "torch.set_flush_denormal, ONNX Runtime session.set_denormal_as_zero, "
                   "OpenVINO CPU_DENORMALS_OPTIMIZATION)")
        finally:
            torch.set_flush_denormal(False)
    else:  # the CPU lacks SSE3 (FTZ/DAZ): nothing to flush with, on any side
        yield "not flushed: this CPU cannot flush denormals (no SSE3), in any runtime"


@dataclass(frozen=True)
class Contender:
    """One runtime in a comparison: ``open()`` loads it (session, compiled model) and returns
    ``make(batch)``, which gives the call to time at that batch size."""

    name: str
    open: Callable[[], Callable[[int], Callable[[], object]]]


@dataclass(frozen=True)
class Window:
    """A comparison measured in one window: every runtime's profile and how quiet it was."""

    profiles: dict[str, Profile]
    load_average: tuple[float, float]  # 1-minute load average at its start and end
    cpus: int
    rounds: int
    attempts: int  # batch-1 windows measured (1 + re-measurements)
    denormals: str
    unstable: tuple[str, ...] = field(default=())  # reasons that hold for every runtime
    seconds: dict[str, float] = field(default_factory=dict)  # time spent on each runtime
    failed: dict[str, str] = field(default_factory=dict)  # runtimes that would not load: why

    def as_dict(self) -> dict[str, Any]:
        return {"method": f"alternating slices, {self.rounds} per runtime and batch size",
                "load_average": list(self.load_average), "cpus": self.cpus,
                "attempts": self.attempts, "denormals": self.denormals,
                "unstable": list(self.unstable)}


def _spread(slices: Sequence[Sequence[float]]) -> float:
    p50s = [float(np.percentile(s, 50)) for s in slices if len(s)]
    mid = float(np.median(p50s))
    return (max(p50s) - min(p50s)) / mid if mid > 0 and len(p50s) > 1 else 0.0


def _point(batch: int, slices: Sequence[Sequence[float]]) -> BatchPoint:
    lat = Latency.of([x for s in slices for x in s])
    return BatchPoint(batch=batch, latency=lat, throughput=batch * 1000.0 / lat.mean_ms,
                      spread=_spread(slices))


def instability(point: BatchPoint, opts: BenchOptions) -> tuple[str, ...]:
    """Why one figure cannot be trusted: its slices disagree, or its tail is far out."""
    why = []
    if point.spread is not None and point.spread > opts.max_spread:
        why.append(f"slice medians {point.spread:.0%} apart (> {opts.max_spread:.0%})")
    if point.latency.p95_ms > opts.max_tail * point.latency.p50_ms:
        why.append(f"p95 {point.latency.p95_ms:.3g} ms > {opts.max_tail:g} x p50 "
                   f"{point.latency.p50_ms:.3g} ms")
    return tuple(why)


def load_instability(load: tuple[float, float], cpus: int, opts: BenchOptions) -> tuple[str, ...]:
    """Other work on the machine: a load average above the CPUs it had."""
    worst = max(load)
    if worst > opts.max_load_per_cpu * cpus:
        return (f"load average {worst:.2f} on {cpus} CPUs: other work competed",)
    return ()


def measure(contenders: Sequence[Contender], opts: BenchOptions,
            deadline: float | None = None) -> Window:
    """Every contender at batch 1, 2, 4, ... in alternating slices (``opts.rounds`` each),
    a runtime leaving the sweep when its throughput stops improving by ``min_gain``; all stop
    doubling at ``deadline`` (batch 1 is always measured). A batch-1 figure that is unstable
    (``instability``) has the whole batch-1 window measured again, up to ``opts.remeasure``
    times; what is still unstable is marked so in its profile."""
    rounds = opts.rounds
    cpus = os.cpu_count() or 1
    with flush_denormals() as denormals:
        makers: dict[str, Callable[[int], Callable[[], object]]] = {}
        memory: dict[str, float | None] = {}
        seconds: dict[str, float] = {}
        failed: dict[str, str] = {}
        for c in contenders:
            start = time.perf_counter()
            try:
                with PeakMemory() as mem:
                    makers[c.name] = c.open()
            except Exception as exc:  # runtimes raise their own types; the others go on
                failed[c.name] = f"{type(exc).__name__}: {exc}"
                LOG.warning("benchmark: %s does not load: %s", c.name, exc)
                continue
            finally:
                seconds[c.name] = time.perf_counter() - start
            memory[c.name] = mem.mb
        load_start = os.getloadavg()[0]
        names = [c.name for c in contenders if c.name in makers]
        points: dict[str, list[BatchPoint]] = {n: [] for n in names}
        active = list(names)
        batch = 1

        def timed(name: str, call: Callable[[], object]) -> Callable[[], list[float]]:
            def side() -> list[float]:
                start = time.perf_counter()
                try:
                    return _samples(call, 0, -(-opts.min_runs // rounds),
                                    opts.min_seconds / rounds, opts.max_seconds / rounds,
                                    -(-opts.floor_runs // rounds))
                finally:
                    seconds[name] += time.perf_counter() - start
            return side

        def window(names: list[str], batch: int) -> dict[str, BatchPoint]:
            calls = {}
            for name in names:
                start = time.perf_counter()
                call = makers[name](batch)
                with PeakMemory() as mem:  # what this batch adds on top of the loaded runtime
                    for _ in range(opts.warmup):
                        call()
                loaded = memory[name]
                if mem.mb is not None and loaded is not None:
                    memory[name] = max(loaded, mem.mb)
                calls[name] = call
                seconds[name] += time.perf_counter() - start
            LOG.info("benchmark batch %d: %s, %d alternating slices each", batch,
                     ", ".join(names), rounds)
            slices = alternate([timed(n, calls[n]) for n in names], rounds)
            return {n: _point(batch, s) for n, s in zip(names, slices, strict=True)}

        while active and batch <= opts.max_batch:
            measured = window(active, batch)
            for name, point in measured.items():
                best = max((p.throughput for p in points[name]), default=0.0)
                points[name].append(point)
                if points[name][:-1] and point.throughput < best * (1.0 + opts.min_gain):
                    active.remove(name)
            if deadline is not None and time.monotonic() >= deadline:
                break
            batch *= 2
        attempts = 1
        while attempts <= opts.remeasure and any(instability(points[n][0], opts)
                                                 for n in names):
            LOG.info("batch-1 figures unstable (%s): measuring the window again", "; ".join(
                f"{n}: {', '.join(instability(points[n][0], opts))}" for n in names
                if instability(points[n][0], opts)))
            again = window(names, 1)
            for n in names:
                points[n][0] = again[n]
            attempts += 1
    load = (round(load_start, 2), round(os.getloadavg()[0], 2))
    shared = load_instability(load, cpus, opts)
    profiles = {n: Profile(points=tuple(points[n]), peak_memory_mb=memory[n],
                           unstable=shared + instability(points[n][0], opts)) for n in names}
    return Window(profiles=profiles, load_average=load, cpus=cpus, rounds=rounds,
                  attempts=attempts, denormals=denormals, unstable=shared,
                  seconds={n: round(t, 3) for n, t in seconds.items()}, failed=failed)


def torch_contender(name: str, model: nn.Module, sample: np.ndarray,
                    threads: int) -> Contender:
    def open_() -> Callable[[int], Callable[[], object]]:
        torch.set_num_threads(threads)

        def make(batch: int) -> Callable[[], object]:
            x = torch.from_numpy(np.repeat(sample[:1], batch, axis=0))

            def call() -> object:
                with torch.inference_mode():
                    return model(x)
            return call
        return make
    return Contender(name, open_)


def onnx_contender(name: str, path: Path, sample: np.ndarray, threads: int) -> Contender:
    def open_() -> Callable[[int], Callable[[], object]]:
        session = onnx_session(path, threads, flush_denormals=True)
        input_name, dtype = session.get_inputs()[0].name, input_dtype(session)

        def make(batch: int) -> Callable[[], object]:
            x = np.ascontiguousarray(np.repeat(sample[:1], batch, axis=0).astype(dtype))
            return lambda: session.run(None, {input_name: x})
        return make
    return Contender(name, open_)

