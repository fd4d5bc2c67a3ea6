"""STOW-RS edge, driven by the real dicomweb-client against a running gateway whose Triton edge
is faked (unit level: real HTTP, real spool, fake inference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from services.gateway.app import Gateway
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway, wait_for
from tests.gateway.util import dicom_bytes, make_instance, make_study

REFERENCED, FAILED, REASON = 0x00081199, 0x00081198, 0x00081197
CLASS_UID, INSTANCE_UID = 0x00081150, 0x00081155


@pytest.fixture()
def fake_triton() -> FakeInferer:
    return FakeInferer()


@pytest.fixture()
def gateway(tmp_path: Path, fake_triton: FakeInferer) -> Iterator[Gateway]:
    gw = fake_gateway(tmp_path, fake_triton, max_request_bytes=2 * 1024 * 1024)
    yield gw
    gw.stop()


def _client(gw: Gateway) -> DICOMwebClient:
    return DICOMwebClient(url=f"{base_url(gw)}/dicomweb")


def test_stow_stores_a_study_and_results_follow_with_fake_triton(gateway: Gateway) -> None:
    instances = make_study(3)
    response = _client(gateway).store_instances(instances)
    refs = response[REFERENCED].value
    assert sorted(r[INSTANCE_UID].value for r in refs) == sorted(
        ds.SOPInstanceUID for ds in instances)
    assert all(r[CLASS_UID].value == instances[0].SOPClassUID for r in refs)
    assert FAILED not in response
    study = instances[0].StudyInstanceUID
    url = f"{base_url(gateway)}/v1/studies/{study}/results"
    assert wait_for(lambda: httpx.get(url).json().get("status") == "done")
    body = httpx.get(url).json()
    assert len(body["instances"]) == 3 and body["pending"] == 0


def test_stow_acknowledges_only_what_is_spooled_with_fake_triton(
    gateway: Gateway, fake_triton: FakeInferer
) -> None:
    fake_triton.unavailable_calls = 10**6  # Triton down: nothing leaves the spool
    instances = make_study(2)
    response = _client(gateway).store_instances(instances)
    assert len(response[REFERENCED].value) == 2
    assert len(gateway.spool.pending()) == 2  # on disk when the 200 came back
    status = httpx.get(f"{base_url(gateway)}/v1/studies/{instances[0].StudyInstanceUID}"
                       "/results").json()
    assert status["status"] == "pending" and status["pending"] == 2
    fake_triton.unavailable_calls = 0
    assert wait_for(lambda: not gateway.spool.pending())


def test_mixed_parts_give_202_with_failure_reasons(gateway: Gateway) -> None:
    good = make_instance(1)
    sr = make_instance(2)
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    no_pixels = make_instance(3)
    del no_pixels.PixelData
    mr = make_instance(4)
    mr.Modality = "MR"
    client = _client(gateway)
    response = client.store_instances([good, sr, no_pixels, mr])
    [stored] = response[REFERENCED].value
    assert stored[INSTANCE_UID].value == good.SOPInstanceUID
    failed = {f[INSTANCE_UID].value: f[REASON].value for f in response[FAILED].value}
    assert failed == {sr.SOPInstanceUID: 0x0122, no_pixels.SOPInstanceUID: 0xA900,
                      mr.SOPInstanceUID: 0xC001}
    r = httpx.post(f"{base_url(gateway)}/dicomweb/studies", content=_multipart(
        [dicom_bytes(good), dicom_bytes(sr)]), headers=_MULTIPART)
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/dicom+json"


def test_study_route_refuses_instances_of_another_study(gateway: Gateway) -> None:
    target = make_study(1)
    other = make_study(1, seed=5)
    client = _client(gateway)
    response = client.store_instances(target + other,
                                      study_instance_uid=target[0].StudyInstanceUID)
    [stored] = response[REFERENCED].value
    assert stored[INSTANCE_UID].value == target[0].SOPInstanceUID
    [failed] = response[FAILED].value
    assert failed[REASON].value == 0xA900
    with pytest.raises(requests.HTTPError) as info:  # none stored: 409
        client.store_instances(other, study_instance_uid=target[0].StudyInstanceUID)
    assert info.value.response.status_code == 409
    assert info.value.response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


_BOUNDARY = "bedside-test-boundary"
_MULTIPART = {"Content-Type": f'multipart/related; type="application/dicom"; '
                              f'boundary="{_BOUNDARY}"'}


def _multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    body = b""
    for p in parts:
        body += (f"--{_BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n").encode() + p + b"\r\n"
    return body + f"--{_BOUNDARY}--\r\n".encode()


def test_bad_requests_get_clear_errors_and_service_keeps_serving(gateway: Gateway) -> None:
    url = f"{base_url(gateway)}/dicomweb/studies"
    data = dicom_bytes(make_instance(1))
    cases = [
        ({"Content-Type": "application/dicom"}, data, 415, "media_type"),
        ({"Content-Type": f'multipart/related; type="application/dicom+xml"; '
                          f'boundary="{_BOUNDARY}"'}, _multipart([data]), 415, "media_type"),
        ({"Content-Type": 'multipart/related; type="application/dicom"'}, _multipart([data]),
         400, "bad_boundary"),
        ({"Content-Type": 'multipart/related; type="application/dicom"; boundary=other'},
         _multipart([data]), 400, "bad_multipart"),
        (_MULTIPART, _multipart([data])[:-30], 400, "bad_multipart"),
        (_MULTIPART, b"x" * (3 * 1024 * 1024), 413, "too_large"),
    ]
    for headers, body, status, reason in cases:
        r = httpx.post(url, content=body, headers=headers)
        assert (r.status_code, r.json()["error"]["reason"]) == (status, reason), r.text
    # parts that are not DICOM, or not application/dicom: 409 with 0xC000 and no UIDs
    r = httpx.post(url, content=_multipart([b"not dicom" * 50]), headers=_MULTIPART)
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"] == [{"00081197": {"vr": "US", "Value": [0xC000]}}]
    r = httpx.post(url, content=_multipart([data], part_type="image/jpeg"), headers=_MULTIPART)
    assert r.status_code == 409
    r = httpx.post(url, content=_multipart([data]), headers=_MULTIPART)
    assert r.status_code == 200
    assert r.headers["link"].startswith("</v1/studies/")


def test_full_spool_gives_503_with_retry_after(tmp_path: Path) -> None:
    fake = FakeInferer(unavailable_calls=10**6)
    gw = fake_gateway(tmp_path, fake, max_spool_depth=1)
    try:
        url = f"{base_url(gw)}/dicomweb/studies"
        r = httpx.post(url, content=_multipart([dicom_bytes(make_instance(1)),
                                                dicom_bytes(make_instance(2))]),
                       headers=_MULTIPART)
        assert r.status_code == 202  # the first fits, the second is out of resources
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
        r = httpx.post(url, content=_multipart([dicom_bytes(make_instance(3))]),
                       headers=_MULTIPART)
        assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        gw.stop()


def test_stow_metrics_carry_the_protocol_label(gateway: Gateway) -> None:
    _client(gateway).store_instances(make_study(1))
    text = httpx.get(f"{base_url(gateway)}/metrics").text
    assert 'bedside_gateway_requests_total{outcome="accepted",protocol="stow",reason="ok"} 1.0' \
        in text
