"""One gateway, several models: routing rules in the manifest, one job per model, the edges
addressing models by name, routes selecting by model. The Triton edges are faked here (one fake
per model); tests/integration/test_models.py does the same with the real Triton and Orthanc."""

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
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest, Selection
from optimizer.contract.series import not_admitted
from services.errors import ConfigError
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.delivery.routing import parse_routes
from services.gateway.errors import UnsupportedInstance
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, wait_for
from tests.gateway.models import CT_SEG, SegFake, ct_series, two_model_repository
from tests.gateway.util import dicom_bytes, make_instance

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _config(tmp: Path, **fields: Any) -> GatewayConfig:
    base: dict[str, Any] = dict(
        model_repository=(tmp / "repo" if (tmp / "repo").is_dir()
                          else two_model_repository(tmp)), model_name=TINY_MANIFEST.name,
        models=(CT_SEG.name,), triton_grpc_url="unused:1", spool_dir=tmp / "spool",
        http_port=free_port(), dicom_port=free_port(), grpc_port=free_port(),
        triton_retry_backoff_s=0.01)
    base.update(fields)
    return GatewayConfig(**base)


@pytest.fixture()
def fakes() -> tuple[FakeInferer, SegFake]:
    return FakeInferer(), SegFake()


@pytest.fixture()
def gateway(tmp_path: Path, fakes: tuple[FakeInferer, SegFake]) -> Iterator[Gateway]:
    gw = Gateway(_config(tmp_path), inferer=fakes[0], inferers={CT_SEG.name: fakes[1]})
    gw.start()
    yield gw
    gw.stop()


# -- manifest routing rules ----------------------------------------------------------------


def _with_selection(**rules: Any) -> dict[str, Any]:
    doc = TINY_MANIFEST.to_dict()
    doc["selection"] = {**doc["selection"], **rules}
    return doc


def test_routing_rules_round_trip_through_the_manifest() -> None:
    doc = _with_selection(sop_classes=[CT_IMAGE], series_description="(?i)chest",
                          manufacturers=["ACME"], calling_aets=["CT1"])
    manifest = Manifest.from_dict(doc)
    assert manifest.selection.series_description == "(?i)chest"
    assert Manifest.from_dict(manifest.to_dict()) == manifest


@pytest.mark.parametrize(("rules", "says"), [
    ({"series_description": "(unclosed"}, r"series_description: not a valid regular"),
    ({"sop_classes": ["CT Image"]}, r"sop_classes: 'CT Image' is not a UID"),
    ({"calling_aets": ["A\\B"]}, r"calling_aets: .* is not an AE title"),
    ({"manufacturers": [""]}, r"manufacturers: a list of non-empty strings"),
])
def test_invalid_routing_rules_are_refused_with_the_reason(rules: dict[str, Any],
                                                           says: str) -> None:
    with pytest.raises(ManifestError, match=says):
        Manifest.from_dict(_with_selection(**rules))


def test_each_routing_rule_admits_or_names_itself() -> None:
    ds = make_instance(1)
    ds.SeriesDescription, ds.Manufacturer = "Chest PA", "Acme Medical"
    assert not_admitted(Selection(), ds, None) is None
    cases = [
        (Selection(sop_classes=(CT_IMAGE,)), "not_selected_sop_class"),
        (Selection(series_description="^Abdomen"), "not_selected_series_description"),
        (Selection(manufacturers=("Other",)), "not_selected_manufacturer"),
        (Selection(calling_aets=("CT1",)), "not_selected_calling_aet"),
    ]
    for selection, reason in cases:
        assert not_admitted(selection, ds, "CR1") == reason
    accepting = Selection(sop_classes=(str(ds.SOPClassUID),), series_description="(?i)chest",
                          manufacturers=("ACME MEDICAL",), calling_aets=("CR1",))
    assert not_admitted(accepting, ds, "CR1") is None
    assert not_admitted(accepting, ds, None) == "not_selected_calling_aet"  # HTTP: no AE


