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
    # version 2 (a copy of version 1) ran in shadow on the same three inputs, and agreed
    assert re.search(r"shadow version 2 of cxr-lesion: lesion decisions agree with version 1 "
                     r"on 100% of 3 inputs", out), out[-3000:]
    assert "| onnx-fp32 | fp32 |" in out and "| onnx-fp16 | fp16 |" in out
    assert re.search(r"\| onnx-int8-(minmax|percentile|entropy)(-recovered)? \| int8 \|", out)
    assert (tmp_path / "demo" / "report.json").is_file()
    # the shadow ran from a served copy: the optimizer's repository keeps its one version
    model = tmp_path / "demo" / "repository" / "cxr-lesion"
    assert sorted(p.name for p in model.iterdir() if p.name.isdigit()) == ["1"]
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


@pytest.mark.integration
def test_serve_becomes_ready_and_stops_everything_on_ctrl_c(optimized: Path,
                                                            tmp_path: Path) -> None:
    import json
    import signal
    import time
    import urllib.request

    from services.net import free_port

    http_port = free_port()
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [*BEDSIDE, "serve", "--repository", str(optimized / "repository"), "--model",
         "tiny-cxr", "--spool", str(spool), "--no-auth", "--plaintext", "--http-port",
         str(http_port), "--dicom-port",
         str(free_port()), "--grpc-port", str(free_port()), "--triton-grpc-port",
         str(free_port()), "--triton-env",
         str(triton_env())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ready = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz",
                                            timeout=2) as r:
                    ready = json.loads(r.read()) == {"ready": True}
            except OSError:
                time.sleep(0.2)
        assert ready, "bedside serve never became ready"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "tritonserver stopped" in out and "gateway stopped" in out
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(spool) not in ps.stdout  # tritonserver's backend dir lives under the spool


def test_triton_env_defaults_to_the_sibling_of_this_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.commands.common import default_triton_env as _default_triton_env

    monkeypatch.delenv("BEDSIDE_TRITON_ENV", raising=False)
    monkeypatch.chdir("/")  # independent of where the command runs
    assert _default_triton_env() == Path(sys.prefix).parent / ".venv-triton"
    monkeypatch.setenv("BEDSIDE_TRITON_ENV", "/opt/triton-env")
    assert _default_triton_env() == Path("/opt/triton-env")
