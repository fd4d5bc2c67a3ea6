"""The ``bedside`` command as a user runs it: the demo end to end, and clean errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import triton_env

BEDSIDE = [sys.executable, "-m", "services.cli"]


@pytest.mark.integration
def test_quick_demo_runs_everything_and_prints_findings(tmp_path: Path) -> None:
    env = dict(os.environ, BEDSIDE_TRITON_ENV=str(triton_env()))
    proc = subprocess.run([*BEDSIDE, "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "C-STORE statuses: 0x0000, 0x0000" in out
    assert len(re.findall(r"C-STORE study, instance \d: lesion=", out)) == 2
    assert re.search(r"REST image: lesion=(POSITIVE|negative) \(score 0\.\d+", out)
    assert out.count("latency ms: gateway overhead") == 3
    assert "| onnx-int8 | int8 |" in out
    assert (tmp_path / "demo" / "report.json").is_file()
    # everything it started is gone: no tritonserver left behind from this run
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(tmp_path) not in ps.stdout


def test_optimize_with_missing_manifest_is_a_clean_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*BEDSIDE, "optimize", "--checkpoint", str(tmp_path / "m.pt"), "--manifest",
         str(tmp_path / "none.json"), "--calibration", str(tmp_path), "--validation",
         str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert "bedside: error: manifest not found" in proc.stderr
    assert "Traceback" not in proc.stderr
