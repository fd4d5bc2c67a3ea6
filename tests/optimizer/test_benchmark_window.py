"""Issue 15 (1) and (8): the baseline and every variant timed in one window, in alternating
slices, each figure with its spread, the window with its load average; unstable comparisons
re-measured, then marked and not selected on; denormals flushed in every runtime; the report's
throughput table with every runtime's batch sizes and the baseline named for what it is."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from optimizer import benchmark
from optimizer.benchmark import (
    BatchPoint,
    BenchOptions,
    Contender,
    Latency,
    Profile,
    alternate,
    measure,
)
from optimizer.errors import SelectionError
from optimizer.pipeline import OptimizeRequest, optimize, select
from optimizer.report import VariantResult, build_report, render_markdown
from optimizer.verify import Verification
from tests.conftest import TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH

# one batch size, a few runs per slice: the mechanics, not the figures
ONE_BATCH = BenchOptions(warmup=1, min_runs=6, min_seconds=0.0, max_batch=1, rounds=3,
                         max_load_per_cpu=float("inf"))


class _Clock:
    """A clock the fake runtimes move: timings exact, whatever else the machine does."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(benchmark.time, "perf_counter", fake.perf_counter)
    monkeypatch.setattr(benchmark.time, "monotonic", fake.monotonic)
    return fake


def _sleeper(name: str, log: list[str], delay: Callable[[], float],
             clock: _Clock | None = None) -> Contender:
    """A fake runtime whose call takes ``delay()`` seconds (on ``clock``, else really)."""
    def open_() -> Callable[[int], Callable[[], object]]:
        def make(batch: int) -> Callable[[], object]:
            def call() -> None:
                log.append(name)
                if clock is None:
                    time.sleep(delay())
                else:
                    clock.t += delay()
            return call
        return make
    return Contender(name, open_)


def test_alternate_takes_turns() -> None:
    order: list[str] = []
    sides = [lambda tag=tag: order.append(tag) or tag for tag in "abc"]  # type: ignore[func-returns-value]
    assert alternate(sides, 2) == [["a", "a"], ["b", "b"], ["c", "c"]]
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_runtimes_are_timed_in_alternating_slices_of_one_window_faked_clock(
        clock: _Clock) -> None:
    # on the fake clock: real sleeps on a loaded machine made slices disagree, and the
    # re-measurement that follows (a tested behaviour of its own) changed the call pattern
    calls: list[str] = []
    window = measure([_sleeper("base", calls, lambda: 0.002, clock),
                      _sleeper("variant", calls, lambda: 0.001, clock)], ONE_BATCH)
    # warm-ups (1 each), then 3 slices of 2 timed runs each, taking turns
    timed = calls[2:]
    switches = sum(1 for x, y in itertools.pairwise(timed) if x != y)
    assert timed[:2] == ["base", "base"] and switches == 2 * 3 - 1
    assert set(window.profiles) == {"base", "variant"}
    for prof in window.profiles.values():
        assert prof.points[0].spread is not None and prof.points[0].latency.runs == 6
    assert window.profiles["base"].batch1.p50_ms > window.profiles["variant"].batch1.p50_ms
    assert window.rounds == 3 and window.cpus >= 1 and len(window.load_average) == 2
    assert window.seconds["base"] > 0 and not window.failed


def test_a_disturbed_slice_is_measured_again_faked_clock(clock: _Clock) -> None:
    """Another job slows the variant during one slice of the first window only: the figure is
    re-measured, and the second window stands."""
    calls: list[str] = []
    n = {"variant": 0}

    def disturbed() -> float:
        n["variant"] += 1
        return 0.02 if 2 <= n["variant"] <= 3 else 0.002  # its first timed slice (after 1 warm-up)

    opts = BenchOptions(warmup=1, min_runs=6, min_seconds=0.0, max_batch=1, rounds=3,
                        max_load_per_cpu=float("inf"), remeasure=1)
    window = measure([_sleeper("base", calls, lambda: 0.002, clock),
                      _sleeper("variant", calls, disturbed, clock)], opts)
    assert window.attempts == 2
    assert window.profiles["variant"].unstable == ()
    assert window.profiles["variant"].batch1.p50_ms == pytest.approx(2.0)


