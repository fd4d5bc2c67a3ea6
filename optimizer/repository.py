"""Triton model repository writer: config.pbtxt through Triton's protobuf, manifest beside it.

Layout (Triton's):  <repo>/<model>/config.pbtxt, <repo>/<model>/manifest.json,
                    <repo>/<model>/<version>/model.py + model.onnx
Target ``cpu``: the python backend hosting ONNX Runtime, served by the bundled tritonserver.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.manifest import Manifest

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ServingOptions:
    """Triton scheduling knobs for the generated config."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500
    instances: int = 1
    intra_op_threads: int = 2
    warmup_runs: int = 3


def model_config(manifest: Manifest, options: ServingOptions, precision: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=manifest.name, backend="python",
                         max_batch_size=options.max_batch_size)
    cfg.input.add(name=manifest.input.name, data_type=mc.TYPE_FP32,
                  dims=list(manifest.input.shape))
    cfg.output.add(name=manifest.output.name, data_type=mc.TYPE_FP32,
                   dims=[len(manifest.output.labels)])
    cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(
        [b for b in options.preferred_batch_sizes if b <= options.max_batch_size]
    )
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
    cfg.version_policy.latest.num_versions = 1
    # Warm-up at load: the first clinical request must not pay ONNX Runtime's first-run cost.
    warmup = cfg.model_warmup.add(name="zeros", batch_size=1, count=options.warmup_runs)
    warmup.inputs[manifest.input.name].data_type = mc.TYPE_FP32
    warmup.inputs[manifest.input.name].dims.extend(manifest.input.shape)
    warmup.inputs[manifest.input.name].zero_data = True
    cfg.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
    cfg.parameters["onnx_file"].string_value = "model.onnx"
    cfg.parameters["bedside_precision"].string_value = precision
    return cfg


def write_repository(
    repo: Path, manifest: Manifest, onnx_path: Path, precision: str, options: ServingOptions
) -> Path:
    """Write (or replace) version ``manifest.version`` of the model; returns the model folder."""
    model_dir = repo / manifest.name
    version_dir = model_dir / str(manifest.version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_path, version_dir / "model.onnx")
    backend = resources.files("optimizer.triton_backend").joinpath("model.py")
    (version_dir / "model.py").write_text(backend.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = model_config(manifest, options, precision)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg), encoding="utf-8")
    manifest.save(model_dir / MANIFEST_FILE)
    return model_dir
