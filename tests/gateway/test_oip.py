"""Open Inference Protocol v2 edges, called by stock tritonclient (HTTP and gRPC) against a
running gateway whose Triton edge is faked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from services.gateway.app import Gateway
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway
from tests.gateway.util import dicom_bytes, make_instance

MODEL = TINY_MANIFEST.name


@pytest.fixture()
def fake_triton() -> FakeInferer:
    return FakeInferer()


@pytest.fixture()
def gateway(tmp_path: Path, fake_triton: FakeInferer) -> Iterator[Gateway]:
    gw = fake_gateway(tmp_path, fake_triton, max_request_bytes=1024 * 1024)
    yield gw
    gw.stop()


def _http(gw: Gateway) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"{gw.config.http_host}:{gw.config.http_port}")


def _grpc(gw: Gateway) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"{gw.config.http_host}:{gw.config.grpc_port}")


def _input(module, files: list[bytes], binary: bool = True):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("DICOM", [len(files)], "BYTES")
    data = np.array(files, dtype=np.object_)
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_health_and_metadata_with_fake_triton(
    gateway: Gateway, module  # type: ignore[no-untyped-def]
) -> None:
    client = _http(gateway) if module is httpclient else _grpc(gateway)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = (client.get_model_metadata(MODEL) if module is httpclient
            else client.get_model_metadata(MODEL, as_json=True))
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("DICOM", "BYTES")]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("SCORES", "FP32"), ("FINDINGS_JSON", "BYTES")]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert ("404" if module is httpclient else "NOT_FOUND") in str(info.value.status())


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_infer_returns_scores_and_findings_with_fake_triton(
    gateway: Gateway, module  # type: ignore[no-untyped-def]
) -> None:
    client = _http(gateway) if module is httpclient else _grpc(gateway)
    instances = [make_instance(1), make_instance(2)]
    files = [dicom_bytes(ds) for ds in instances]
    outputs = [module.InferRequestedOutput("SCORES"), module.InferRequestedOutput("FINDINGS_JSON")]
    result = client.infer(MODEL, [_input(module, files)], outputs=outputs)
    scores = result.as_numpy("SCORES")
    assert scores.shape == (2, 1) and scores.dtype == np.float32
    docs = [json.loads(d) for d in result.as_numpy("FINDINGS_JSON")]
    assert [d["sop_instance_uid"] for d in docs] == [ds.SOPInstanceUID for ds in instances]
    assert scores[:, 0].tolist() == pytest.approx([d["findings"][0]["score"] for d in docs],
                                                  abs=1e-6)
    # results are also stored for the study API
    r = httpx.get(f"{base_url(gateway)}/v1/studies/{instances[0].StudyInstanceUID}/results")
    assert r.status_code == 200 and r.json()["status"] == "done"


def test_http_json_outputs_when_not_asked_for_binary_with_fake_triton(gateway: Gateway) -> None:
    result = _http(gateway).infer(
        MODEL, [_input(httpclient, [dicom_bytes(make_instance(3))])],
        outputs=[httpclient.InferRequestedOutput("SCORES", binary_data=False)])
    assert result.get_output("SCORES")["data"]  # JSON form
    assert result.as_numpy("SCORES").shape == (1, 1)
    assert result.as_numpy("FINDINGS_JSON") is None  # only what was asked for


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_errors_map_to_protocol_codes_with_fake_triton(
    gateway: Gateway, fake_triton: FakeInferer, module  # type: ignore[no-untyped-def]
) -> None:
    client = _http(gateway) if module is httpclient else _grpc(gateway)
    good = dicom_bytes(make_instance(1))
    no_pixels = make_instance(2)
    del no_pixels.PixelData

    def status_of(model: str, tensor, outputs=None) -> str:  # type: ignore[no-untyped-def]
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [tensor], outputs=outputs)
        assert info.value.message()
        return str(info.value.status())

    expect = {httpclient: {"bad": "400", "missing": "404", "down": "503", "fail": "502"},
              grpcclient: {"bad": "INVALID_ARGUMENT", "missing": "NOT_FOUND",
                           "down": "UNAVAILABLE", "fail": "INTERNAL"}}[module]
    assert expect["missing"] in status_of("no-such-model", _input(module, [good]))
    assert expect["bad"] in status_of(MODEL, _input(module, [b"not dicom" * 20]))
    assert expect["bad"] in status_of(MODEL, _input(module, [dicom_bytes(no_pixels)]))
    wrong = module.InferInput("IMAGE", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([good], dtype=np.object_))
    assert expect["bad"] in status_of(MODEL, wrong)
    fp32 = module.InferInput("DICOM", [1], "FP32")
    fp32.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    assert expect["bad"] in status_of(MODEL, fp32)
    assert expect["bad"] in status_of(MODEL, _input(module, [good]),
                                      [module.InferRequestedOutput("NOPE")])
    fake_triton.unavailable_calls = 1
    assert expect["down"] in status_of(MODEL, _input(module, [good]))
    fake_triton.fail_permanently = True
    assert expect["fail"] in status_of(MODEL, _input(module, [good]))
    fake_triton.fail_permanently = False
    assert client.infer(MODEL, [_input(module, [good])]).as_numpy("SCORES").shape == (1, 1)


def test_oversized_requests_are_refused(gateway: Gateway) -> None:
    big = b"\0" * (2 * 1024 * 1024)
    with pytest.raises(InferenceServerException) as info:
        _grpc(gateway).infer(MODEL, [_input(grpcclient, [big])])
    assert "RESOURCE_EXHAUSTED" in str(info.value.status())
    with pytest.raises(InferenceServerException) as info:
        _http(gateway).infer(MODEL, [_input(httpclient, [big])])
    assert "413" in str(info.value.status())


def test_http_json_bytes_input_is_refused_clearly(gateway: Gateway) -> None:
    r = httpx.post(f"{base_url(gateway)}/v2/models/{MODEL}/infer", json={
        "inputs": [{"name": "DICOM", "datatype": "BYTES", "shape": [1], "data": ["abc"]}]})
    assert r.status_code == 400 and "binary tensor data extension" in r.json()["error"]
    r = httpx.post(f"{base_url(gateway)}/v2/models/{MODEL}/infer", content=b"{not json",
                   headers={"Inference-Header-Content-Length": "9"})
    assert r.status_code == 400


def test_oip_metrics_have_protocol_labels(gateway: Gateway) -> None:
    good = dicom_bytes(make_instance(1))
    _http(gateway).infer(MODEL, [_input(httpclient, [good])])
    _grpc(gateway).infer(MODEL, [_input(grpcclient, [good])])
    text = httpx.get(f"{base_url(gateway)}/metrics").text
    for protocol in ("oip_rest", "oip_grpc"):
        assert (f'bedside_gateway_requests_total{{outcome="inferred",protocol="{protocol}",'
                f'reason="ok"}} 1.0') in text


def test_files_written_without_preamble_are_accepted_with_fake_triton(gateway: Gateway) -> None:
    import io

    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, make_instance(8))  # starts at the File Meta group, no "DICM"
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    result = _grpc(gateway).infer(MODEL, [_input(grpcclient, [data])])
    assert result.as_numpy("SCORES").shape == (1, 1)
