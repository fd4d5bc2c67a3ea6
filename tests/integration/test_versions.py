"""A shadow version with real peers: the bundled Triton in explicit model-control mode serves
versions 1 and 2 of the classifier (loaded by the gateway through Triton's repository API); a
real Orthanc forwards studies. Version 2 runs in shadow: Orthanc gets SRs of version 1 only,
while the agreement of version 2 with version 1 appears in /metrics and in a real Prometheus
that scrapes the gateway. Then ``bedside models promote`` makes version 2 the primary without a
restart: the next study's SRs come from version 2; ``rollback`` brings version 1 back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
import yaml

from services.cli import main as bedside
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.util import dicom_bytes, make_study
from tests.integration.orthanc import AE_TITLE, OrthancServer, orthanc_factory

pytestmark = pytest.mark.integration
__all__ = ["orthanc_factory"]  # the fixture, imported for pytest
MODEL = TINY_MANIFEST.name


@pytest.fixture(scope="module")
def repository(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier with a second version beside the first (the manifest still names 1)."""
    repo = tmp_path_factory.mktemp("versions") / "repository"
    shutil.copytree(optimized / "repository", repo)
    shutil.copytree(repo / MODEL / "1", repo / MODEL / "2")
    return repo


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("versions-triton")
    server = TritonServer(TritonInstall.discover(triton_env()), repository, work / "triton",
                          TritonPorts(free_port(), free_port(), free_port()),
                          explicit_models=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _wait(predicate: Callable[[], Any], what: str, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what} not seen in {timeout_s:.0f}s (last: {last})")


def _prometheus(work: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run scripts/dev.sh setup (installs Debian prometheus)")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "gateway", "static_configs": [
            {"targets": [f"127.0.0.1:{target_port}"]}]}]}), encoding="utf-8")
    port = free_port()
    with (work / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={work / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def test_shadow_never_reaches_orthanc_its_agreement_is_scraped_and_promotion_needs_no_restart(
    repository: Path, triton: TritonServer, tmp_path: Path,
    orthanc_factory: Callable[..., OrthancServer], capsys: pytest.CaptureFixture[str],
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
        model_repository=repository, model_name=MODEL, shadow_versions=(f"{MODEL}=2",),
        triton_grpc_url=triton.grpc_url, spool_dir=tmp_path / "spool", http_port=free_port(),
        dicom_port=gw_port, allowed_calling_aets=(AE_TITLE,), routes_file=routes,
        audit_log=tmp_path / "audit.jsonl",
    ))
    gw.start()
    base = f"http://{gw.config.http_host}:{gw.config.http_port}"
    prom, prom_url = _prometheus(tmp_path, gw.config.http_port)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        # the gateway had Triton load both versions (explicit model control)
        assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2")

        def send(seed: int) -> tuple[str, list[str]]:
            instances = make_study(3, seed=seed)
            ids = set()
            for ds in instances:
                ds.PatientID = f"SYNTHETIC-{seed}"
                ids.add(orthanc.upload(dicom_bytes(ds))["ParentStudy"])
            (study_id,) = ids
            answer = orthanc.post("/modalities/bedside/store",
                                  {"Resources": [study_id], "Synchronous": True})
            assert answer["FailedInstancesCount"] == 0, answer
            return study_id, [str(ds.StudyInstanceUID) for ds in instances[:1]]

        def sr_series(study_id: str) -> list[dict[str, Any]]:
            return [s for s in orthanc.get(f"/studies/{study_id}/series")
                    if s["MainDicomTags"].get("Modality") == "SR"]

        def delivered() -> bool:
            return all(v == 0 for v in (gw.delivery.outbox.count("pending", "pacs"),)) \
                if gw.delivery is not None else False

        first, _ = send(1000)
        _wait(lambda: sum(len(s["Instances"]) for s in sr_series(first)) >= 3, "3 SRs")
        _wait(lambda: gw.worker.depth == 0 and delivered(), "work and delivery drained")
        time.sleep(1.0)  # anything more (a shadow's SR) would have been queued by now
        srs = sr_series(first)
        assert sum(len(s["Instances"]) for s in srs) == 3  # the primary's only
        assert {s["MainDicomTags"].get("SeriesDescription") for s in srs} == \
            {f"AI findings: {MODEL} v1"}
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        agreed = [line for line in metrics.splitlines()
                  if line.startswith("bedside_gateway_version_decisions_total{")
                  and 'baseline="1"' in line and 'candidate="2"' in line]
        assert sum(float(line.split()[-1]) for line in agreed) == 3.0, agreed
        assert any('agree="true"' in line for line in agreed)  # the same weights: they agree
        scraped = _wait(lambda: httpx.get(f"{prom_url}/api/v1/query", timeout=5, params={
            "query": f'sum(bedside_gateway_version_decisions_total{{model="{MODEL}"}})'}
            ).json()["data"]["result"] if prom.poll() is None else None,
            "the agreement metric in Prometheus", 60)
        assert float(scraped[0]["value"][1]) == 3.0

        # promotion without a restart, through the command
        assert bedside(["models", "--url", base, "promote", MODEL]) == 0
        assert "primary version 2" in capsys.readouterr().out
        second, _ = send(2000)
        _wait(lambda: sum(len(s["Instances"]) for s in sr_series(second)) >= 3, "3 more SRs")
        assert {s["MainDicomTags"].get("SeriesDescription") for s in sr_series(second)} == \
            {f"AI findings: {MODEL} v2"}
        status = httpx.get(f"{base}/v1/models", timeout=10).json()["models"][0]
        assert (status["primary"], status["shadow"], status["previous"]) == (2, None, 1)
        # rollback, also without a restart: Triton serves version 1 again
        assert bedside(["models", "--url", base, "rollback", MODEL]) == 0
        third, _ = send(3000)
        _wait(lambda: sum(len(s["Instances"]) for s in sr_series(third)) >= 3, "3 more SRs")
        assert {s["MainDicomTags"].get("SeriesDescription") for s in sr_series(third)} == \
            {f"AI findings: {MODEL} v1"}
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert [(r["action"], r["from_version"], r["to_version"]) for r in audit
                if r["event"] == "model_version"] == [("promote", 1, 2), ("rollback", 2, 1)]
    finally:
        client.close()
        prom.terminate()
        prom.wait(timeout=30)
        gw.stop()
