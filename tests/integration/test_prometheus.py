"""The chart's monitoring against live data: a real Prometheus (Debian ``prometheus``) on a free
port scrapes the gateway (``bedside gateway`` subprocess) and the real bundled Triton, loads the
chart's rendered recording and alert rules, and after a short Locust load over all four edges
every dashboard panel query and every rule expression is evaluated through Prometheus' HTTP API.

Each query must return the series it is about with plausible values (latencies positive and
ordered, request rates positive per protocol, gauges back at rest), the alerts must stay quiet
on a healthy stack, and ``BedsideTritonDown`` must fire once Triton is stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtests.run import run_locust
from loadtests.stack import Endpoints, Stack
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.deploy.chart import CHART, objects, of_kind, render

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name
NAMESPACE = "bedside"
PROTOCOLS = ["rest", "oip_grpc", "stow", "dimse"]
# Grafana's variables, as the dashboard would expand them for this model.
GRAFANA_VARS = {"$model": MODEL, "$__rate_interval": "1m"}


@dataclass
class Live:
    stack: Stack
    ends: Endpoints
    prometheus: str  # base URL
    rules: dict[str, Any]  # the PrometheusRule spec

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", expr
        return list(body["data"]["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}


def _prometheus_config(ends: Endpoints, rules: Path) -> dict[str, Any]:
    def job(name: str, port: int) -> dict[str, Any]:
        # The chart's ServiceMonitor/PodMonitor relabelings, plus the namespace label the
        # Prometheus Operator adds.
        return {"job_name": name, "metrics_path": "/metrics", "static_configs": [{
            "targets": [f"127.0.0.1:{port}"],
            "labels": {"namespace": NAMESPACE, "bedside_component": name}}]}

    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [job("gateway", ends.http_port),
                               job("triton", ends.triton_metrics_port)]}


def _wait(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen in {timeout_s:.0f}s (last: {last})")


def refuse(ends: Endpoints) -> None:
    r = httpx.post(f"{ends.http_url}/v1/infer", content=b"x",
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


@pytest.fixture(scope="module")
def live(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run scripts/dev.sh setup (installs Debian prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    (rule,) = of_kind(objects(render({}, namespace=NAMESPACE)), "PrometheusRule")
    rules = work / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    stack = Stack(optimized / "repository", MODEL, work / "stack")
    ends = stack.start()
    prom = None
    try:
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(ends, rules)), encoding="utf-8")
        port = free_port()
        with (work / "prometheus.log").open("wb") as log:
            prom = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert prom is not None and prom.poll() is None, \
                (work / "prometheus.log").read_text(errors="replace")[-3000:]
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, "Prometheus ready")
        live = Live(stack, ends, base, rule["spec"])
        # A short load over every edge, with a refused request (wrong media type) before and
        # after it: a counter's rate needs an increase between two scrapes.
        refuse(ends)
        _wait(lambda: live.query('bedside_gateway_requests_total{reason="media_type"}'),
              "the first refusal scraped")
        rows = run_locust(ends, PROTOCOLS, 1, 6, work / "locust", "load")
        assert all(r.failures == 0 and r.requests > 0 for r in rows), rows
        refuse(ends)
        # Everything acknowledged is inferred, then scraped, and the rules have run on it.
        _wait(lambda: set(live.values(
            'bedside:gateway_latency_seconds:p95{protocol=~".+"}', "protocol")) >= set(PROTOCOLS)
            and live.values("sum(bedside_gateway_spool_depth)", "") == {"": 0.0}
            and live.values('bedside_gateway_requests_total{reason="media_type"}', "") == {
                "": 2.0},
            "every protocol's latency recorded and the spool drained")
        yield live
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        stack.stop()


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads((CHART / "files" / "dashboard.json").read_text(encoding="utf-8"))
    out = []
    for panel in panels["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


DASHBOARD = _dashboard_queries()


def _finite(series: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in series.values())


def test_both_targets_are_scraped(live: Live) -> None:
    up = live.values("up", "bedside_component")
    assert up == {"gateway": 1.0, "triton": 1.0}
    assert live.query(f'nv_inference_count{{model="{MODEL}"}}'), "Triton's own metrics missing"


def test_every_dashboard_query_is_plausible_on_live_data(live: Live) -> None:
    assert len(DASHBOARD) == 15, "a panel was added or removed: say here what it must show"
    q: dict[str, list[list[dict[str, Any]]]] = {}
    for title, expr in DASHBOARD:
        q.setdefault(title, []).append(live.query(expr))

    def by(series: list[dict[str, Any]], label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in series}

    p50, p95, p99 = (by(s, "protocol") for s in q["End-to-end latency (p50, p95, p99) by protocol"])
    assert set(p50) == set(PROTOCOLS) and _finite(p50) and _finite(p99)
    for proto in PROTOCOLS:
        assert 0 < p50[proto] <= p95[proto] <= p99[proto] < 10, (proto, p50, p95, p99)

    (stages,) = (by(s, "stage") for s in q["Median time per stage"])
    assert {"receive", "preprocess", "inference", "postprocess", "gateway_overhead",
            "total"} <= set(stages), stages
    assert all(v >= 0 for v in stages.values()) and _finite(stages)
    assert 0 < stages["inference"] <= stages["total"]

    (outcomes,) = q["Requests by outcome"]
    rates = {(s["metric"]["protocol"], s["metric"]["outcome"]): float(s["value"][1])
             for s in outcomes}
    for proto in PROTOCOLS:
        assert rates[(proto, "inferred")] > 0, rates
    assert rates[("stow", "accepted")] > 0 and rates[("dimse", "accepted")] > 0

    (refusals,) = (by(s, "reason") for s in q["Refusals and failures by reason"])
    assert set(refusals) == {"media_type"} and refusals["media_type"] > 0

    spool, assocs = (by(s, "") for s in q["Spool depth and open associations"])
    assert spool == {"": 0.0}  # drained
    assert assocs == {"": 0.0}  # Locust's DIMSE user released its association

    queue, compute = (by(s, "model") for s in q["Triton queue and compute time per request"])
    assert set(queue) == set(compute) == {MODEL}
    assert 0 <= queue[MODEL] < 10 and 0 < compute[MODEL] < 10

    throughput, gpu = q["Triton throughput and GPU utilization"]
    assert by(throughput, "model")[MODEL] > 0
    # CPU-only Triton (--allow-gpu-metrics=false, no GPU here): no GPU series, by design.
    assert gpu == []

    # this stack runs no shadow version: no agreement series, the manifest's budget shown
    agreement, dice, budget = q["Shadow agreement with the primary, against the accuracy budget"]
    assert agreement == [] and dice == []
    assert by(budget, "model") == {MODEL: TINY_MANIFEST.accuracy_budget.min_agreement}


def _rules(spec: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for g in spec["groups"] for r in g["rules"] if kind in r]


def test_recording_rules_evaluate_and_are_recorded(live: Live) -> None:
    records = _rules(live.rules, "record")
    assert len(records) == 4
    for rule in records:
        direct, recorded = live.query(rule["expr"]), live.query(rule["record"])
        assert direct and recorded, rule["record"]
    latency = live.values("bedside:gateway_latency_seconds:p95", "protocol")
    assert set(latency) == set(PROTOCOLS) and all(0 < v < 10 for v in latency.values())
    queue = live.values("bedside:gateway_queue_seconds:p95", "model")
    assert set(queue) == {MODEL} and 0 < queue[MODEL] < 10  # STOW-RS and DIMSE wait in the spool
    errors = live.values("bedside:gateway_error_ratio", "protocol")
    assert set(errors) == set(PROTOCOLS) and all(v == 0.0 for v in errors.values())
    triton_queue = live.values("bedside:triton_queue_seconds:mean", "model")
    assert set(triton_queue) == {MODEL} and 0 <= triton_queue[MODEL] < 10
    body = httpx.get(f"{live.prometheus}/api/v1/rules", timeout=10).json()
    health = {r["name"]: r["health"] for g in body["data"]["groups"] for r in g["rules"]}
    names = {r.get("record") or r["alert"] for g in live.rules["groups"] for r in g["rules"]}
    assert set(health) == names and set(health.values()) == {"ok"}, health


def test_alert_expressions_match_the_live_state(live: Live) -> None:
    """Error and availability alerts stay quiet on a healthy stack. Latency and queue-time
    alerts depend on this machine's speed under load (the CPU is shared), so their expressions
    must select exactly the recorded series above the chart's thresholds, no more, no less."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    limits = values["monitoring"]["prometheusRule"]
    alerts = {r["alert"]: r["expr"] for r in _rules(live.rules, "alert")}
    assert set(alerts) == {"BedsideLatencyP95High", "BedsideErrorRatioHigh",
                           "BedsideQueueTimeHigh", "BedsideTritonDown", "BedsideGatewayDown",
                           "BedsideDeliveryDeadLetters", "BedsideDeliveryStalled",
                           "BedsideShadowAgreementLow", "BedsideShadowDiceLow"}
    for quiet in ("BedsideErrorRatioHigh", "BedsideTritonDown", "BedsideGatewayDown",
                  "BedsideDeliveryDeadLetters", "BedsideDeliveryStalled",
                  "BedsideShadowAgreementLow", "BedsideShadowDiceLow"):
        assert live.query(alerts[quiet]) == [], quiet

    def above(record: str, limit: float) -> set[tuple[tuple[str, str], ...]]:
        return {tuple(sorted(s["metric"].items())) for s in live.query(record)
                if float(s["value"][1]) > limit}

    def selected(expr: str) -> set[tuple[tuple[str, str], ...]]:
        return {tuple(sorted(s["metric"].items())) for s in live.query(expr)}

    assert selected(alerts["BedsideLatencyP95High"]) == above(
        "bedside:gateway_latency_seconds:p95", float(limits["p95LatencySeconds"]))
    assert selected(alerts["BedsideQueueTimeHigh"]) == (
        above("bedside:gateway_queue_seconds:p95", float(limits["queueTimeSeconds"]))
        | above("bedside:triton_queue_seconds:mean", float(limits["queueTimeSeconds"])))


def test_triton_down_alert_expression_fires_when_triton_stops(live: Live) -> None:
    """Last in the module: it stops Triton."""
    (rule,) = [r for r in _rules(live.rules, "alert") if r["alert"] == "BedsideTritonDown"]
    assert live.stack.triton is not None
    live.stack.triton.stop()
    fired = _wait(lambda: live.query(rule["expr"]), "BedsideTritonDown's expression", 20)
    assert float(fired[0]["value"][1]) == 0.0  # sum(up{triton}) == 0
    assert live.values("up", "bedside_component")["gateway"] == 1.0