def test_gateway_refuses_to_start_on_invalid_rules(tmp_path: Path) -> None:
    repo = two_model_repository(tmp_path)
    doc = json.loads((repo / CT_SEG.name / "manifest.json").read_text())
    doc["selection"]["series_description"] = "[unclosed"
    (repo / CT_SEG.name / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="series_description: not a valid regular"):
        Gateway(_config(tmp_path), inferer=FakeInferer(), inferers={CT_SEG.name: SegFake()})


def test_served_models_default_first_and_star_expands(tmp_path: Path) -> None:
    config = _config(tmp_path, models=("*",))
    assert config.served_models == (TINY_MANIFEST.name, CT_SEG.name)
    with pytest.raises(ConfigError, match=r"no manifest\.json for model 'absent'"):
        _config(tmp_path, models=("absent",))


# -- one study, two models -----------------------------------------------------------------


def _study(cr: int, ct: int) -> tuple[list[Any], list[Any]]:
    crs = [make_instance(k) for k in range(cr)]
    cts = ct_series(ct, study_uid=str(crs[0].StudyInstanceUID))
    for ds in crs:
        ds.StudyInstanceUID = cts[0].StudyInstanceUID
        ds.SeriesInstanceUID = crs[0].SeriesInstanceUID
    return crs, cts


def test_each_series_reaches_only_the_models_whose_rules_take_it_with_fake_tritons(
    gateway: Gateway, fakes: tuple[FakeInferer, SegFake],
) -> None:
    classifier, segmenter = fakes
    warm = (classifier.calls, segmenter.calls)
    crs, cts = _study(2, 3)
    body = {"instances": [base64.b64encode(dicom_bytes(ds)).decode() for ds in crs + cts]}
    r = httpx.post(f"{base_url(gateway)}/v1/studies", json=body)
    assert r.status_code == 202, r.text
    url = f"{base_url(gateway)}{r.json()['results_url']}"
    assert wait_for(lambda: httpx.get(url).json().get("status") == "done")
    docs = httpx.get(url).json()["instances"]
    by_model: dict[str, set[str]] = {}
    for doc in docs:
        assert "error" not in doc, doc
        by_model.setdefault(doc["model"], set()).add(doc["sop_instance_uid"])
        assert doc["model_version"] == 1
    assert by_model == {TINY_MANIFEST.name: {ds.SOPInstanceUID for ds in crs},
                        CT_SEG.name: {ds.SOPInstanceUID for ds in cts}}
    assert (classifier.calls - warm[0], segmenter.calls - warm[1]) == (2, 3)
    seg_doc = next(d for d in docs if d["model"] == CT_SEG.name)
    assert "pixels" in seg_doc["findings"][0]  # the segmentation result type
    # one job per model, each in its own model's job table
    lanes = {lane.name: lane for lane in gateway.lanes}
    assert lanes[TINY_MANIFEST.name].worker.jobs.count("inferred") == 2
    assert lanes[CT_SEG.name].worker.jobs.count("inferred") == 3
    metrics = httpx.get(f"{base_url(gateway)}/metrics").text
    assert 'bedside_gateway_jobs{state="inferred"} 5.0' in metrics  # both models' tables
    assert "bedside_gateway_spool_depth 0.0" in metrics


def test_spool_depth_sums_every_models_backlog_with_fake_tritons(
    gateway: Gateway, fakes: tuple[FakeInferer, SegFake],
) -> None:
    """While both models' Tritons are down, /metrics counts both models' waiting jobs."""
    fakes[0].unavailable_calls = fakes[1].unavailable_calls = 10**6
    crs, cts = _study(1, 2)
    body = {"instances": [base64.b64encode(dicom_bytes(ds)).decode() for ds in crs + cts]}
    assert httpx.post(f"{base_url(gateway)}/v1/studies", json=body).status_code == 202
    try:
        assert wait_for(lambda: "bedside_gateway_spool_depth 3.0" in
                        httpx.get(f"{base_url(gateway)}/metrics").text)
    finally:
        fakes[0].unavailable_calls = fakes[1].unavailable_calls = 0


