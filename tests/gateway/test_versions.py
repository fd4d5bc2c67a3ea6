"""Versions of one model: the sticky canary split, shadow results that are compared and never
returned, agreement metrics, promotion and rollback while serving. The Triton edges are faked
(one fake per version); tests/integration/test_versions.py uses the real Triton and Orthanc."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid

from services.cli import main as bedside
from services.errors import ConfigError
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.inference.agreement import compare, dice
from services.gateway.inference.core import Result
from services.gateway.inference.versions import VersionPlan, answering_version, canary_bucket
from services.gateway.security.auth import new_key
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, model_repository, wait_for
from tests.gateway.test_auth import entry, write_keys
from tests.gateway.util import dicom_bytes, make_instance, make_study

MODEL = TINY_MANIFEST.name


class NegatedFake(FakeInferer):
    """Version 2's fake Triton: the opposite logits of version 1 (every decision flips)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return -super().infer(batch)


# -- the plan and the canary split --------------------------------------------------------------


def test_canary_share_over_synthetic_studies_is_within_tolerance_and_sticky() -> None:
    plan = VersionPlan(primary=1, canary=2, share=0.2)
    studies = [generate_uid() for _ in range(600)]
    chosen = [answering_version(plan, uid) for uid in studies]
    n, p = len(studies), plan.share
    canary = chosen.count(2)
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(canary - n * p) <= 4 * sigma, (canary, n * p, sigma)  # 4 sigma: 1 in 15,000
    assert [answering_version(plan, uid) for uid in studies] == chosen  # sticky per study
    assert all(0.0 <= canary_bucket(uid) < 1.0 for uid in studies)
    assert {answering_version(VersionPlan(1, canary=2, share=0.0), u) for u in studies} == {1}
    assert {answering_version(VersionPlan(1, canary=2, share=1.0), u) for u in studies} == {2}


def test_promote_and_rollback_plans() -> None:
    plan = VersionPlan(primary=1, shadow=2)
    promoted = plan.promote()
    assert (promoted.primary, promoted.shadow, promoted.previous) == (2, None, 1)
    assert promoted.rollback() == VersionPlan(primary=1)
    canary = VersionPlan(primary=1, canary=3, share=0.1, shadow=2).promote()
    assert (canary.primary, canary.canary, canary.share, canary.shadow) == (3, None, 0.0, 2)
    with pytest.raises(ValueError, match="nothing to promote"):
        VersionPlan(primary=1).promote()
    with pytest.raises(ValueError, match="nothing to roll back"):
        VersionPlan(primary=1).rollback()
    with pytest.raises(ValueError, match="already the primary"):
        plan.promote(1)


def _result(findings: list[dict[str, Any]], maps: np.ndarray | None = None) -> Result:
    return Result(MODEL, 1, "1.2", "1.2.3", "1.2.3.4", findings, maps=maps)


def test_agreement_per_label_for_classification_and_dice_for_segmentation() -> None:
    a = _result([{"label": "lesion", "score": 0.7, "positive": True}])
    b = _result([{"label": "lesion", "score": 0.4, "positive": False}])
    agreement = compare(TINY_MANIFEST, a, b)
    assert agreement.decisions == {"lesion": False}
    assert agreement.score_errors["lesion"] == pytest.approx(0.3)
    assert compare(TINY_MANIFEST, a, a).decisions == {"lesion": True}
    seg = dataclasses.replace(TINY_MANIFEST, task="segmentation")
    m1 = np.zeros((1, 1, 4, 4), np.float32)
    m1[0, 0, :2] = 0.9  # 8 pixels
    m2 = np.zeros_like(m1)
    m2[0, 0, :1] = 0.9  # 4 of them
    assert compare(seg, _result([], m1), _result([], m2)).dice["lesion"] == \
        pytest.approx(2 * 4 / 12)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


# -- a gateway with a shadow version ---------------------------------------------------------


def _config(tmp: Path, **fields: Any) -> GatewayConfig:
    base: dict[str, Any] = dict(
        model_repository=model_repository(tmp), model_name=MODEL, triton_grpc_url="unused:1",
        spool_dir=tmp / "spool", http_port=free_port(), dicom_port=free_port(),
        triton_retry_backoff_s=0.01, audit_log=tmp / "audit.jsonl")
    base.update(fields)
    return GatewayConfig(**base)


@pytest.fixture()
def fakes() -> dict[str, FakeInferer]:
    return {f"{MODEL}@1": FakeInferer(), f"{MODEL}@2": NegatedFake()}


@pytest.fixture()
def shadowed(tmp_path: Path, fakes: dict[str, FakeInferer]) -> Iterator[Gateway]:
    gw = Gateway(_config(tmp_path, shadow_versions=(f"{MODEL}=2",)), inferers=fakes)
    gw.start()
    yield gw
    gw.stop()


