"""Latency measurement with warm-up and a stability window, PyTorch and ONNX Runtime alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


@dataclass(frozen=True)
class Latency:
    """Per-call latency percentiles in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int


def time_calls(
    call: Callable[[], object], warmup: int = 10, min_runs: int = 50, min_seconds: float = 1.0
) -> Latency:
    """Run ``call`` until both ``min_runs`` and ``min_seconds`` are reached, after a warm-up."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000.0)
    arr = np.asarray(samples)
    return Latency(
        p50_ms=float(np.percentile(arr, 50)), p95_ms=float(np.percentile(arr, 95)),
        p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()), runs=len(samples),
    )


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so runtimes are compared on equal cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: inputs[i : i + batch]})[0]
             for i in range(0, len(inputs), batch)]
    return np.concatenate(parts).astype(np.float32)


def run_torch(model: nn.Module, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        parts = [model(torch.from_numpy(inputs[i : i + batch])).numpy()
                 for i in range(0, len(inputs), batch)]
    return np.concatenate(parts).astype(np.float32)


def bench_torch(model: nn.Module, sample: np.ndarray, threads: int) -> Latency:
    torch.set_num_threads(threads)
    x = torch.from_numpy(sample)
    with torch.inference_mode():
        return time_calls(lambda: model(x))


def bench_onnx(session: ort.InferenceSession, sample: np.ndarray) -> Latency:
    name = session.get_inputs()[0].name
    return time_calls(lambda: session.run(None, {name: sample}))