def test_an_instance_several_models_take_becomes_one_job_each_with_fake_tritons(
    tmp_path: Path,
) -> None:
    """A second classifier that also takes CR: the instance is inferred by both."""
    repo = two_model_repository(tmp_path)
    twin = dataclasses.replace(TINY_MANIFEST, name="tiny-cxr-b")
    (repo / twin.name).mkdir()
    twin.save(repo / twin.name / "manifest.json")
    b = FakeInferer()
    b.model = twin.name  # type: ignore[misc]
    gw = Gateway(_config(tmp_path, models=("*",)), inferer=FakeInferer(),
                 inferers={CT_SEG.name: SegFake(), twin.name: b})
    gw.start()
    try:
        ds = make_instance(3)
        r = httpx.post(f"{base_url(gw)}/v1/studies",
                       json={"instances": [base64.b64encode(dicom_bytes(ds)).decode()]})
        assert r.status_code == 202
        url = f"{base_url(gw)}{r.json()['results_url']}"
        assert wait_for(lambda: httpx.get(url).json().get("status") == "done")
        models = sorted(d["model"] for d in httpx.get(url).json()["instances"])
        assert models == [TINY_MANIFEST.name, twin.name]
    finally:
        gw.stop()


def test_an_instance_no_model_takes_is_refused_with_each_reason(gateway: Gateway) -> None:
    ds = make_instance(4)
    ds.Modality = "MR"
    with pytest.raises(UnsupportedInstance) as info:
        gateway.ingestor.check(ds)
    assert TINY_MANIFEST.name in str(info.value) and CT_SEG.name in str(info.value)
    r = httpx.post(f"{base_url(gateway)}/v1/studies",
                   json={"instances": [base64.b64encode(dicom_bytes(ds)).decode()]})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "not_for_model"


def test_calling_ae_rule_routes_per_association(tmp_path: Path) -> None:
    repo = two_model_repository(tmp_path)
    doc = json.loads((repo / CT_SEG.name / "manifest.json").read_text())
    doc["selection"]["calling_aets"] = ["CT1"]
    (repo / CT_SEG.name / "manifest.json").write_text(json.dumps(doc))
    gw = Gateway(_config(tmp_path), inferer=FakeInferer(), inferers={CT_SEG.name: SegFake()})
    try:
        [ct] = ct_series(1)
        assert [lane.name for lane in gw.ingestor.check(ct, "CT1")] == [CT_SEG.name]
        with pytest.raises(UnsupportedInstance) as info:
            gw.ingestor.check(ct, "OTHER")
        assert info.value.reason in ("not_for_model", "not_selected_calling_aet")
        assert "selection rules" in str(info.value)
    finally:
        gw.worker.jobs.close()


# -- the edges address models by name --------------------------------------------------------


def test_v2_models_lists_every_model(gateway: Gateway) -> None:
    r = httpx.get(f"{base_url(gateway)}/v2/models")
    assert r.status_code == 200
    listed = {m["name"]: m for m in r.json()["models"]}
    assert set(listed) == {TINY_MANIFEST.name, CT_SEG.name}
    assert listed[CT_SEG.name]["task"] == "segmentation"
    assert listed[TINY_MANIFEST.name]["state"] == "READY"


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_oip_infer_by_model_name_with_fake_tritons(
    gateway: Gateway, module: Any, fakes: tuple[FakeInferer, SegFake],
) -> None:
    port = gateway.config.http_port if module is httpclient else gateway.config.grpc_port
    client = module.InferenceServerClient(f"{gateway.config.http_host}:{port}")
    [ct] = ct_series(1)
    tensor = module.InferInput("DICOM", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([dicom_bytes(ct)], dtype=np.object_))
    before = fakes[1].calls
    result = client.infer(CT_SEG.name, [tensor])
    doc = json.loads(result.as_numpy("FINDINGS_JSON")[0])
    assert doc["model"] == CT_SEG.name and "pixels" in doc["findings"][0]
    assert fakes[1].calls == before + 1
    meta = (client.get_model_metadata(CT_SEG.name) if module is httpclient
            else client.get_model_metadata(CT_SEG.name, as_json=True))
    assert meta["name"] == CT_SEG.name


