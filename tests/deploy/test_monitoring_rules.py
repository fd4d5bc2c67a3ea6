"""The chart's PrometheusRule and dashboard, checked with the real promtool (Debian
prometheus): rules load, alerts fire on the series they are about and stay quiet on healthy
ones, and every dashboard query is valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import objects, of_kind, render


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run scripts/dev.sh setup (installs Debian prometheus)")
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (rule,) = of_kind(objects(render({})), "PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    return path


def test_promtool_accepts_the_rendered_rules(rules_file: Path) -> None:
    out = run_promtool("check", "rules", str(rules_file), cwd=rules_file.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


def test_promtool_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "sum(rate(foo[5m]) by"}]}]}), encoding="utf-8")
    out = run_promtool("check", "rules", str(bad), cwd=tmp_path)
    assert out.returncode != 0


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


NS = {"namespace": "bedside"}
GW = {**NS, "bedside_component": "gateway"}
TRITON = {**NS, "bedside_component": "triton"}


def _latency(le_counts: dict[str, int], protocol: str = "rest") -> list[dict[str, str]]:
    """Histogram buckets that grow by the given count per minute."""
    base = {**NS, "model": "cxr-lesion", "protocol": protocol, "stage": "total"}
    return [_series("bedside_gateway_stage_seconds_bucket", {**base, "le": le}, f"0+{n}x20")
            for le, n in le_counts.items()]


def test_alerts_fire_on_bad_series_and_not_on_good_ones(rules_file: Path) -> None:
    tests = {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": [
        {   # healthy: fast, no failures, both components up -> no alert at all
            "interval": "1m",
            "input_series": [
                _series("up", GW, "1x20"), _series("up", TRITON, "1x20"),
                *_latency({"0.1": 60, "0.5": 60, "2.5": 60, "+Inf": 60}),
                _series("bedside_gateway_requests_total",
                        {**NS, "protocol": "rest", "outcome": "inferred", "reason": "ok"},
                        "0+60x20"),
            ],
            "alert_rule_test": [{"eval_time": "15m", "alertname": a, "exp_alerts": []} for a in
                                ("BedsideLatencyP95High", "BedsideErrorRatioHigh",
                                 "BedsideTritonDown", "BedsideGatewayDown",
                                 "BedsideQueueTimeHigh")],
        },
        {   # slow, failing, Triton down
            "interval": "1m",
            "input_series": [
                _series("up", GW, "1x20"), _series("up", TRITON, "0x20"),
                *_latency({"0.1": 1, "0.5": 2, "2.5": 10, "5": 60, "+Inf": 60}),
                _series("bedside_gateway_requests_total",
                        {**NS, "protocol": "rest", "outcome": "inferred", "reason": "ok"},
                        "0+90x20"),
                _series("bedside_gateway_requests_total",
                        {**NS, "protocol": "rest", "outcome": "failed",
                         "reason": "triton_error"}, "0+10x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "BedsideTritonDown", "exp_alerts": [
                    {"exp_labels": {"severity": "critical"}, "exp_annotations": {
                        "summary": "No Triton instance of Bedside is up",
                        "description": "The gateway keeps acknowledged work on its spool and "
                                       "back-pressures new work until Triton returns."}}]},
                {"eval_time": "15m", "alertname": "BedsideErrorRatioHigh", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "protocol": "rest"},
                     "exp_annotations": {
                         "summary": "Bedside inference errors above 1%",
                         "description": "10% of rest requests failed over 5 minutes."}}]},
                {"eval_time": "15m", "alertname": "BedsideLatencyP95High", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "model": "cxr-lesion",
                                    "protocol": "rest"},
                     "exp_annotations": {
                         "summary": "Bedside p95 latency above 2 s",
                         # rank 57 of 60 lies 47/50 into the (2.5, 5] bucket: 4.85 s
                         "description": "p95 end-to-end latency of cxr-lesion over rest is "
                                        "4.85s."}}]},
                {"eval_time": "15m", "alertname": "BedsideGatewayDown", "exp_alerts": []},
            ],
        },
    ]}
    test_file = rules_file.parent / "rules_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    out = run_promtool("test", "rules", test_file.name, cwd=rules_file.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_delivery_alerts_fire_on_dead_letters_and_a_stalled_destination(
        rules_file: Path) -> None:
    pacs, web = {**NS, "destination": "pacs"}, {**NS, "destination": "research"}
    delivered = {"outcome": "delivered"}
    tests = {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            # pacs: down - 3 results waiting, 2 dead letters, nothing delivered
            _series("bedside_gateway_outbox_depth", pacs, "3x40"),
            _series("bedside_gateway_dead_letters", pacs, "0x5 2x35"),
            _series("bedside_gateway_deliveries_total", {**pacs, **delivered}, "7x40"),
            # research: busy but healthy - results waiting, and being delivered
            _series("bedside_gateway_outbox_depth", web, "4x40"),
            _series("bedside_gateway_dead_letters", web, "0x40"),
            _series("bedside_gateway_deliveries_total", {**web, **delivered}, "0+5x40"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "BedsideDeliveryDeadLetters", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "BedsideDeliveryDeadLetters", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "destination": "pacs"},
                 "exp_annotations": {
                     "summary": "Bedside results were not delivered",
                     "description": "2 result(s) for pacs are dead letters: fix the "
                                    "destination, then bedside outbox requeue --destination "
                                    "pacs."}}]},
            {"eval_time": "10m", "alertname": "BedsideDeliveryStalled", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "BedsideDeliveryStalled", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "destination": "pacs"},
                 "exp_annotations": {
                     "summary": "Bedside results wait for a destination",
                     "description": "3 result(s) wait for pacs and none was delivered in 15 "
                                    "minutes."}}]},
        ],
    }]}
    test_file = rules_file.parent / "delivery_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    out = run_promtool("test", "rules", test_file.name, cwd=rules_file.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = next(d for d in of_kind(objects(render({})), "ConfigMap")
                     if d["metadata"]["name"].endswith("-dashboard"))
    panels = json.loads(dashboard["data"]["bedside.json"])["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(exprs) >= 8
    # Grafana's variables, as Grafana would substitute them
    exprs = [re.sub(r"\$__rate_interval", "5m", e).replace("$model", ".*") for e in exprs]
    assert not [e for e in exprs if "$" in e]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    out = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
