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
    assert "SUCCESS: 13 rules found" in out.stdout


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


def test_shadow_agreement_alerts_fire_below_the_manifest_budget(rules_file: Path) -> None:
    """Over the chart's window (1h, at least 20 comparisons): a shadow classifier agreeing on
    90% of decisions against a 0.95 budget fires, one agreeing on 99% does not, one whose
    every decision disagrees fires with 0%; a shadow segmentation model with mean Dice 0.9
    against a 0.01 Dice budget fires, one with 0.995 does not."""
    pair = {**NS, "baseline": "1", "candidate": "2", "label": "lesion"}
    good, bad, none = ({**pair, "model": m} for m in ("cxr-good", "cxr-bad", "cxr-none"))
    seg_good, seg_bad = ({**pair, "model": m} for m in ("seg-good", "seg-bad"))

    def decisions(labels: dict[str, str], agree: int, disagree: int) -> list[dict[str, str]]:
        return [_series("bedside_gateway_version_decisions_total", {**labels, "agree": "true"},
                        f"0+{agree}x90"),
                _series("bedside_gateway_version_decisions_total",
                        {**labels, "agree": "false"}, f"0+{disagree}x90")]

    def budget(model: str, kind: str, value: float) -> dict[str, str]:
        return _series("bedside_gateway_model_accuracy_budget",
                       {**NS, "model": model, "kind": kind}, f"{value}x90")

    def dice(labels: dict[str, str], mean: float) -> list[dict[str, str]]:
        return [_series("bedside_gateway_version_dice_sum", labels, f"0+{mean}x90"),
                _series("bedside_gateway_version_dice_count", labels, "0+1x90")]

    tests = {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            *decisions(good, 99, 1), *decisions(bad, 9, 1),
            _series("bedside_gateway_version_decisions_total", {**none, "agree": "false"},
                    "0+2x90"),
            *(budget(m, "min_agreement", 0.95) for m in ("cxr-good", "cxr-bad", "cxr-none")),
            *dice(seg_good, 0.995), *dice(seg_bad, 0.9),
            *(budget(m, "max_dice_drop", 0.01) for m in ("seg-good", "seg-bad")),
        ],
        "alert_rule_test": [
            {"eval_time": "80m", "alertname": "BedsideShadowAgreementLow", "exp_alerts": [
                {"exp_labels": {"severity": "warning", **{k: v for k, v in bad.items()
                                                          if k != "namespace"}},
                 "exp_annotations": {
                     "summary": "Shadow version agrees less than the accuracy budget allows",
                     "description": "Version 2 of cxr-bad agrees with primary 1 on 90% of "
                                    "lesion decisions over 1h: do not promote it."}},
                {"exp_labels": {"severity": "warning", **{k: v for k, v in none.items()
                                                          if k != "namespace"}},
                 "exp_annotations": {
                     "summary": "Shadow version agrees less than the accuracy budget allows",
                     "description": "Version 2 of cxr-none agrees with primary 1 on 0% of "
                                    "lesion decisions over 1h: do not promote it."}}]},
            {"eval_time": "80m", "alertname": "BedsideShadowDiceLow", "exp_alerts": [
                {"exp_labels": {"severity": "warning", **{k: v for k, v in seg_bad.items()
                                                          if k != "namespace"}},
                 "exp_annotations": {
                     "summary": "Shadow version's masks differ more than the accuracy budget "
                                "allows",
                     "description": "Version 2 of seg-bad has a mean Dice of 0.900 against "
                                    "primary 1 for lesion over 1h: do not promote it."}}]},
            # too few comparisons yet (10 minutes of 1 Dice per minute < 20): quiet
            {"eval_time": "10m", "alertname": "BedsideShadowDiceLow", "exp_alerts": []},
        ],
    }]}
    test_file = rules_file.parent / "agreement_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    out = run_promtool("test", "rules", test_file.name, cwd=rules_file.parent)
    assert out.returncode == 0, out.stdout + out.stderr