def test_rest_infer_picks_a_model_by_query(gateway: Gateway) -> None:
    [ct] = ct_series(1)
    url = f"{base_url(gateway)}/v1/infer"
    headers = {"Content-Type": "application/dicom"}
    r = httpx.post(f"{url}?model={CT_SEG.name}", content=dicom_bytes(ct), headers=headers)
    assert r.status_code == 200 and r.json()["model"] == CT_SEG.name
    r = httpx.post(url, content=dicom_bytes(ct), headers=headers)  # the default: classifier
    assert r.status_code == 400 and r.json()["error"]["reason"] == "not_for_model"
    r = httpx.post(f"{url}?model=nope", content=dicom_bytes(ct), headers=headers)
    assert r.status_code == 404 and r.json()["error"]["reason"] == "unknown_model"


# -- routes select by model ----------------------------------------------------------------


def _routes(tmp: Path, route: dict[str, Any]) -> Any:
    return parse_routes({"destinations": {"pacs": {"type": "dimse", "host": "127.0.0.1",
                                                   "port": 104, "called_aet": "PACS"}},
                         "routes": [route, {"name": "rest", "destinations": ["pacs"],
                                            "default": True}]}, tmp)


def test_routes_select_by_model(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"name": "seg", "destinations": ["pacs"],
                                "models": [CT_SEG.name]})
    assert routes.route_for(("dimse",), (), CT_SEG.name).name == "seg"
    assert routes.route_for(("dimse",), (), TINY_MANIFEST.name).name == "rest"
    routes.check_models((TINY_MANIFEST.name, CT_SEG.name))
    with pytest.raises(ConfigError, match="not served"):
        routes.check_models((TINY_MANIFEST.name,))


def test_a_lane_that_cannot_spool_leaves_no_job_in_any_lane_with_fake_tritons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two models take the instance; the second one's spool write fails (faked: its
    ``Spool.put`` raises). The sender is refused, the first model keeps no file, row or result
    of it, and the resend is inferred exactly once per model."""
    repo = two_model_repository(tmp_path)
    twin = dataclasses.replace(TINY_MANIFEST, name="tiny-cxr-b")
    (repo / twin.name).mkdir()
    twin.save(repo / twin.name / "manifest.json")
    a, b = FakeInferer(), FakeInferer()
    b.model = twin.name  # type: ignore[misc]
    gw = Gateway(_config(tmp_path, models=("*",)), inferer=a,
                 inferers={CT_SEG.name: SegFake(), twin.name: b})
    gw.start()
    try:
        taking = [lane for lane in gw.lanes if lane.name in (TINY_MANIFEST.name, twin.name)]
        failing = taking[-1]  # the lanes before it are spooled and recorded first

        def disk_error(data: bytes) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(failing.spool, "put", disk_error)
        warm = (a.calls, b.calls)
        ds = make_instance(5)
        body = {"instances": [base64.b64encode(dicom_bytes(ds)).decode()]}
        r = httpx.post(f"{base_url(gw)}/v1/studies", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["reason"] == "spool_error"
        for lane in taking:
            assert lane.worker.jobs.all() == [], lane.name
            assert lane.spool.pending() == [], lane.name
        monkeypatch.undo()
        r = httpx.post(f"{base_url(gw)}/v1/studies", json=body)
        assert r.status_code == 202, r.text
        url = f"{base_url(gw)}{r.json()['results_url']}"
        assert wait_for(lambda: httpx.get(url).json().get("status") == "done")
        models = sorted(d["model"] for d in httpx.get(url).json()["instances"])
        assert models == [TINY_MANIFEST.name, twin.name]  # one result per model, no duplicate
        assert (a.calls - warm[0], b.calls - warm[1]) == (1, 1)
        for lane in taking:
            assert len(lane.worker.jobs.all()) == 1, lane.name
    finally:
        gw.stop()
