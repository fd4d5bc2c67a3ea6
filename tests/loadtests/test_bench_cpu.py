"""The CPU-per-stage benchmark runs every stage of both paths (a few calls each; no timing is
asserted) and refuses to report when the served preprocessing differs from the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtests import bench_cpu
from services.demo import DEMO_MANIFEST


def test_every_stage_of_both_paths_is_measured(tmp_path: Path) -> None:
    rows = bench_cpu.stages(DEMO_MANIFEST, 2, tmp_path)
    names = {(s.path, s.name) for s in rows}
    for stage in ("parse (dcmread)", "header checks", "decode + LUT, fast path",
                  "preprocess, as served", "tensor encode (gRPC request)",
                  "result store (durable)"):
        assert ("rest", stage) in names
    for stage in ("receive: as served", "spool (write+fsync+job row)", "worker: read + parse"):
        assert ("dimse", stage) in names
    measured = [s for s in rows if not s.name.startswith("worker: then")]
    assert all(s.cpu_ms >= 0 and s.wall_ms > 0 for s in measured)
    text = bench_cpu.render({"machine": {"cpu": "x", "cpus": 2, "load_average": 0.1}, "n": 2,
                             "models": {"demo": {"stages": [vars(s) for s in rows]}}})
    assert "| dimse | spool (write+fsync+job row) |" in text


def test_a_fast_path_that_differs_from_the_reference_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench_cpu.pp.preprocess_frames

    def off_by_one_ulp(*args, reference: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        x = real(*args, reference=reference, **kwargs)
        return x if reference else np.nextafter(x, np.float32(np.inf))

    monkeypatch.setattr(bench_cpu.pp, "preprocess_frames", off_by_one_ulp)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench_cpu.stages(DEMO_MANIFEST, 1, tmp_path)


def test_spooled_bytes_that_differ_from_pynetdicom_stop_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_cpu, "part10_bytes", lambda data, *uids: b"x" + bytes(data))
    with pytest.raises(AssertionError, match="spooled bytes differ"):
        bench_cpu.stages(DEMO_MANIFEST, 1, tmp_path)
