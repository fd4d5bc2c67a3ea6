"""``bedside demo``: the whole path on embedded defaults, all local, nothing downloaded.

synthesize DICOM -> train a small MONAI DenseNet -> optimize (ONNX Runtime FP32, FP16, INT8
QDQ; OpenVINO FP32, BF16, INT8; verify, benchmark, select) -> real Triton on the repository ->
gateway -> one study by C-STORE and one image by REST -> findings with the latency split. A
second version of the model (a copy of the first) runs in shadow beside it, loaded through
Triton's explicit model control: its results are compared, never returned.
Everything started is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE

from optimizer import checkpoint
from optimizer.contract.manifest import AccuracyBudget, InputSpec, Manifest, Normalize, OutputSpec
from optimizer.dataset import load_labelled
from optimizer.ov_options import OV_PRECISIONS
from optimizer.pipeline import OptimizeRequest, optimize
from optimizer.synthetic import CR_IMAGE_STORAGE, write_labelled_set, write_study
from optimizer.train import DEMO_ARCHITECTURE, DEMO_KWARGS, train_classifier
from services.errors import ServiceError
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

LOG = logging.getLogger(__name__)

DEMO_MANIFEST = Manifest(
    name="cxr-lesion",
    version=1,
    task="classification",
    input=InputSpec(name="image", modalities=("CR", "DX"), height=128, width=128, channels=1,
                    window=None, normalize=Normalize(mean=0.4, std=0.2)),
    output=OutputSpec(name="logits", labels=("lesion",), activation="sigmoid",
                      thresholds=(0.5,)),
    accuracy_budget=AccuracyBudget(max_auc_drop=0.005, min_agreement=0.99),
    latency_slo_ms=50.0,
)


@dataclass(frozen=True)
class DemoSizes:
    train: int = 1600
    validation: int = 400
    calibration: int = 64
    epochs: int = 12

    @classmethod
    def quick(cls) -> DemoSizes:
        """For smoke tests: the same path on little data (the model learns little)."""
        return cls(train=64, validation=40, calibration=16, epochs=1)


def _http_json(url: str, body: bytes | None = None,
               content_type: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # loopback only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def c_store(paths: list[Path], host: str, port: int, ae_title: str) -> list[int]:
    """Send files as a modality would (one association); returns the DIMSE statuses."""
    ae = AE(ae_title="DEMO_MODALITY")
    ae.add_requested_context(CR_IMAGE_STORAGE)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise ServiceError("the gateway refused the DICOM association")
    statuses = []
    try:
        for path in paths:
            rsp = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def wait_for_study(base_url: str, study_uid: str, expected: int,
                   timeout_s: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = _http_json(f"{base_url}/v1/studies/{study_uid}/results")
        if status == 200 and len(body["instances"]) >= expected:
            return list(body["instances"])
        time.sleep(0.1)
    raise ServiceError(f"no results for the study after {timeout_s:.0f}s")


def _print_result(title: str, result: dict[str, Any]) -> None:
    t = result["timings_ms"]
    f = ", ".join(
        f"{x['label']}={'POSITIVE' if x['positive'] else 'negative'} "
        f"(score {x['score']:.3f}, threshold {x['threshold']})" for x in result["findings"])
    print(f"  {title}: {f}")
    print(f"    latency ms: gateway overhead {t['gateway_overhead']:.2f} | preprocess "
          f"{t['preprocess']:.2f} | inference {t['inference']:.2f} | total {t['total']:.2f}")


def _print_shadow(gateway: Gateway) -> None:
    """The shadow version's agreement with the primary (``bedside models status`` says the
    same of a running gateway)."""
    for model in gateway.model_versions.status():
        for pair in model["agreement"]:
            for label, s in pair["labels"].items():
                print(f"  shadow version {pair['candidate']} of {model['name']}: {label} "
                      f"decisions agree with version {pair['baseline']} on "
                      f"{s['agreement']:.0%} of {s['comparisons']} inputs (budget "
                      f"{model['accuracy_budget']['min_agreement']:.0%}); its results were "
                      "stored apart, never returned or delivered")


def run_demo(out: Path, triton_env: Path, sizes: DemoSizes, threads: int = 2) -> int:
    start = time.perf_counter()
    install = TritonInstall.discover(triton_env)  # fail before minutes of training
    data, model_dir = out / "data", out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)

    print(f"[1/5] synthesizing DICOM under {data}")
    write_labelled_set(data / "train", sizes.train, seed=1)
    write_labelled_set(data / "validation", sizes.validation, seed=2)
    write_labelled_set(data / "calibration", sizes.calibration, seed=3)
    study = write_study(data / "study", instances=2, lesion=True, seed=4)
    rest_image = write_study(data / "rest", instances=1, lesion=False, seed=5)[0]

    print(f"[2/5] training a small MONAI DenseNet ({sizes.train} images, {sizes.epochs} epochs)")
    DEMO_MANIFEST.save(model_dir / "manifest.json")
    trained = train_classifier(load_labelled(data / "train", DEMO_MANIFEST),
                               epochs=sizes.epochs, seed=0)
    checkpoint.save(model_dir / "model.pt", DEMO_ARCHITECTURE, DEMO_KWARGS, trained)

    print("[3/5] optimizing: ONNX Runtime FP32, FP16 and INT8, OpenVINO FP32, BF16 and INT8, "
          "verified and benchmarked")
    result = optimize(OptimizeRequest(
        checkpoint=model_dir / "model.pt", manifest=model_dir / "manifest.json",
        calibration_dir=data / "calibration", validation_dir=data / "validation",
        out_dir=out, threads=threads, openvino=OV_PRECISIONS,
    ))
    print(result.report_md.read_text(encoding="utf-8"))

    print("[4/5] starting Triton Inference Server and the gateway (a copy of the model as "
          "version 2, in shadow)")
    run_dir = out / "run"
    # served from a copy: the optimizer's repository (what a user deploys, and what
    # loadtests.bench serves) keeps its one version
    served = run_dir / "repository"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(result.repository, served)
    model_folder = served / DEMO_MANIFEST.name
    primary = Manifest.load(model_folder / "manifest.json").version
    shadow = primary + 1
    shutil.copytree(model_folder / str(primary), model_folder / str(shadow))
    triton = TritonServer(install, served, run_dir / "triton",
                          TritonPorts(free_port(), free_port(), free_port()),
                          explicit_models=True)  # the gateway loads versions 1 and 2
    gateway: Gateway | None = None
    try:
        triton.start()
        config = GatewayConfig(
            model_repository=served, model_name=DEMO_MANIFEST.name,
            triton_grpc_url=triton.grpc_url, spool_dir=run_dir / "spool",
            http_port=free_port(), dicom_port=free_port(),
            shadow_versions=(f"{DEMO_MANIFEST.name}={shadow}",),
        )
        gateway = Gateway(config)
        gateway.start()
        base = f"http://{config.http_host}:{config.http_port}"

        print("[5/5] sending one study by DICOM C-STORE and one image by REST")
        statuses = c_store(study, config.dicom_host, config.dicom_port, config.ae_title)
        print(f"  C-STORE statuses: {', '.join(f'0x{s:04X}' for s in statuses)}")
        study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
        for i, res in enumerate(wait_for_study(base, study_uid, len(study)), 1):
            _print_result(f"C-STORE study, instance {i}", res)
        status, body = _http_json(f"{base}/v1/infer", rest_image.read_bytes(),
                                  "application/dicom")
        if status != 200:
            raise ServiceError(f"REST inference failed with HTTP {status}: {body}")
        _print_result("REST image", body)
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            samples = sum(1 for line in resp.read().decode().splitlines()
                          if line.startswith("bedside_gateway_stage_seconds_count"))
        print(f"  {base}/metrics serves {samples} stage-latency histograms")
        _print_shadow(gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()
    print(f"demo finished in {time.perf_counter() - start:.0f}s; report: {result.report_md}")
    return 0
