"""REST edge over Starlette's in-process test client, with a fake Triton (unit level)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.encaps import encapsulate
from starlette.testclient import TestClient

from services.gateway.edges.rest import create_app
from services.gateway.inference.core import InferenceCore
from services.gateway.intake.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.worker import SpoolWorker
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway, wait_for
from tests.gateway.util import bad_window_center, dicom_bytes, make_instance, make_study

DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture()
def fake_triton() -> FakeInferer:
    return FakeInferer()


@pytest.fixture()
def client(tmp_path: Path, fake_triton: FakeInferer) -> Iterator[TestClient]:
    core = InferenceCore(TINY_MANIFEST, fake_triton)
    metrics, spool, results = GatewayMetrics(), Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(core, spool, results, metrics, backoff_s=0.01)
    ingestor = Ingestor(core, spool, worker, metrics, max_spool_depth=1000,
                        max_instance_bytes=512 * 1024)
    app = create_app(core, results, metrics, lambda: True, max_request_bytes=512 * 1024,
                     ingestor=ingestor)
    with TestClient(app) as c:
        yield c


def test_infer_returns_findings_and_timings_with_fake_triton(client: TestClient) -> None:
    ds = make_instance()
    r = client.post("/v1/infer", content=dicom_bytes(ds), headers=DICOM)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sop_instance_uid"] == ds.SOPInstanceUID
    assert body["findings"][0]["label"] == "lesion"
    t = body["timings_ms"]
    assert t["total"] >= t["inference"] and t["gateway_overhead"] == pytest.approx(
        t["total"] - t["inference"], abs=0.01)


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (lambda: dicom_bytes(make_instance())[:3000], 400, {"unreadable", "truncated_pixel_data"}),
        (lambda: b"definitely not dicom" * 20, 400, {"not_dicom"}),
        (lambda: b"", 400, {"empty"}),
    ],
)
def test_bad_input_gets_400_and_service_keeps_serving(
    client: TestClient, payload, status: int, reason: set[str]  # type: ignore[no-untyped-def]
) -> None:
    r = client.post("/v1/infer", content=payload(), headers=DICOM)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"]
    assert err["reason"] in reason
    assert client.post("/v1/infer", content=dicom_bytes(make_instance(1)),
                       headers=DICOM).status_code == 200


def test_no_pixel_data_and_non_image_sop_class(client: TestClient) -> None:
    ds = make_instance()
    del ds.PixelData
    r = client.post("/v1/infer", content=dicom_bytes(ds), headers=DICOM)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "no_pixel_data"
    sr = make_instance()
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    r = client.post("/v1/infer", content=dicom_bytes(sr), headers=DICOM)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "unsupported_sop_class"


def test_media_type_and_size_limits(client: TestClient) -> None:
    r = client.post("/v1/infer", content=b"x", headers={"Content-Type": "image/png"})
    assert r.status_code == 415
    r = client.post("/v1/infer", content=b"x" * (600 * 1024), headers=DICOM)
    assert r.status_code == 413 and r.json()["error"]["reason"] == "too_large"


def test_triton_down_gives_503_with_retry_after(client: TestClient,
                                                fake_triton: FakeInferer) -> None:
    fake_triton.unavailable_calls = 1
    r = client.post("/v1/infer", content=dicom_bytes(make_instance()), headers=DICOM)
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert client.post("/v1/infer", content=dicom_bytes(make_instance()),
                       headers=DICOM).status_code == 200


def test_unknown_study_is_404_and_metrics_are_exposed(client: TestClient) -> None:
    assert client.get("/v1/studies/1.2.3/results").status_code == 404
    client.post("/v1/infer", content=dicom_bytes(make_instance()), headers=DICOM)
    text = client.get("/metrics").text
    series = (
        'bedside_gateway_stage_seconds_count{model="tiny-cxr",protocol="rest",stage="inference"}'
    )
    assert f"{series} 1.0" in text
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200


def test_malformed_header_value_is_400(client: TestClient) -> None:
    ds = make_instance()
    ds[0x00281050] = bad_window_center()
    r = client.post("/v1/infer", content=dicom_bytes(ds), headers=DICOM)
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]


def test_permanent_triton_error_is_502_with_fake_triton(client: TestClient,
                                                        fake_triton: FakeInferer) -> None:
    fake_triton.fail_permanently = True
    r = client.post("/v1/infer", content=dicom_bytes(make_instance()), headers=DICOM)
    assert r.status_code == 502 and r.json()["error"]["reason"] == "triton_error"


def test_rest_results_are_stored_for_the_study(client: TestClient) -> None:
    ds = make_instance()
    assert client.post("/v1/infer", content=dicom_bytes(ds), headers=DICOM).status_code == 200
    r = client.get(f"/v1/studies/{ds.StudyInstanceUID}/results")
    assert r.status_code == 200
    assert [i["sop_instance_uid"] for i in r.json()["instances"]] == [ds.SOPInstanceUID]


# --- JSON study API against a running gateway (fake Triton) -------------------------------


def _b64(ds) -> str:  # type: ignore[no-untyped-def]
    return base64.b64encode(dicom_bytes(ds)).decode("ascii")


def test_submit_study_then_poll_until_done_with_fake_triton(tmp_path: Path) -> None:
    fake = FakeInferer(unavailable_calls=10**6)  # Triton down at first: results must wait
    gw = fake_gateway(tmp_path, fake)
    try:
        url = base_url(gw)
        instances = make_study(3)
        r = httpx.post(f"{url}/v1/studies", json={"instances": [_b64(d) for d in instances]})
        assert r.status_code == 202, r.text
        body = r.json()
        study = instances[0].StudyInstanceUID
        assert body == {"study_instance_uid": study, "accepted": 3,
                        "results_url": f"/v1/studies/{study}/results"}
        assert r.headers["location"] == body["results_url"]
        assert len(gw.spool.pending()) == 3  # durably spooled before the 202
        status = httpx.get(url + body["results_url"]).json()
        assert status["status"] == "pending" and status["pending"] == 3
        fake.unavailable_calls = 0
        assert wait_for(lambda: httpx.get(url + body["results_url"]).json()["status"] == "done")
        done = httpx.get(url + body["results_url"]).json()
        assert sorted(i["sop_instance_uid"] for i in done["instances"]) == sorted(
            d.SOPInstanceUID for d in instances)
    finally:
        gw.stop()


def test_pending_status_survives_a_restart_with_fake_triton(tmp_path: Path) -> None:
    instances = make_study(2)
    gw = fake_gateway(tmp_path, FakeInferer(unavailable_calls=10**6))
    try:
        r = httpx.post(f"{base_url(gw)}/v1/studies",
                       json={"instances": [_b64(d) for d in instances]})
        assert r.status_code == 202
    finally:
        gw.stop()
    gw = fake_gateway(tmp_path, FakeInferer(unavailable_calls=10**6))  # same spool
    try:
        status = httpx.get(f"{base_url(gw)}/v1/studies/{instances[0].StudyInstanceUID}"
                           "/results").json()
        assert status["status"] == "pending" and status["pending"] == 2
    finally:
        gw.stop()


def test_submit_study_refuses_bad_requests_and_spools_nothing(tmp_path: Path) -> None:
    gw = fake_gateway(tmp_path, FakeInferer(), max_request_bytes=1024 * 1024)
    try:
        url = f"{base_url(gw)}/v1/studies"
        no_pixels = make_instance(2)
        del no_pixels.PixelData
        good = make_study(1)[0]
        cases = [
            (dict(content=b"{}", headers={"Content-Type": "text/plain"}), 415, "media_type"),
            (dict(content=b"{nope", headers={"Content-Type": "application/json"}), 400,
             "bad_json"),
            (dict(json={"instances": []}), 400, "bad_json"),
            (dict(json={"instances": ["@@not base64@@"]}), 400, "bad_base64"),
            (dict(json={"instances": [_b64(good), _b64(no_pixels)]}), 400, "no_pixel_data"),
            (dict(json={"instances": [_b64(good), _b64(make_instance(7))]}), 400,
             "several_studies"),
            (dict(json={"instances": ["A" * (2 * 1024 * 1024)]}), 413, "too_large"),
        ]
        for kwargs, status, reason in cases:
            r = httpx.post(url, **kwargs)  # type: ignore[arg-type]
            assert (r.status_code, r.json()["error"]["reason"]) == (status, reason), r.text
        assert "instances[1]" in httpx.post(
            url, json={"instances": [_b64(good), _b64(no_pixels)]}).json()["error"]["message"]
        assert gw.spool.pending() == [] and gw.worker.depth == 0
        assert httpx.post(url, json={"instances": [_b64(good)]}).status_code == 202
    finally:
        gw.stop()


def test_deeply_nested_json_bodies_are_400_with_the_reason(tmp_path: Path) -> None:
    gw = fake_gateway(tmp_path, FakeInferer(), max_request_bytes=1024 * 1024)
    try:
        deep = b"[" * 100_000 + b"]" * 100_000
        r = httpx.post(f"{base_url(gw)}/v1/studies", content=deep,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["reason"] == "json_too_deep"
        assert "nested deeper than" in r.json()["error"]["message"]
        nested_object = b'{"instances": ' + b'{"a": ' * 200 + b"1" + b"}" * 201
        r = httpx.post(f"{base_url(gw)}/v1/studies", content=nested_object,
                       headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]["reason"]) == (400, "json_too_deep")
        r = httpx.post(f"{base_url(gw)}/v2/models/{TINY_MANIFEST.name}/infer", content=deep)
        assert r.status_code == 400 and "nested deeper than" in r.json()["error"], r.text
        assert httpx.get(f"{base_url(gw)}/healthz").status_code == 200  # still serving
    finally:
        gw.stop()


def test_error_texts_name_the_problem_in_the_clients_terms(client: TestClient) -> None:
    garbage = client.post("/v1/infer", content=b"\x00" * 300, headers=DICOM).json()["error"]
    assert garbage["reason"] == "not_dicom" and "force" not in garbage["message"]
    assert "DICM" in garbage["message"]

    jpeg = make_instance(1)
    jpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2: no decoder
    jpeg.PixelData = encapsulate([b"\xff\x4f\xff\xd9"])
    r = client.post("/v1/infer", content=dicom_bytes(jpeg), headers=DICOM)
    assert (r.status_code, r.json()["error"]["reason"]) == (400, "unsupported_transfer_syntax")
    assert "1.2.840.10008.1.2.4.92" in r.json()["error"]["message"]

    huge = make_instance(2)
    huge.Rows = huge.Columns = 60000
    r = client.post("/v1/infer", content=dicom_bytes(huge), headers=DICOM)
    assert (r.status_code, r.json()["error"]["reason"]) == (400, "pixel_limit"), r.text

    garbled = make_instance(3)
    garbled.SOPClassUID = "1.2.3.GARBLED\x07\x01"
    r = client.post("/v1/infer", content=dicom_bytes(garbled), headers=DICOM)
    assert r.json()["error"]["reason"] == "unsupported_sop_class", r.text
    assert "GARBLED" not in r.text and "not a valid UID" in r.json()["error"]["message"]
