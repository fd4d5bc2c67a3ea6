"""A real Orthanc PACS forwards studies to the gateway by C-STORE (Orthanc's own SCU, asked
through its REST API), and the gateway infers them with the real bundled Triton. What Orthanc
reports (its store job's answer) and what the gateway's results API says must agree, instance
by instance; an instance the gateway refuses is reported as failed by Orthanc, the rest still
get their results."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from optimizer.contract.manifest import Manifest
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.delivery.dicom_results import result_series
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway import dicom_validators
from tests.gateway.util import make_study
from tests.integration.orthanc import AE_TITLE, OrthancServer, orthanc_factory

pytestmark = pytest.mark.integration
__all__ = ["orthanc_factory"]  # the fixture, imported for pytest
MODEL = TINY_MANIFEST.name


@pytest.fixture(scope="module")
def triton_url(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("orthanc-triton")
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          work / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        yield triton.grpc_url
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def gateway(optimized: Path, triton_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway in-process, over the real Triton; only Orthanc's AE title may associate."""
    work = tmp_path_factory.mktemp("orthanc-gw")
    gw = Gateway(GatewayConfig(
        model_repository=optimized / "repository", model_name=MODEL,
        triton_grpc_url=triton_url, spool_dir=work / "spool",
        http_port=free_port(), dicom_port=free_port(), allowed_calling_aets=(AE_TITLE,),
    ))
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _results(gw: Gateway, study_uid: str, expected: int) -> dict[str, Any]:
    url = f"http://{gw.config.http_host}:{gw.config.http_port}/v1/studies/{study_uid}/results"
    deadline = time.monotonic() + 60
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(url, timeout=10)
        if r.status_code == 200:
            body = r.json()
            if body["status"] == "done" and len(body["instances"]) >= expected:
                return body
        time.sleep(0.1)
    raise AssertionError(f"study not done with {expected} results in 60 s: {body}")


def _upload(orthanc: OrthancServer, instances: list[Dataset]) -> str:
    """POST /instances each (one synthetic patient: Orthanc keys a study by patient and study
    UID); Orthanc's study ID."""
    studies = set()
    for ds in instances:
        ds.PatientID = "SYNTHETIC-0001"
        answer = orthanc.upload(_part10(ds))
        assert answer["Status"] == "Success", answer
        studies.add(answer["ParentStudy"])
    assert len(studies) == 1
    return studies.pop()


def test_orthanc_forwards_a_study_every_instance_is_acknowledged_and_inferred(
    gateway: Gateway, orthanc_factory: Callable[..., OrthancServer],
) -> None:
    orthanc = orthanc_factory(
        {"bedside": (gateway.config.ae_title, "127.0.0.1", gateway.config.dicom_port)})
    instances = make_study(6, seed=700)
    study_id = _upload(orthanc, instances)
    assert orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"] == \
        instances[0].StudyInstanceUID

    # Orthanc's own C-STORE SCU, through its REST API; the synchronous answer is the job's
    answer = orthanc.post("/modalities/bedside/store",
                          {"Resources": [study_id], "Synchronous": True})
    assert answer["InstancesCount"] == 6 and answer["FailedInstancesCount"] == 0, answer
    assert answer["RemoteAet"] == gateway.config.ae_title

    body = _results(gateway, instances[0].StudyInstanceUID, 6)
    by_sop = {r["sop_instance_uid"]: r for r in body["instances"]}
    assert set(by_sop) == {str(ds.SOPInstanceUID) for ds in instances}
    for result in by_sop.values():
        assert "error" not in result, result
        assert result["findings"][0]["label"] == "lesion"
        assert 0.0 <= result["findings"][0]["score"] <= 1.0
        assert result["timings_ms"]["inference"] > 0


def test_orthanc_reports_the_instance_the_gateway_refuses_and_the_rest_are_inferred(
    gateway: Gateway, orthanc_factory: Callable[..., OrthancServer],
) -> None:
    orthanc = orthanc_factory(
        {"bedside": (gateway.config.ae_title, "127.0.0.1", gateway.config.dicom_port)})
    instances = make_study(4, seed=720)
    instances[2].Modality = "MR"  # the model takes CR and DX only: 0xC001 "not for this model"
    study_id = _upload(orthanc, instances)
    # permissive: Orthanc goes on past the refused instance
    answer = orthanc.post("/modalities/bedside/store",
                          {"Resources": [study_id], "Synchronous": True, "Permissive": True})
    assert answer["InstancesCount"] == 4, answer
    body = _results(gateway, instances[0].StudyInstanceUID, 3)
    got = {r["sop_instance_uid"] for r in body["instances"]}
    assert got == {str(ds.SOPInstanceUID) for k, ds in enumerate(instances) if k != 2}
    assert "has failed with DIMSE status 0xC001" in orthanc.log_tail()

    # the refused instance alone, not permissive: Orthanc's job fails with the gateway's status
    mr_id = next(i for i in orthanc.get(f"/studies/{study_id}/instances")
                 if i["MainDicomTags"]["SOPInstanceUID"] == instances[2].SOPInstanceUID)["ID"]
    r = httpx.post(f"{orthanc.url}/modalities/bedside/store", timeout=60,
                   json={"Resources": [mr_id], "Synchronous": True})
    assert r.status_code >= 400, r.text
    assert "0xC001" in r.text, r.text
    # the gateway kept serving, and counted both refusals with their reason
    metrics = httpx.get(f"http://{gateway.config.http_host}:{gateway.config.http_port}"
                        "/metrics", timeout=10).text
    refused = [line for line in metrics.splitlines()
               if line.startswith("bedside_gateway_requests_total{")
               and 'outcome="refused"' in line and 'reason="not_for_model"' in line]
    assert refused and float(refused[0].split()[-1]) >= 2, refused
    assert _results(gateway, instances[0].StudyInstanceUID, 3)["status"] == "done"


