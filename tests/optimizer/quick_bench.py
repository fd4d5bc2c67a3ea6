"""Benchmark options for tests: they check the mechanics, not the figures (a few runs per
point). Imports the optimizer's benchmark module, hence torch and ONNX Runtime."""

from __future__ import annotations

from optimizer.benchmark import BenchOptions

QUICK_BENCH = BenchOptions(warmup=2, min_runs=5, min_seconds=0.02, max_batch=4)
