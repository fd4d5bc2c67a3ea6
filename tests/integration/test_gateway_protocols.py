"""Every gateway edge through the real bundled Triton: OIP v2 (stock tritonclient, gRPC and
HTTP), DICOMweb STOW-RS (dicomweb-client), the JSON study API, and the calling-AE allowlist
(dcmtk). Scores must match the selected variant run in-process."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from optimizer.contract.findings import activate
from optimizer.contract.preprocess import preprocess
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.inference.triton import TritonInferer
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.util import make_instance, make_study
from tests.integration.test_end_to_end import _expected_score

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name


@pytest.fixture(scope="module")
def stack(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("protocols")
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          work / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    gateway = None
    try:
        gateway = Gateway(GatewayConfig(
            model_repository=optimized / "repository", model_name=MODEL,
            triton_grpc_url=triton.grpc_url, spool_dir=work / "spool",
            http_port=free_port(), dicom_port=free_port(), grpc_port=free_port(),
            allowed_calling_aets=("TESTSCU",),
        ))
        gateway.start()
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _results(gw: Gateway, study_uid: str) -> list[dict]:  # type: ignore[type-arg]
    url = f"http://{gw.config.http_host}:{gw.config.http_port}/v1/studies/{study_uid}/results"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(url)
        if r.status_code == 200 and r.json()["status"] == "done":
            return list(r.json()["instances"])
        time.sleep(0.1)
    raise AssertionError("study not done in 30 s")


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_tritonclient_infers_through_the_gateway_and_real_triton(
    stack: Gateway, optimized: Path, module  # type: ignore[no-untyped-def]
) -> None:
    port = stack.config.grpc_port if module is grpcclient else stack.config.http_port
    client = module.InferenceServerClient(f"{stack.config.http_host}:{port}")
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    instances = [make_instance(200), make_instance(201)]
    tensor = module.InferInput("DICOM", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([_bytes(ds) for ds in instances], dtype=np.object_))
    result = client.infer(MODEL, [tensor])
    scores = result.as_numpy("SCORES")
    for k, ds in enumerate(instances):
        assert scores[k, 0] == pytest.approx(_expected_score(optimized, ds), abs=1e-4)
    docs = [json.loads(d) for d in result.as_numpy("FINDINGS_JSON")]
    assert docs[0]["timings_ms"]["inference"] > 0


def test_stow_rs_through_real_triton(stack: Gateway, optimized: Path) -> None:
    instances = make_study(2, seed=210)
    client = DICOMwebClient(
        url=f"http://{stack.config.http_host}:{stack.config.http_port}/dicomweb")
    response = client.store_instances(instances)
    assert len(response[0x00081199].value) == 2
    by_sop = {r["sop_instance_uid"]: r for r in _results(stack, instances[0].StudyInstanceUID)}
    for ds in instances:
        assert by_sop[ds.SOPInstanceUID]["findings"][0]["score"] == pytest.approx(
            _expected_score(optimized, ds), abs=1e-4)


def test_json_study_api_through_real_triton(stack: Gateway) -> None:
    instances = make_study(2, seed=220)
    r = httpx.post(f"http://{stack.config.http_host}:{stack.config.http_port}/v1/studies",
                   json={"instances": [base64.b64encode(_bytes(d)).decode() for d in instances]})
    assert r.status_code == 202, r.text
    results = _results(stack, r.json()["study_instance_uid"])
    assert len(results) == 2 and all("findings" in x for x in results)


def test_allowlist_with_dcmtk(stack: Gateway) -> None:
    for calling, ok in (("TESTSCU", True), ("STRANGER", False)):
        proc = subprocess.run(
            ["/usr/bin/echoscu", "-aet", calling, "-aec", stack.config.ae_title,
             stack.config.dicom_host, str(stack.config.dicom_port)],
            capture_output=True, text=True, timeout=60, check=False,
            env=dict(os.environ, TCP_NODELAY="1"))
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr


def test_async_client_takes_tensor_names_from_triton_and_serves_threads_concurrently(
    stack: Gateway, optimized: Path
) -> None:
    """The manifest's tensor names are wrong here on purpose: the model has one input and one
    output, so the client uses the names Triton's metadata declares. Eight threads share the
    one client (one channel, one event loop) and every answer is the in-process score."""
    inferer = TritonInferer(stack.config.triton_grpc_url, MODEL, "no_such_input",
                            "no_such_output", timeout_s=10.0)
    try:
        instances = [make_instance(300 + k) for k in range(8)]
        batches = [preprocess(ds, TINY_MANIFEST.input)[None] for ds in instances]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(inferer.infer, batches))
        io_ = inferer.io
        assert io_ is not None and io_.input_name != "no_such_input"
        assert io_.output_name != "no_such_output"
        for ds, out in zip(instances, outs, strict=True):
            assert out.shape[0] == 1
            score = activate(out, TINY_MANIFEST.output.activation)[0, 0]
            assert score == pytest.approx(_expected_score(optimized, ds), abs=1e-4)
    finally:
        inferer.close()