def test_orthanc_forwards_a_study_and_gets_an_sr_per_instance_back_referencing_it(
    optimized: Path, triton_url: str, tmp_path: Path,
    orthanc_factory: Callable[..., OrthancServer],
) -> None:
    """The round trip a PACS sees: Orthanc C-STOREs a study to the gateway (routes file: a
    route for Orthanc's calling AE title back to Orthanc by C-STORE), the real Triton infers,
    and Comprehensive SRs arrive in Orthanc, in the source study, referencing its instances,
    all in one SR series numbered for the study and model (each instance its own group).
    Checked through Orthanc's REST API; the stored SRs then through dciodvfy and PixelMed."""
    gw_port = free_port()
    orthanc = orthanc_factory({"bedside": ("BEDSIDE", "127.0.0.1", gw_port)})
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({
        "destinations": {"pacs": {"type": "dimse", "host": "127.0.0.1",
                                  "port": orthanc.dicom_port, "called_aet": AE_TITLE,
                                  "calling_aet": "BEDSIDE",
                                  "retry": {"base_s": 0.1, "cap_s": 0.5}}},
        "routes": [{"name": "pacs", "calling_aets": [AE_TITLE], "destinations": ["pacs"]}],
    }))
    gw = Gateway(GatewayConfig(
        model_repository=optimized / "repository", model_name=MODEL,
        triton_grpc_url=triton_url, spool_dir=tmp_path / "spool", http_port=free_port(),
        dicom_port=gw_port, allowed_calling_aets=(AE_TITLE,), routes_file=routes,
        group_level="instance",
    ))
    gw.start()
    try:
        instances = make_study(3, seed=740)
        study_id = _upload(orthanc, instances)
        answer = orthanc.post("/modalities/bedside/store",
                              {"Resources": [study_id], "Synchronous": True})
        assert answer["InstancesCount"] == 3 and answer["FailedInstancesCount"] == 0, answer

        def sr_instances() -> list[str]:
            return [i for s in orthanc.get(f"/studies/{study_id}/series")
                    if s["MainDicomTags"].get("Modality") == "SR" for i in s["Instances"]]

        deadline = time.monotonic() + 60
        while len(sr_instances()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        gw.stop()
    srs = sr_instances()
    assert len(srs) == 3, orthanc.get(f"/studies/{study_id}/series")
    study_uid = str(instances[0].StudyInstanceUID)
    referenced = set()
    for sr_id in srs:
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        assert tags["Modality"] == "SR" and tags["StudyInstanceUID"] == study_uid
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        evidence = tags["CurrentRequestedProcedureEvidenceSequence"]
        assert [e["StudyInstanceUID"] for e in evidence] == [study_uid]
        for series in evidence[0]["ReferencedSeriesSequence"]:
            referenced |= {r["ReferencedSOPInstanceUID"]
                           for r in series["ReferencedSOPSequence"]}
    assert referenced == {str(ds.SOPInstanceUID) for ds in instances}
    sr_series = [s for s in orthanc.get(f"/studies/{study_id}/series")
                 if s["MainDicomTags"].get("Modality") == "SR"]
    assert len(sr_series) == 1, sr_series  # not one series per group
    manifest = Manifest.load(optimized / "repository" / MODEL / "manifest.json")
    assert int(sr_series[0]["MainDicomTags"]["SeriesNumber"]) == \
        result_series(study_uid, manifest, "SR")[1]
    paths = []
    for k, sr_id in enumerate(srs):
        paths.append(tmp_path / f"stored{k}.dcm")
        paths[-1].write_bytes(httpx.get(f"{orthanc.url}/instances/{sr_id}/file",
                                        timeout=30).content)
    for path in paths:
        stored = pydicom.dcmread(path)
        assert dicom_validators.problems("dciodvfy", dicom_validators.dciodvfy(path),
                                         stored) == []
    for path, report in dicom_validators.pixelmed(paths).items():
        assert "Found Root Template TID_1500 (MeasurementReport)" in report
        assert dicom_validators.problems("pixelmed", report, pydicom.dcmread(path)) == []
