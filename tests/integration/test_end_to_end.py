"""Real peers end to end: the bundled tritonserver, the gateway, and dcmtk's storescu/echoscu.

Nothing here is faked: Triton serves the optimizer's repository through its python backend,
and the DICOM client is dcmtk (TCP_NODELAY=1, or it stalls ~45 ms per instance).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from optimizer.benchmark import onnx_session, run_onnx
from optimizer.contract.findings import activate
from optimizer.contract.preprocess import preprocess
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.util import dicom_bytes, make_instance

pytestmark = pytest.mark.integration
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"


@pytest.fixture(scope="module")
def stack(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    for tool in (STORESCU, ECHOSCU):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    work = tmp_path_factory.mktemp("stack")
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          work / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    gateway = None
    try:
        gateway = Gateway(GatewayConfig(
            model_repository=optimized / "repository", model_name=TINY_MANIFEST.name,
            triton_grpc_url=triton.grpc_url, spool_dir=work / "spool",
            http_port=free_port(), dicom_port=free_port(), ae_title="BEDSIDE",
        ))
        gateway.start()
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()


def _dcmtk(tool: str, gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [tool, "-v", "-aet", "TESTSCU", "-aec", gw.config.ae_title, gw.config.dicom_host,
         str(gw.config.dicom_port), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )


def _get(gw: Gateway, path: str) -> tuple[int, Any]:
    url = f"http://{gw.config.http_host}:{gw.config.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_dicom(gw: Gateway, data: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://{gw.config.http_host}:{gw.config.http_port}/v1/infer", data=data,
        headers={"Content-Type": "application/dicom"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _study_results(gw: Gateway, study_uid: str, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = _get(gw, f"/v1/studies/{study_uid}/results")
        if status == 200 and len(body["instances"]) >= expected:
            return list(body["instances"])
        time.sleep(0.1)
    raise AssertionError("no results in 30 s")


def _expected_score(optimized: Path, ds: Dataset) -> float:
    """The selected variant run in-process on the same preprocessing: Triton must agree."""
    report = json.loads((optimized / "report.json").read_text())
    selected = next(v for v in report["variants"] if v["name"] == report["selected"])
    x = preprocess(ds, TINY_MANIFEST.input)[None]
    return float(activate(run_onnx(onnx_session(optimized / selected["file"], 1), x),
                          "sigmoid")[0, 0])


def test_echoscu_verification(stack: Gateway) -> None:
    proc = _dcmtk(ECHOSCU, stack)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


def test_storescu_study_gets_results_from_real_triton(
    stack: Gateway, optimized: Path, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(3):
        ds = make_instance(seed=100 + i)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, i
        path = tmp_path / f"i{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    proc = _dcmtk(STORESCU, stack, *map(str, files))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("Received Store Response (Success)") == 3, out
    results = _study_results(stack, study_uid, 3)
    by_sop = {r["sop_instance_uid"]: r for r in results}
    for path in files:
        ds = pydicom.dcmread(path)
        result = by_sop[ds.SOPInstanceUID]
        score = result["findings"][0]["score"]
        assert score == pytest.approx(_expected_score(optimized, ds), abs=1e-4)
        t = result["timings_ms"]
        assert t["total"] >= t["inference"] > 0 and t["gateway_overhead"] >= 0


def _status_line(out: str) -> str:
    return next(line for line in out.splitlines() if "Received Store Response" in line)


def test_non_image_sop_class_refused_over_dimse(stack: Gateway, tmp_path: Path) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.Modality = "SR"
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    out = _dcmtk(STORESCU, stack, str(tmp_path / "sr.dcm"))
    text = out.stdout + out.stderr
    assert "(Refused: SOPClassNotSupported)" in _status_line(text), text  # 0x0122
    assert _dcmtk(ECHOSCU, stack).returncode == 0  # still serving


def test_image_without_pixel_data_refused_over_dimse(stack: Gateway, tmp_path: Path) -> None:
    ds = make_instance(seed=7)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    out = _dcmtk(STORESCU, stack, str(tmp_path / "nopix.dcm"))
    text = out.stdout + out.stderr
    assert "(Error: DataSetDoesNotMatchSOPClass)" in _status_line(text), text  # 0xA900


def test_rest_bad_inputs_then_good_one(stack: Gateway) -> None:
    import io

    good = make_instance(seed=9)
    buf = io.BytesIO()
    good.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    status, body = _post_dicom(stack, data[: len(data) // 3])
    assert status == 400 and body["error"]["message"]
    no_pixels = make_instance(seed=10)
    del no_pixels.PixelData
    buf2 = io.BytesIO()
    no_pixels.save_as(buf2, enforce_file_format=True)
    status, body = _post_dicom(stack, buf2.getvalue())
    assert status == 400 and "Pixel Data" in body["error"]["message"]
    status, body = _post_dicom(stack, data)
    assert status == 200
    assert np.isfinite(body["findings"][0]["score"])
    status, ready = _get(stack, "/readyz")
    assert status == 200 and ready == {"ready": True}


def _send_file_as_is(gw: Gateway, path: Path) -> int:
    """pynetdicom as the sending peer, sending the file's data-set bytes exactly as they are
    on disk (no re-encoding): the way to deliver a damaged file that dcmtk would not load."""
    ae = pynetdicom.AE(ae_title="TESTSCU")
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate(gw.config.dicom_host, gw.config.dicom_port, ae_title=gw.config.ae_title)
    assert assoc.is_established
    chunked = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, not re-encoded
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _rewrite(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


def test_bad_file_corpus_over_dimse_gets_the_right_statuses_and_the_gateway_keeps_serving(
    stack: Gateway, tmp_path: Path
) -> None:
    """Truncated, wrong VR, no pixel data, SOP class mismatch, absurd size: each refused with
    its DIMSE status; a compressed syntax nothing decodes (MPEG-2) is rejected at association
    while a supported one (JPEG-LS) is inferred; then a good file still works."""
    good = make_instance(seed=40)
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    data = (tmp_path / "good.dcm").read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00" + int(good.Rows).to_bytes(2, "little")
    corpus = {
        "truncated": data[: len(data) * 2 // 3],
        # Rows (0028,0010) with VR "DA" instead of "US": two bytes that are no date.
        "wrong_vr": _rewrite(data, rows, b"\x28\x00\x10\x00DA" + rows[6:]),
        # 65535 x 65535 pixels declared: refused on the header, before any decoding.
        "absurd_size": _rewrite(data, rows, rows[:8] + b"\xff\xff").replace(
            b"\x28\x00\x11\x00US\x02\x00" + int(good.Columns).to_bytes(2, "little"),
            b"\x28\x00\x11\x00US\x02\x00\xff\xff"),
    }
    no_pixels = make_instance(seed=41)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm", enforce_file_format=True)
    # Announced (file meta, hence the C-STORE request) as CT Image Storage; the data set is CR.
    cr, ct = b"1.2.840.10008.5.1.4.1.1.1\0", b"1.2.840.10008.5.1.4.1.1.2\0"
    mismatch = dicom_bytes(make_instance(seed=42))
    (tmp_path / "mismatch.dcm").write_bytes(mismatch.replace(cr, ct, 1))
    for name, blob in corpus.items():
        (tmp_path / f"{name}.dcm").write_bytes(blob)
    expected = {"truncated": 0xC000, "wrong_vr": 0xC000, "absurd_size": 0xC000,
                "no_pixels": 0xA900, "mismatch": 0xA900}
    got = {name: _send_file_as_is(stack, tmp_path / f"{name}.dcm") for name in expected}
    assert got == expected

    # Compressed: JPEG-LS is decoded and inferred; MPEG-2 (no decoder) is not offered.
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run(["/usr/bin/dcmcjpls", str(tmp_path / "good.dcm"), str(tmp_path / "jls.dcm")],
                   check=True, env=env)
    out = _dcmtk(STORESCU, stack, "-xt", str(tmp_path / "jls.dcm"))  # propose JPEG-LS
    assert "Received Store Response (Success)" in out.stdout + out.stderr, out.stdout + out.stderr
    ae = pynetdicom.AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.4.100")
    assoc = ae.associate(stack.config.dicom_host, stack.config.dicom_port,
                         ae_title=stack.config.ae_title)
    try:  # the one context offered (CR in MPEG-2) is rejected: nothing can be sent
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()

    assert _send_file_as_is(stack, tmp_path / "good.dcm") == 0x0000
    results = _study_results(stack, str(good.StudyInstanceUID), 1)
    assert all("error" not in r for r in results) and len(results) == 1
    assert _dcmtk(ECHOSCU, stack).returncode == 0


def test_dcmcjpeg_lossless_and_12_bit_extended_over_storescu_stow_and_rest_with_real_triton(
    stack: Gateway, optimized: Path, tmp_path: Path
) -> None:
    """JPEG Lossless SV1 and 12-bit JPEG Extended written by dcmtk's dcmcjpeg, sent by dcmtk's
    storescu (-xs, -xx), JPEG Lossless process 14 by pynetdicom, then over STOW-RS and REST:
    all inferred; lossless scores equal those of the uncompressed pixels, extended ones those
    of dcmtk's own decoding (dcmdjpeg)."""
    from dicomweb_client.api import DICOMwebClient

    from tests.optimizer.pixel_data import dcmcjpeg, dcmdjpeg

    study, series = generate_uid(), generate_uid()
    expected: dict[str, float] = {}
    files: dict[str, Path] = {}
    for k, process in enumerate(["+e1", "+ee", "+el", "+e1", "+ee"]):
        ds = make_instance(seed=500 + k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        path = tmp_path / f"j{k}.dcm"
        sent = dcmcjpeg(ds, path, process)  # lossy: dcmcjpeg gives it a new SOP Instance UID
        assert sent.StudyInstanceUID == study
        reference = ds if process != "+ee" else dcmdjpeg(path)
        expected[str(sent.SOPInstanceUID)] = _expected_score(optimized, reference)
        files[f"{process}-{k}"] = path
    sv1 = _dcmtk(STORESCU, stack, "-xs", str(files["+e1-0"]))
    ext = _dcmtk(STORESCU, stack, "-xx", str(files["+ee-1"]))
    for out in (sv1, ext):
        assert "Received Store Response (Success)" in out.stdout + out.stderr, out.stdout
    assert "JPEG Lossless" in sv1.stdout + sv1.stderr  # the context really was JPEG
    assert _send_file_as_is(stack, files["+el-2"]) == 0x0000  # process 14, as dcmcjpeg wrote it
    stow = DICOMwebClient(
        url=f"http://{stack.config.http_host}:{stack.config.http_port}/dicomweb")
    stow.store_instances([pydicom.dcmread(files["+e1-3"])])
    status, body = _post_dicom(stack, files["+ee-4"].read_bytes())
    assert status == 200, body
    assert body["findings"][0]["score"] == pytest.approx(
        expected[body["sop_instance_uid"]], abs=1e-4)
    results = _study_results(stack, study, 5)
    assert {r["sop_instance_uid"] for r in results} == set(expected)
    for r in results:
        assert r["findings"][0]["score"] == pytest.approx(expected[r["sop_instance_uid"]],
                                                          abs=1e-4)
