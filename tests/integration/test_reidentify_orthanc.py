"""The de-identification round trip with two real Orthanc servers and the real bundled Triton:
the hospital PACS C-STOREs a study to the gateway; a ``deidentify`` route delivers the model's
de-identified results to a research archive; an external reader writes an SR about that
de-identified study, which the research archive C-STOREs back to the gateway; the
``reidentify`` route re-identifies it and the PACS receives it in the original study, under the
original patient. Checked through the two Orthancs' REST APIs."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.groups import PHI, study_with_phi
from tests.gateway.test_reidentify import reader_sr
from tests.gateway.util import dicom_bytes
from tests.integration.orthanc import OrthancServer

pytestmark = pytest.mark.integration
SECRET = b"integration-reidentify-secret-0123456789"


@pytest.fixture()
def triton_url(optimized: Path, tmp_path: Path) -> Iterator[str]:
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          tmp_path / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        yield triton.grpc_url
    finally:
        triton.stop()


def _wait(what: str, check, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout_s:.0f} s")
        time.sleep(0.2)


def test_result_about_a_deidentified_study_comes_back_into_the_original_study(
        optimized: Path, triton_url: str, tmp_path: Path) -> None:
    gw_port = free_port()
    pacs = OrthancServer(tmp_path / "pacs", {"bedside": ("BEDSIDE", "127.0.0.1", gw_port)},
                         extra={"DicomAet": "PACS", "Name": "hospital-pacs"})
    research = OrthancServer(tmp_path / "research",
                             {"bedside": ("BEDSIDE", "127.0.0.1", gw_port)},
                             extra={"DicomAet": "RESEARCH", "Name": "research-archive"})
    key = tmp_path / "deid.key"
    key.write_bytes(SECRET)
    routes = tmp_path / "routes.json"
    gw: Gateway | None = None
    try:
        pacs.start()
        research.start()
        retry = {"base_s": 0.1, "cap_s": 0.5}
        routes.write_text(json.dumps({
            "deidentification": {"secret_file": str(key)},
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": pacs.dicom_port,
                         "called_aet": "PACS", "retry": retry},
                "research": {"type": "dimse", "host": "127.0.0.1",
                             "port": research.dicom_port, "called_aet": "RESEARCH",
                             "retry": retry}},
            "routes": [
                {"name": "research", "calling_aets": ["PACS"], "destinations": ["research"],
                 "deidentify": True},
                {"name": "returns", "calling_aets": ["RESEARCH"], "destinations": ["pacs"],
                 "reidentify": True}],
        }))
        gw = Gateway(GatewayConfig(
            model_repository=optimized / "repository", model_name=TINY_MANIFEST.name,
            triton_grpc_url=triton_url, spool_dir=tmp_path / "spool", http_port=free_port(),
            dicom_port=gw_port, allowed_calling_aets=("PACS", "RESEARCH"),
            routes_file=routes, group_level="instance"))
        gw.start()

        # 1. the hospital PACS sends a study to the gateway
        sources = study_with_phi(2, seed=900)
        study_uid = str(sources[0].StudyInstanceUID)
        for ds in sources:
            assert pacs.upload(dicom_bytes(ds))["Status"] == "Success"
        pacs_study = pacs.find_study(study_uid)
        assert pacs_study is not None
        answer = pacs.post("/modalities/bedside/store",
                           {"Resources": [pacs_study], "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0, answer

        # 2. the research archive receives the de-identified results (no patient, new study)
        research_srs = _wait("de-identified results in the research archive",
                             lambda: len(research.get("/instances")) >= 2
                             and research.get("/instances"))
        sent = pydicom.dcmread(io.BytesIO(httpx.get(
            f"{research.url}/instances/{research_srs[0]}/file", timeout=30).content))
        assert sent.PatientIdentityRemoved == "YES"
        assert sent.StudyInstanceUID != study_uid and not sent.PatientID
        assert PHI["PatientID"].encode() not in dicom_bytes(sent)

        # 3. an external reader's SR about the de-identified study, stored in the research
        #    archive, which sends it back to the gateway
        report = reader_sr(sent, "reader: nodule, follow up in 6 months")
        stored = research.upload(dicom_bytes(report))
        assert stored["Status"] == "Success"
        answer = research.post("/modalities/bedside/store",
                               {"Resources": [stored["ID"]], "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0, answer

        # 4. the PACS receives it in the original study, under the original patient
        def returned() -> dict[str, str] | None:
            for instance in pacs.get(f"/studies/{pacs_study}/instances"):
                if instance["MainDicomTags"]["SOPInstanceUID"] == report.SOPInstanceUID:
                    tags: dict[str, str] = pacs.get(f"/instances/{instance['ID']}"
                                                    "/simplified-tags")
                    return tags
            return None

        tags = _wait("the re-identified SR in the PACS's original study", returned)
        assert tags["StudyInstanceUID"] == study_uid
        assert (tags["PatientID"], tags["PatientName"]) == (PHI["PatientID"],
                                                            PHI["PatientName"])
        assert tags["AccessionNumber"] == PHI["AccessionNumber"]
        assert "PatientIdentityRemoved" not in tags
        evidence = tags["CurrentRequestedProcedureEvidenceSequence"]  # type: ignore[index]
        assert evidence[0]["StudyInstanceUID"] == study_uid  # type: ignore[index]
        assert len(pacs.get("/patients")) == 1  # no new patient, no new study
        assert len(pacs.get("/studies")) == 1
    finally:
        if gw is not None:
            gw.stop()
        research.stop()
        pacs.stop()
