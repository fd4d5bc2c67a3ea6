"""The harness's own arithmetic: closed-loop load counts what it did, and failures are counted
rather than hidden; the report says plainly when a row is not available."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from loadtests.bench import closed_loop, interleaved, render


def test_closed_loop_counts_requests_errors_and_latency() -> None:
    lock = threading.Lock()
    counter = itertools.count()

    def make_call():  # type: ignore[no-untyped-def]
        def call() -> None:
            time.sleep(0.01)
            with lock:
                n = next(counter)
            if n % 2:
                raise RuntimeError("every other call fails")
        return call

    load = closed_loop(make_call, concurrency=2, seconds=0.5)
    assert load.concurrency == 2
    assert load.requests > 10 and load.errors > 10
    assert abs(load.requests - load.errors) <= 4  # half fail (a failed warm-up counts too)
    assert load.throughput_per_s == pytest.approx(load.requests / 0.5, rel=0.3)
    assert 10 <= load.p50_ms < 100


def test_report_says_when_the_ingest_row_is_missing() -> None:
    report = {
        "machine": {"cpu": "x", "cpus": 2, "load_average_at_start": 1.0, "python": "3.11"},
        "model": "m", "input": "1x1x8x8", "threads": 2,
        "variant_vs_eager": [{"threads": 2, "variant_p50_ms": 1.0, "pytorch_eager_p50_ms": 5.0,
                              "speedup": 5.0}],
        "triton_vs_inprocess": [{"concurrency": 1, "triton_per_s": 96.0,
                                 "in_process_per_s": 100.0, "ratio": 0.96}],
        "gateway_vs_triton": [], "ingest_vs_orthanc": "failed: orthanc not installed",
    }
    md = render(report)
    assert "| 5.0x | >= 4x |" in md and "| 0.96 | >= 0.95 |" in md
    assert "not available: failed: orthanc not installed" in md


def test_interleaved_alternates_and_merges_the_slices() -> None:
    order: list[str] = []

    def maker(tag: str, delay: float):  # type: ignore[no-untyped-def]
        def make_call():  # type: ignore[no-untyped-def]
            order.append(tag)  # once per worker per slice
            return lambda: time.sleep(delay)
        return make_call

    fast, slow = interleaved(maker("a", 0.002), maker("b", 0.02), concurrency=1, seconds=0.6,
                             rounds=3)
    assert order == ["a", "b"] * 3
    assert fast.seconds == pytest.approx(0.6, rel=0.2) and slow.seconds == pytest.approx(0.6,
                                                                                       rel=0.2)
    assert fast.requests == len(fast.samples_ms) and slow.requests == len(slow.samples_ms)
    assert fast.throughput_per_s > 3 * slow.throughput_per_s
    assert fast.p50_ms < slow.p50_ms


def test_report_puts_the_issue_figures_side_by_side_per_process_count() -> None:
    def gw(n: int, c: int, per_s: float, ratio: float, overhead: float) -> dict[str, object]:
        return {"processes": n, "concurrency": c, "gateway_per_s": per_s,
                "throughput_ratio": ratio, "gateway_overhead_p50_ms": overhead,
                "gateway_p50_ms": 1.0, "triton_p50_ms": 1.0, "triton_per_s": 1.0}

    ingest = {"side": 512, "rows": [
        {"processes": n, "associations": a, "ratio": r, "gateway_per_s": 1.0,
         "orthanc_per_s": 1.0, "gateway_ingest_only_per_s": 1.0}
        for n, a, r in ((1, 1, 0.49), (1, 4, 0.39), (2, 1, 0.8), (2, 4, 1.1))]}
    report = {
        "machine": {"cpu": "x", "cpus": 2, "load_average_at_start": 1.0, "python": "3.11"},
        "model": "m", "input": "1x1x8x8", "threads": 2, "variant_vs_eager": [],
        "triton_vs_inprocess": [],
        "gateway_vs_triton": [gw(1, 1, 100.0, 0.2, 4.0), gw(1, 4, 104.0, 0.11, 16.1),
                              gw(2, 1, 110.0, 0.21, 3.9), gw(2, 4, 190.0, 0.33, 6.5)],
        "ingest_vs_orthanc": ingest,
    }
    md = render(report)
    assert "| 1 | 1.04 | 0.11 | 4.0 ms | 16.1 ms | 0.49 | 0.39 |" in md
    assert "| 2 | 1.73 | 0.33 | 3.9 ms | 6.5 ms | 0.80 | 1.10 |" in md
