"""/metrics of a pod of gateway processes (prometheus-client multiprocess mode), with real
processes: two write their values, a third's exposition is the pod's sum, with every metric
family once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_WRITER = """
import sys, time
from services.gateway.metrics import GatewayMetrics
m = GatewayMetrics()
depth = int(sys.argv[1])
a, b = m.for_lane("model-a"), m.for_lane("model-b")  # two served models' workers
a.spool_depth.set(depth)
b.spool_depth.set(depth * 10)
m.requests.labels("dimse", "accepted", "ok").inc(depth)
m.model_version.labels("model-a", "primary", "1").set(1)
m.canary_share.labels("model-a").set(0.25)
print("ready", flush=True)
sys.stdin.readline()  # stay alive (live gauges count only live processes)
"""
_SCRAPER = """
from prometheus_client import generate_latest
from services.gateway.metrics import GatewayMetrics
print(generate_latest(GatewayMetrics().registry).decode())
"""


def test_the_pod_exposition_sums_processes_and_lanes_with_each_family_once(
        tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(n)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for n in (1, 2)]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        text = subprocess.run([sys.executable, "-c", _SCRAPER], env=env, capture_output=True,
                              text=True, check=True).stdout
    finally:
        for w in writers:
            w.communicate("\n", timeout=30)
    lines = text.splitlines()
    assert "bedside_gateway_spool_depth 33.0" in lines  # (1 + 10) + (2 + 20)
    assert ('bedside_gateway_requests_total{outcome="accepted",protocol="dimse",reason="ok"} '
            "3.0") in lines
    assert 'bedside_gateway_model_version{model="model-a",role="primary",version="1"} 1.0' \
        in lines
    assert 'bedside_gateway_canary_share{model="model-a"} 0.25' in lines
    types = [line for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # no family exposed twice
