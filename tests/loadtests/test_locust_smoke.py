"""A short, bounded headless Locust run through the runner's command line, exactly as the README
gives it: the real bundled Triton and a ``bedside gateway`` subprocess, every protocol (REST,
OIP gRPC, STOW-RS, DIMSE C-STORE), two load steps of a few seconds, zero failures, and every
output (per-step CSV and HTML, summary, plots) written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.net import free_port
from tests.conftest import TINY_MANIFEST

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = {"rest", "oip_grpc", "stow", "dimse"}


def _runner(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtests.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_headless_smoke_run_over_every_protocol(optimized: Path, tmp_path: Path) -> None:
    out = tmp_path / "load"
    proc = _runner("--repository", str(optimized / "repository"), "--model", TINY_MANIFEST.name,
                   "--steps", "1,2", "--run-time", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = summary["rows"]
    assert {(r["step"], r["protocol"]) for r in rows} == {
        (step, p) for step in ("step-1", "step-2") for p in PROTOCOLS}
    for r in rows:
        assert r["requests"] > 0 and r["failures"] == 0, r
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
        assert r["throughput_per_s"] > 0, r
    assert {r["users"] for r in rows} == {1, 2}
    for step in ("step-1", "step-2"):
        assert (out / step / "locust_stats.csv").stat().st_size > 0
        assert (out / step / "locust_stats_history.csv").stat().st_size > 0
        assert "<html" in (out / step / "report.html").read_text(encoding="utf-8")[:2000].lower()
    for png in summary["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["plots"]) == {"latency_vs_load.png", "throughput_vs_concurrency.png"}
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| step-2 | dimse | 2 |" in md and "latency_vs_load.png" in md


def test_failures_are_counted_and_fail_the_run(tmp_path: Path) -> None:
    """Nothing listens on the port: every request fails, the summary says so, exit status 1."""
    out = tmp_path / "load"
    proc = _runner("--host", f"http://127.0.0.1:{free_port()}", "--protocols", "rest",
                   "--steps", "1", "--run-time", "2", "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((out / "summary.json").read_text(encoding="utf-8"))["rows"]
    assert row["protocol"] == "rest" and row["requests"] > 0
    assert row["failures"] == row["requests"]