def _submit(gw: Gateway, instances: list[Any]) -> list[dict[str, Any]]:
    body = {"instances": [base64.b64encode(dicom_bytes(ds)).decode() for ds in instances]}
    r = httpx.post(f"{base_url(gw)}/v1/studies", json=body)
    assert r.status_code == 202, r.text
    url = f"{base_url(gw)}{r.json()['results_url']}"
    assert wait_for(lambda: httpx.get(url).json().get("status") == "done"
                    and len(httpx.get(url).json()["instances"]) == len(instances))
    docs: list[dict[str, Any]] = httpx.get(url).json()["instances"]
    return docs


def test_shadow_results_are_compared_and_never_returned_with_fake_tritons(
    shadowed: Gateway, fakes: dict[str, FakeInferer],
) -> None:
    before = fakes[f"{MODEL}@2"].calls
    docs = _submit(shadowed, make_study(3, seed=30))
    assert {d["model_version"] for d in docs} == {1}  # only the primary answers
    assert fakes[f"{MODEL}@2"].calls - before == 3  # ... and the shadow saw every input
    shadow_files = list((shadowed.config.spool_dir / "shadow" / "results").glob("*/*.json"))
    assert len(shadow_files) == 3
    shadow_doc = json.loads(shadow_files[0].read_text())
    assert shadow_doc["model_version"] == 2 and shadow_doc["shadow_of"] == 1
    assert shadow_doc["agreement"]["decisions"] == {"lesion": False}  # negated: flips
    metrics = httpx.get(f"{base_url(shadowed)}/metrics").text
    line = ('bedside_gateway_version_decisions_total{agree="false",baseline="1",candidate="2",'
            f'label="lesion",model="{MODEL}"}} 3.0')
    assert line in metrics, [m for m in metrics.splitlines() if "version_decisions" in m]
    assert (f'bedside_gateway_model_accuracy_budget{{kind="min_agreement",model="{MODEL}"}}'
            in metrics)
    assert f'bedside_gateway_model_version{{model="{MODEL}",role="shadow",version="2"}} 1.0' \
        in metrics
    [status] = httpx.get(f"{base_url(shadowed)}/v1/models").json()["models"]
    assert (status["primary"], status["shadow"]) == (1, 2)
    [pair] = status["agreement"]
    assert pair["labels"]["lesion"] == {"comparisons": 3, "agreement": 0.0,
                                        "mean_score_error": pytest.approx(
                                            pair["labels"]["lesion"]["mean_score_error"])}
    assert pair["labels"]["lesion"]["mean_score_error"] > 0


def test_promotion_and_rollback_take_effect_without_restart_and_are_audited(
    shadowed: Gateway, capsys: pytest.CaptureFixture[str],
) -> None:
    url = base_url(shadowed)
    assert bedside(["models", "--url", url, "promote", MODEL]) == 0
    assert "primary version 2" in capsys.readouterr().out
    docs = _submit(shadowed, make_study(2, seed=40))
    assert {d["model_version"] for d in docs} == {2}
    assert bedside(["models", "--url", url, "status"]) == 0
    assert f"{MODEL} (classification): primary 2, rollback to 1" in capsys.readouterr().out
    assert bedside(["models", "--url", url, "rollback", MODEL]) == 0
    docs = _submit(shadowed, make_study(2, seed=50))
    assert {d["model_version"] for d in docs} == {1}
    assert bedside(["models", "--url", url, "rollback", MODEL]) == 1  # nothing left
    assert "nothing to roll back" in capsys.readouterr().err
    records = [json.loads(line) for line in
               (shadowed.config.audit_log or Path()).read_text().splitlines()]
    changes = [(r["action"], r["from_version"], r["to_version"]) for r in records
               if r["event"] == "model_version"]
    assert changes == [("promote", 1, 2), ("rollback", 2, 1)]


def test_a_promotion_survives_a_restart(tmp_path: Path, fakes: dict[str, FakeInferer]) -> None:
    config = _config(tmp_path, shadow_versions=(f"{MODEL}=2",))
    gw = Gateway(config, inferers=fakes)
    gw.start()
    try:
        assert httpx.post(f"{base_url(gw)}/v1/models/{MODEL}/promote").status_code == 200
    finally:
        gw.stop()
    again = Gateway(config, inferers=fakes)
    again.start()
    try:
        assert again.core.plan == VersionPlan(primary=2, previous=1)  # shadow 2 is primary
        assert {d["model_version"] for d in _submit(again, [make_instance(61)])} == {2}
    finally:
        again.stop()


