"""Triton repository layout for an OpenVINO variant, served two ways from one model folder:

- locally (and by the triton-cpu image): ``config.pbtxt`` runs the python backend hosting
  OpenVINO (optimizer/triton_backend/openvino_model.py, copied as ``<version>/model.py``), as
  the bundled tritonserver has no openvino backend;
- in a cluster, on the stock NGC Triton image the chart runs (24.10, which ships Triton's
  ``openvino`` backend built against OpenVINO 2024.0.0): ``configs/openvino.pbtxt``, picked
  with ``tritonserver --model-config-name=openvino`` (Triton's custom model configuration),
  loads ``<version>/model.xml`` with the openvino backend. Only the parameters that backend
  release parses are written (INFERENCE_NUM_THREADS, NUM_STREAMS, PERFORMANCE_HINT, HINT_BF16).

``ir_check`` says whether an IR can load in that OpenVINO release: IR version 10 or 11 and no
operation newer than opset14 (OpenVINO 2024.0's operation set).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.contract.manifest import Manifest
from optimizer.repository import MANIFEST_FILE, ServingOptions, model_config, next_version

CLUSTER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
CLUSTER_OPENVINO = "2024.0.0"  # Triton 24.10 (2.51.0) build map: standalone OpenVINO
CLUSTER_MAX_OPSET = 14  # the operation set OpenVINO 2024.0 introduced
CLUSTER_IR_VERSIONS = (10, 11)
CLUSTER_CONFIG_NAME = "openvino"  # --model-config-name; file: configs/openvino.pbtxt
_OPSET = re.compile(r"^opset(\d+)$")


def ir_check(xml: Path) -> dict[str, Any]:
    """Whether the cluster's OpenVINO release can load this IR, and why not."""
    text = xml.read_text(encoding="utf-8")
    net = re.search(r"<net\b[^>]*\bversion=\"(\d+)\"", text)
    ir_version = int(net.group(1)) if net else None
    newest = 0
    problems = []
    for op_type, version in sorted(set(re.findall(
            r"<layer\b[^>]*\btype=\"(\w+)\"[^>]*\bversion=\"([\w.]+)\"", text))):
        match = _OPSET.match(version)
        if match is None:
            problems.append(f"{op_type} comes from '{version}', not a standard operation set")
            continue
        newest = max(newest, int(match.group(1)))
        if int(match.group(1)) > CLUSTER_MAX_OPSET:
            problems.append(f"{op_type} needs {version} (OpenVINO {CLUSTER_OPENVINO} has up to "
                            f"opset{CLUSTER_MAX_OPSET})")
    if ir_version not in CLUSTER_IR_VERSIONS:
        problems.insert(0, f"IR version {ir_version} (OpenVINO {CLUSTER_OPENVINO} reads "
                           f"{', '.join(map(str, CLUSTER_IR_VERSIONS))})")
    return {"triton_image": CLUSTER_IMAGE, "openvino": CLUSTER_OPENVINO,
            "ir_version": ir_version, "newest_opset": newest, "loads": not problems,
            "problems": problems}


def _copy_ir(xml: Path, version_dir: Path) -> None:
    version_dir.mkdir(parents=True)
    shutil.copyfile(xml, version_dir / "model.xml")
    shutil.copyfile(xml.with_suffix(".bin"), version_dir / "model.bin")


def python_backend_config(manifest: Manifest, options: ServingOptions, precision: str,
                          ov_params: dict[str, str]) -> mc.ModelConfig:
    cfg = model_config(manifest, options, precision, "cpu")
    del cfg.parameters["onnx_file"]
    del cfg.parameters["intra_op_threads"]  # INFERENCE_NUM_THREADS below
    cfg.parameters["openvino_file"].string_value = "model.xml"
    for key, value in ov_params.items():
        cfg.parameters[key].string_value = value
    cfg.parameters["bedside_runtime"].string_value = "openvino-cpu"
    return cfg


def cluster_config(manifest: Manifest, options: ServingOptions, precision: str,
                   ov_params: dict[str, str]) -> mc.ModelConfig:
    """The NGC image's openvino backend config (OpenVINO 2024.0 parameter names)."""
    cfg = model_config(manifest, options, precision, "cpu")
    cfg.ClearField("parameters")
    cfg.backend = "openvino"
    cfg.default_model_filename = "model.xml"
    cfg.parameters["INFERENCE_NUM_THREADS"].string_value = ov_params["INFERENCE_NUM_THREADS"]
    cfg.parameters["NUM_STREAMS"].string_value = ov_params["NUM_STREAMS"]
    cfg.parameters["PERFORMANCE_HINT"].string_value = ov_params["PERFORMANCE_HINT"]
    if ov_params["INFERENCE_PRECISION_HINT"] == "bf16":
        cfg.parameters["HINT_BF16"].string_value = "YES"
    cfg.parameters["bedside_precision"].string_value = precision
    return cfg


def write_openvino_repository(repo: Path, manifest: Manifest, xml: Path, precision: str,
                              options: ServingOptions, ov_params: dict[str, str],
                              ) -> tuple[Path, int]:
    """Add a version holding the IR (+ the python-backend model.py), the local config and the
    cluster config; returns the model folder and the version written."""
    model_dir = repo / manifest.name
    version = manifest.version if not model_dir.is_dir() else max(
        manifest.version, next_version(model_dir))
    version_dir = model_dir / str(version)
    _copy_ir(xml, version_dir)
    backend = resources.files("optimizer.triton_backend").joinpath("openvino_model.py")
    (version_dir / "model.py").write_text(backend.read_text(encoding="utf-8"), encoding="utf-8")
    local = python_backend_config(manifest, options, precision, ov_params)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(local), encoding="utf-8")
    (model_dir / "configs").mkdir(exist_ok=True)
    cluster = cluster_config(manifest, options, precision, ov_params)
    (model_dir / "configs" / f"{CLUSTER_CONFIG_NAME}.pbtxt").write_text(
        text_format.MessageToString(cluster), encoding="utf-8")
    dataclasses.replace(manifest, version=version).save(model_dir / MANIFEST_FILE)
    return model_dir, version


def drop_cluster_config(repo: Path, manifest: Manifest) -> None:
    """Remove the cluster config an earlier OpenVINO version left: the new version is not IR."""
    (repo / manifest.name / "configs" / f"{CLUSTER_CONFIG_NAME}.pbtxt").unlink(missing_ok=True)