def test_a_figure_still_unstable_is_marked_with_its_spread_faked_clock(clock: _Clock) -> None:
    calls: list[str] = []
    n = {"variant": 0}

    def disturbed() -> float:
        n["variant"] += 1
        return 0.02 if 2 <= n["variant"] <= 3 else 0.002

    opts = BenchOptions(warmup=1, min_runs=6, min_seconds=0.0, max_batch=1, rounds=3,
                        max_load_per_cpu=float("inf"), remeasure=0)
    window = measure([_sleeper("base", calls, lambda: 0.002, clock),
                      _sleeper("variant", calls, disturbed, clock)], opts)
    why = window.profiles["variant"].unstable
    assert why[0] == "slice medians 900% apart (> 25%)" and window.attempts == 1
    assert window.profiles["base"].unstable == ()


def test_a_loaded_machine_marks_every_figure_unstable_faked_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(benchmark.os, "cpu_count", lambda: 2)
    opts = BenchOptions(warmup=0, min_runs=3, min_seconds=0.0, max_batch=1)
    window = measure([_sleeper("a", [], lambda: 0.0), _sleeper("b", [], lambda: 0.0)], opts)
    assert window.load_average == (9.0, 9.0)
    assert window.unstable == ("load average 9.00 on 2 CPUs: other work competed",)
    assert all(p.unstable[:1] == window.unstable for p in window.profiles.values())


def test_a_runtime_that_does_not_load_is_left_out_with_why() -> None:
    def broken() -> Callable[[int], Callable[[], object]]:
        raise RuntimeError("no such kernel")
    window = measure([_sleeper("a", [], lambda: 0.0), Contender("b", broken)], ONE_BATCH)
    assert set(window.profiles) == {"a"} and "no such kernel" in window.failed["b"]


def test_denormals_are_flushed_in_pytorch_while_timing_and_only_then() -> None:
    tiny = torch.tensor([1e-39])
    seen: list[float] = []

    def open_() -> Callable[[int], Callable[[], object]]:
        return lambda batch: lambda: seen.append(float((tiny * 0.5).item()))

    window = measure([Contender("torch", open_)], ONE_BATCH)
    assert seen and all(v == 0.0 for v in seen)
    assert window.denormals.startswith("flushed to zero in every runtime")
    assert float((tiny * 0.5).item()) != 0.0  # restored afterwards


def test_openvino_flushes_denormals_when_timing(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from optimizer import ov_runtime
    from optimizer.ov_options import OvOptions

    half = helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "half"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "mul.onnx"))
    x = np.array([1e-39], np.float32)
    ir = ov_runtime.read(tmp_path / "mul.onnx")
    # run before the flushing one is compiled: OpenVINO's threads keep the FTZ state it sets
    plain = ov_runtime.compile_model(ir, "fp32", OvOptions(threads=1))
    assert ov_runtime.run(plain, x)[0] != 0.0
    flushed = ov_runtime.compile_model(ir, "fp32", OvOptions(threads=1), flush_denormals=True)
    assert flushed.get_property("CPU_DENORMALS_OPTIMIZATION") is True
    assert ov_runtime.run(flushed, x)[0] == 0.0


def _result(name: str, p50: float, passed: bool = True, unstable: tuple[str, ...] = (),
            batches: tuple[int, ...] = (1,)) -> VariantResult:
    points = tuple(BatchPoint(b, Latency(p50 * b, p50 * b, p50 * b, p50 * b, 10),
                              1000.0 / p50, spread=0.01) for b in batches)
    check = Verification("fp32", 0.0, 0.0, 1e-4, "auc", 0.9, 0.9, 0.0, 1.0, passed,
                         () if passed else ("x",), 1.0, 0.0, "relative: test")
    return VariantResult(name, "fp32", "ort", "f", 1, check, Profile(points, None, unstable),
                         1.0)


def test_unstable_figures_are_not_selected_on_while_stable_ones_exist() -> None:
    shaky = _result("shaky-fast", 1.0, unstable=("slice medians 80% apart (> 25%)",))
    steady = _result("steady", 2.0)
    for objective in ("latency", "throughput", "throughput-within-slo"):
        assert select([shaky, steady], objective, 100).name == "steady"
    # all unstable (a loaded machine weighs on all alike): chosen on them, the report says so
    also = _result("also-shaky", 2.0, unstable=("load",))
    assert select([shaky, also], "latency", 100).name == "shaky-fast"


