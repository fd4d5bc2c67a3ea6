"""The benchmark's time bounds: per point, per sweep (a deadline), and the shared budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from optimizer.benchmark import BenchOptions, Budget, sweep, time_calls
from optimizer.pipeline import OptimizeRequest, optimize
from tests.optimizer.quick_bench import QUICK_BENCH


def test_a_slow_call_stops_at_max_seconds_once_it_has_its_floor() -> None:
    start = time.perf_counter()
    lat = time_calls(lambda: time.sleep(0.01), warmup=0, min_runs=1000, min_seconds=0.0,
                     max_seconds=0.05, floor_runs=3)
    assert 3 <= lat.runs < 20 and time.perf_counter() - start < 1.0
    # without the bound, min_runs holds
    assert time_calls(lambda: None, warmup=0, min_runs=200, min_seconds=0.0).runs == 200


def test_sweep_stops_doubling_at_its_deadline() -> None:
    opts = BenchOptions(warmup=0, min_runs=2, min_seconds=0.0, max_batch=32, min_gain=-1.0)
    made: list[int] = []

    def make(batch: int) -> object:
        made.append(batch)
        return lambda: None

    assert [p.batch for p in sweep(make, opts, deadline=time.monotonic() - 1)] == [1]
    made.clear()
    # min_gain -1: never "no gain", so without a deadline it goes to max_batch
    assert [p.batch for p in sweep(make, opts)] == [1, 2, 4, 8, 16, 32]


def test_budget_shares_time_in_order() -> None:
    budget = Budget(100.0, parts=4)
    first, last = budget.deadline(0, "eager"), budget.deadline(3, "last")
    assert first is not None and last is not None
    assert last - first == pytest.approx(75.0, abs=0.5)
    assert Budget(None, 3).deadline(1, "x") is None
    assert Budget(float("inf"), 3).deadline(1, "x") is None  # --bench-budget inf
    with pytest.raises(ValueError):
        BenchOptions(max_seconds=0.5, min_seconds=1.0)


def test_optimize_within_a_spent_budget_measures_batch_1_only(
        tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path, threads=1, precisions=("fp32",),
        bench=QUICK_BENCH, bench_budget_s=1e-3))
    report = result.report
    assert [b["batch"] for b in report["baseline"]["batches"]] == [1]
    assert all([b["batch"] for b in v["batches"]] == [1] for v in report["variants"])
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["benchmark_pytorch"]["status"] == "ok"
    assert steps["benchmark_onnx-fp32"]["seconds"] >= 0
    # the report lists every step before itself, with the durations steps.json holds
    on_disk = json.loads((tmp_path / "steps.json").read_text())
    assert [s["step"] for s in on_disk][-1] == "write_report"
    assert report["steps"] == [{"name": s["step"], "status": s["status"],
                                "seconds": s["seconds"]} for s in on_disk[:-1]]
    assert "--bench-budget 0.001" in (tmp_path / "reproduce.sh").read_text()
