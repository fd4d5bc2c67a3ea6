"""Two models behind one gateway, with real peers: the bundled Triton serves a CR classifier
and a CT segmentation model from one repository; a real Orthanc forwards one study holding a CR
series and a CT series. The CR series must reach only the classifier and the CT series only the
segmentation model, and each model's result (SR, SEG) must come back to Orthanc."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from loadtests.stack import GatewayProcess
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.store.jobs import JobTable
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.models import CT_SEG, ct_series
from tests.gateway.util import dicom_bytes, make_study
from tests.integration.models_repo import two_model_repository
from tests.integration.orthanc import AE_TITLE, OrthancServer, orthanc_factory
from tests.integration.peers import STORESCU
from tests.integration.test_durability import _acknowledged

pytestmark = pytest.mark.integration
__all__ = ["orthanc_factory"]  # the fixture, imported for pytest


@pytest.fixture(scope="module")
def repository(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_model_repository(optimized, tmp_path_factory.mktemp("two-models"))


@pytest.fixture(scope="module")
def triton_url(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("two-models-triton")
    triton = TritonServer(TritonInstall.discover(triton_env()), repository, work / "triton",
                          TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        yield triton.grpc_url
    finally:
        triton.stop()


def _study() -> tuple[list[Dataset], list[Dataset]]:
    crs = make_study(2, seed=900)
    cts = ct_series(3, study_uid=str(crs[0].StudyInstanceUID))
    for ds in crs + cts:
        ds.PatientID, ds.PatientName = "SYNTHETIC-0002", "Synthetic^Two"
    return crs, cts


def _wait(predicate: Callable[[], bool], timeout_s: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _referenced(tags: dict[str, Any]) -> set[str]:
    """SOP Instance UIDs a result object references (SR evidence, SEG source images)."""
    found: set[str] = set()
    for item in tags.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in item.get("ReferencedSeriesSequence", []):
            found |= {r["ReferencedSOPInstanceUID"] for r in series["ReferencedSOPSequence"]}
    for series in tags.get("ReferencedSeriesSequence", []):
        found |= {r["ReferencedSOPInstanceUID"]
                  for r in series.get("ReferencedInstanceSequence", [])}
    return found


def test_orthanc_study_with_cr_and_ct_series_each_reaches_only_its_model_and_returns(
    repository: Path, triton_url: str, tmp_path: Path,
    orthanc_factory: Callable[..., OrthancServer],
) -> None:
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
        model_repository=repository, model_name=TINY_MANIFEST.name, models=("*",),
        triton_grpc_url=triton_url, spool_dir=tmp_path / "spool", http_port=free_port(),
        dicom_port=gw_port, allowed_calling_aets=(AE_TITLE,), routes_file=routes,
    ))
    assert [lane.name for lane in gw.lanes] == [TINY_MANIFEST.name, CT_SEG.name]
    gw.start()
    crs, cts = _study()
    try:
        ids = {orthanc.upload(dicom_bytes(ds))["ParentStudy"] for ds in crs + cts}
        assert len(ids) == 1
        study_id = ids.pop()
        answer = orthanc.post("/modalities/bedside/store",
                              {"Resources": [study_id], "Synchronous": True})
        assert answer["InstancesCount"] == 5 and answer["FailedInstancesCount"] == 0, answer

        def series_of(modality: str) -> list[str]:
            return [i for s in orthanc.get(f"/studies/{study_id}/series")
                    if s["MainDicomTags"].get("Modality") == modality for i in s["Instances"]]

        assert _wait(lambda: len(series_of("SR")) >= 2 and len(series_of("SEG")) >= 1), \
            orthanc.get(f"/studies/{study_id}/series")
        url = (f"http://{gw.config.http_host}:{gw.config.http_port}/v1/studies/"
               f"{crs[0].StudyInstanceUID}/results")
        assert _wait(lambda: httpx.get(url, timeout=10).json().get("status") == "done")
        docs = httpx.get(url, timeout=10).json()["instances"]
    finally:
        gw.stop()
    by_model: dict[str, set[str]] = {}
    for doc in docs:
        assert "error" not in doc, doc
        by_model.setdefault(doc["model"], set()).add(doc["sop_instance_uid"])
    assert by_model == {TINY_MANIFEST.name: {str(ds.SOPInstanceUID) for ds in crs},
                        CT_SEG.name: {str(ds.SOPInstanceUID) for ds in cts}}
    cr_uids = {str(ds.SOPInstanceUID) for ds in crs}
    ct_uids = {str(ds.SOPInstanceUID) for ds in cts}
    srs, segs = series_of("SR"), series_of("SEG")
    assert len(srs) == 2
    sr_refs: set[str] = set()
    for sr_id in srs:
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        sr_refs |= _referenced(tags)
    assert sr_refs == cr_uids
    seg_refs: set[str] = set()
    for seg_id in segs:
        tags = orthanc.get(f"/instances/{seg_id}/simplified-tags")
        assert tags["StudyInstanceUID"] == str(crs[0].StudyInstanceUID)
        seg_refs |= _referenced(tags)
    assert seg_refs and seg_refs <= ct_uids
    assert len(segs) == len(cts)  # one SEG per inferred CT instance (2-D model)


def _results_by_lane(spool: Path) -> dict[str, list[dict[str, Any]]]:
    """Every stored result document per model lane (the default model's at the spool root)."""
    lanes = {TINY_MANIFEST.name: spool, CT_SEG.name: spool / "models" / CT_SEG.name}
    return {name: [json.loads(p.read_text()) for p in sorted((root / "results").glob("*/*"))]
            for name, root in lanes.items()}


def _job_states(root: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{root / JobTable.FILE}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT name, state FROM jobs"))
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        db.close()


def test_sigkill_mid_study_leaves_exactly_one_result_per_model_per_group(
    repository: Path, triton_url: str, tmp_path: Path,
) -> None:
    """``bedside gateway`` serving both models is killed (SIGKILL) once the classifier has
    finished some of a CR+CT study's instances and before the CT series' group has closed;
    after a restart on the same spool every acknowledged instance has exactly one result from
    the model that takes it, written by that model's own job (one row per instance), and
    nothing is left in any spool."""
    spool, log = tmp_path / "spool", tmp_path / "gw.log"
    crs = make_study(6, seed=960)
    cts = ct_series(4, study_uid=str(crs[0].StudyInstanceUID))
    files: dict[str, str] = {}
    for k, ds in enumerate(cts + crs):  # the CT series first: its group is open at the kill
        path = tmp_path / "in" / f"{k:03d}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files[str(path)] = str(ds.SOPInstanceUID)
    extra = ("--serve-model", CT_SEG.name)
    seg_root = spool / "models" / CT_SEG.name
    gw = GatewayProcess(repository, TINY_MANIFEST.name, spool, triton_url, log, *extra)
    try:
        proc = subprocess.Popen(
            [STORESCU, "-v", "-aet", "TESTSCU", "-aec", "BEDSIDE", "127.0.0.1",
             str(gw.dicom_port), *files], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=dict(os.environ, TCP_NODELAY="1"))
        deadline = time.monotonic() + 60
        while list(_job_states(spool).values()).count("inferred") < 2:
            assert time.monotonic() < deadline, "the classifier inferred nothing"
            time.sleep(0.01)
        gw.kill()
        killed_at = _job_states(seg_root)
        out, _ = proc.communicate(timeout=60)
    finally:
        gw.kill()
    acked = {files[f] for f in _acknowledged(out)}
    cr_uids, ct_uids = {str(ds.SOPInstanceUID) for ds in crs}, {str(ds.SOPInstanceUID)
                                                                  for ds in cts}
    # really mid-study: CT instances acknowledged, their series' group not closed yet
    assert acked & ct_uids and "received" in killed_at.values(), killed_at
    gw = GatewayProcess(repository, TINY_MANIFEST.name, spool, triton_url, log, *extra)
    try:
        def finished() -> bool:
            states = [*_job_states(spool).values(), *_job_states(seg_root).values()]
            return bool(states) and "received" not in states

        assert _wait(finished, 120)
    finally:
        gw.terminate()
    docs = _results_by_lane(spool)
    for name, takes, root in ((TINY_MANIFEST.name, cr_uids, spool),
                              (CT_SEG.name, ct_uids, seg_root)):
        got = [d["sop_instance_uid"] for d in docs[name]]
        assert len(got) == len(set(got)), (name, got)  # exactly one result per instance
        assert acked & takes <= set(got) <= takes, (name, got)
        assert {d["model"] for d in docs[name]} <= {name}
        assert all("error" not in d for d in docs[name])
        states = _job_states(root)
        assert len(states) == len(got) and set(states.values()) == {"inferred"}, states
        assert {d["_job"] for d in docs[name]} == set(states)  # each by its own job, once
        assert not list((root / "incoming").glob("*.dcm"))