def _report(variants: list[VariantResult], baseline: Profile, **kw: object) -> dict[str, object]:
    return build_report(
        manifest=TINY_MANIFEST, threads=1, objective="latency", target="cpu", inputs={},
        validation_size=4, baseline=baseline, variants=variants, selected=variants[0].name,
        repository="repository/x", version=1, not_built=[], **kw)  # type: ignore[arg-type]


def test_throughput_table_shows_every_runtimes_batch_sizes() -> None:
    base = _result("b", 10.0, batches=(1,)).profile
    wide = _result("onnx-int8", 1.0, batches=(1, 2, 4, 8, 16))
    md = render_markdown(_report([wide], base, baseline_name="pytorch-torchscript"))
    table = md[md.index("Throughput by batch size"):].splitlines()
    header = next(line for line in table if line.startswith("| runtime |"))
    assert header == "| runtime | b1 | b2 | b4 | b8 | b16 |"
    assert any(line.startswith("| onnx-int8 | 1000.0 | 1000.0 | 1000.0 | 1000.0 | 1000.0 |")
               for line in table)
    assert any(line.startswith("| pytorch-torchscript | 100.0 | - | - | - | - |")
               for line in table)
    assert "| pytorch-torchscript (baseline) |" in md


def test_report_says_how_figures_were_taken_and_which_are_unstable() -> None:
    shaky = _result("onnx-fp32", 1.0, unstable=("p95 9 ms > 3 x p50 1 ms",))
    window = {"method": "alternating slices, 3 per runtime and batch size",
              "load_average": [0.4, 0.5], "cpus": 2, "attempts": 2,
              "denormals": "flushed to zero in every runtime while timing (...)",
              "unstable": []}
    report = _report([shaky], _result("b", 2.0).profile, benchmark=window)
    md = render_markdown(report)
    assert "alternating slices" in md and "load average 0.4 at its start, 0.5 at its end" in md
    assert "Denormals: flushed to zero" in md
    assert "**Unstable figures**" in md and "onnx-fp32 (p95 9 ms > 3 x p50 1 ms)" in md
    assert "1.00x (unstable)" in md
    assert report["variants"][0]["unstable"] == ["p95 9 ms > 3 x p50 1 ms"]  # type: ignore[index]


def test_optimize_reports_its_window(optimized: Path) -> None:
    report = json.loads((optimized / "report.json").read_text())
    bench = report["benchmark"]
    assert bench["method"].startswith("alternating slices") and bench["attempts"] >= 1
    assert len(bench["load_average"]) == 2 and bench["cpus"] >= 1
    assert bench["denormals"].startswith("flushed to zero")
    for row in [report["baseline"], *report["variants"]]:
        assert row["batches"][0]["spread"] is not None and isinstance(row["unstable"], list)
    passing = [v for v in report["variants"] if v["verdict"] == "pass"]
    trusted = [v for v in passing if not v["unstable"]] or passing
    assert report["selected"] == min(trusted, key=lambda v: v["latency_ms"]["p50"])["name"]


class _Tiny(torch.nn.Module):
    """A few-kilobyte classifier for TINY_MANIFEST's 1x64x64 input (random weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_torchscript_baseline_is_named_for_what_it_is(tiny_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(_Tiny().eval())
    torch.jit.save(scripted, str(tmp_path / "model.ts.pt"))
    TINY_MANIFEST.save(tmp_path / "manifest.json")
    result = optimize(OptimizeRequest(
        checkpoint=tmp_path / "model.ts.pt", manifest=tmp_path / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path / "out", threads=1, precisions=("fp32",), bench=QUICK_BENCH))
    assert result.report["baseline"]["name"] == "pytorch-torchscript"
    assert "| pytorch-torchscript (baseline" in result.report_md.read_text()


def test_an_unstable_variant_within_the_slo_is_chosen_when_every_stable_one_misses_it() -> None:
    slow = _result("steady-slow", 300.0)  # stable, p95 300 ms
    shaky = _result("shaky-fast", 5.0, unstable=("slice medians 80% apart (> 25%)",))
    assert select([slow, shaky], "latency", 100).name == "shaky-fast"
    with pytest.raises(SelectionError, match="no passing variant"):
        select([slow], "latency", 100)