def test_a_promotion_reaches_the_other_gateway_process_on_the_spool_with_fake_tritons(
        tmp_path: Path, fakes: dict[str, FakeInferer]) -> None:
    """Two gateways on one spool (two processes of a pod, or two replicas): a promotion and
    a rollback through one are followed by the other without a restart, audited once."""
    one = Gateway(_config(tmp_path, shadow_versions=(f"{MODEL}=2",)), inferers=fakes)
    other = Gateway(_config(tmp_path, shadow_versions=(f"{MODEL}=2",)), inferers=fakes)
    one.start()
    other.start()
    try:
        assert httpx.post(f"{base_url(one)}/v1/models/{MODEL}/promote").status_code == 200
        assert wait_for(lambda: other.core.plan == VersionPlan(primary=2, previous=1))
        assert {d["model_version"] for d in _submit(other, [make_instance(71)])} == {2}
        metrics = httpx.get(f"{base_url(other)}/metrics").text
        assert (f'bedside_gateway_model_version{{model="{MODEL}",role="primary",version="2"}}'
                f' 1.0') in metrics
        assert httpx.post(f"{base_url(one)}/v1/models/{MODEL}/rollback").status_code == 200
        assert wait_for(lambda: other.core.plan == VersionPlan(primary=1, shadow=2))
    finally:
        other.stop()
        one.stop()
    records = [json.loads(line) for line in
               (one.config.audit_log or Path()).read_text().splitlines()]
    assert [(r["action"], r["to_version"]) for r in records
            if r["event"] == "model_version"] == [("promote", 2), ("rollback", 1)]


def test_model_changes_need_the_models_scope_and_only_promote_and_rollback_exist_with_fake_tritons(
        tmp_path: Path, fakes: dict[str, FakeInferer]) -> None:
    """Any POST under /v1/models/{name}/ needs the models scope, whatever the action's
    spelling; with it, an action other than exactly promote or rollback answers 404 and
    changes nothing."""
    other_key, ops_key = new_key(), new_key()
    keys = tmp_path / "keys.json"
    write_keys(keys, [entry("app", other_key, ["infer", "submit", "read", "metrics"]),
                      entry("ops", ops_key, ["models"])])
    gw = Gateway(_config(tmp_path, shadow_versions=(f"{MODEL}=2",), api_keys=keys),
                 inferers=fakes)
    gw.start()
    url = f"{base_url(gw)}/v1/models/{MODEL}"
    try:
        ops = {"Authorization": f"Bearer {ops_key}"}
        assert httpx.post(f"{url}/promote", headers=ops).status_code == 200
        promoted = VersionPlan(primary=2, previous=1)
        assert gw.core.plan == promoted
        app = {"Authorization": f"Bearer {other_key}"}
        for action in ("promote", "rollback", "Rollback", "anything", "rollback/x"):
            r = httpx.post(f"{url}/{action}", headers=app)
            assert r.status_code == 403 and r.json()["error"]["reason"] == "scope", action
        assert gw.core.plan == promoted
        for action in ("Rollback", "ROLLBACK", "anything", "promote ", "rollback2"):
            r = httpx.post(f"{url}/{action}", headers=ops)
            assert r.status_code == 404, (action, r.status_code)
            assert r.json()["error"]["reason"] == "unknown_action", action
        assert gw.core.plan == promoted
        assert httpx.post(f"{url}/rollback", headers=ops).status_code == 200
        assert gw.core.plan.primary == 1
    finally:
        gw.stop()
    records = [json.loads(line) for line in
               (gw.config.audit_log or Path()).read_text().splitlines()]
    assert [(r["action"], r["to_version"]) for r in records
            if r["event"] == "model_version"] == [("promote", 2), ("rollback", 1)]


def test_canary_answers_its_share_of_studies_with_fake_tritons(
    tmp_path: Path, fakes: dict[str, FakeInferer],
) -> None:
    gw = Gateway(_config(tmp_path, canary_versions=(f"{MODEL}=2:1.0",)), inferers=fakes)
    gw.start()
    try:
        assert {d["model_version"] for d in _submit(gw, make_study(2, seed=70))} == {2}
    finally:
        gw.stop()


def test_version_settings_are_checked_at_start(tmp_path: Path) -> None:
    for bad in ({"shadow_versions": ("tiny-cxr",)}, {"shadow_versions": ("tiny-cxr=x",)},
                {"canary_versions": ("tiny-cxr=2",)}, {"canary_versions": ("tiny-cxr=2:1.5",)}):
        with pytest.raises(ConfigError):
            _config(tmp_path, **bad)
    with pytest.raises(ConfigError, match="does not serve"):
        Gateway(_config(tmp_path, shadow_versions=("other=2",)), inferer=FakeInferer())
