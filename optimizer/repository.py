"""Triton model repository writer: config.pbtxt through Triton's protobuf, manifest beside it.

Layout (Triton's):  <repo>/<model>/config.pbtxt, <repo>/<model>/manifest.json,
                    <repo>/<model>/<version>/model.onnx (+ model.py for the cpu target)
Targets:
- ``cpu``: the python backend hosting ONNX Runtime, served by the bundled tritonserver (tested).
- ``gpu-torch``: the python backend running TorchScript with PyTorch on a CUDA GPU, at the
  verified precision, through CUDA graphs when that variant was chosen (``torch_model.py`` and
  ``torch_runner.py`` beside ``model.pt``). Served here only where a GPU is lent; in a cluster
  by an NGC Triton image whose python backend has torch (``-pyt-python-py3``).
- ``gpu``: Triton's onnxruntime backend on a GPU with the TensorRT execution accelerator
  (FP16, or INT8 from the QDQ graph). Only the configuration is produced and checked here: no
  TensorRT or GPU Triton exists on the development machines.
A model that already has versions gets a new version folder; old versions stay.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.contract.manifest import Manifest

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


def io_type(onnx_path: Path) -> int:
    """Triton's data type for the model's I/O: FP16 for FP16-I/O variants, else FP32."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    half = graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    return int(mc.TYPE_FP16 if half else mc.TYPE_FP32)


def model_config(manifest: Manifest, options: ServingOptions, precision: str,
                 target: str = "cpu", data_type: int = mc.TYPE_FP32,
                 cuda_graphs: bool = False) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=manifest.name, max_batch_size=options.max_batch_size)
    cfg.input.add(name=manifest.input.name, data_type=data_type,
                  dims=list(manifest.input.shape))
    cfg.output.add(name=manifest.output.name, data_type=data_type,
                   dims=list(manifest.output_shape))
    if options.max_queue_delay_us > 0 or options.preferred_batch_sizes:
        cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(
            [b for b in options.preferred_batch_sizes if b <= options.max_batch_size])
    cfg.version_policy.latest.num_versions = 1
    # Warm-up at load: the first clinical request must not pay a first-run cost.
    warmup = cfg.model_warmup.add(name="zeros", batch_size=1, count=options.warmup_runs)
    warmup.inputs[manifest.input.name].data_type = data_type
    warmup.inputs[manifest.input.name].dims.extend(manifest.input.shape)
    warmup.inputs[manifest.input.name].zero_data = True
    cfg.parameters["bedside_precision"].string_value = precision
    if target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
        cfg.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
        cfg.parameters["onnx_file"].string_value = "model.onnx"
        # served as benchmarked: subnormal floats flushed to zero (benchmark.flush_denormals)
        cfg.parameters["denormals_as_zero"].string_value = "1"
    elif target == "gpu-torch":
        cfg.backend = "python"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=options.instances)
        cfg.parameters["torch_file"].string_value = "model.pt"
        cfg.parameters["cuda_graphs"].string_value = "true" if cuda_graphs else "false"
    elif target == "gpu":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=options.instances)
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt")
        # the precision that was verified: an FP32 selection is not silently run in FP16
        trt.parameters["precision_mode"] = precision.upper()
        trt.parameters["max_workspace_size_bytes"] = str(2 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
        trt.parameters["trt_engine_cache_path"] = "/tmp/bedside-trt-cache"
    else:
        raise ValueError(f"unknown target {target!r}")
    return cfg


def _write_engine_script(model_dir: Path, manifest: Manifest, options: ServingOptions,
                         precision: str) -> None:
    """The trtexec command that builds a TensorRT plan from a version's ONNX on the target GPU
    node (engines are specific to the TensorRT version and GPU model, so they are built there).
    With the plan built, config.tensorrt_plan.pbtxt replaces config.pbtxt to serve it through
    Triton's tensorrt_plan platform instead of ONNX Runtime's TensorRT accelerator. Not run
    here: no TensorRT on these machines."""
    shape = "x".join(str(d) for d in manifest.input.shape)
    name = manifest.input.name
    shapes = (f"--minShapes={name}:1x{shape} --optShapes={name}:"
              f"{max(options.preferred_batch_sizes, default=1)}x{shape} "
              f"--maxShapes={name}:{options.max_batch_size}x{shape}")
    # INT8 comes from the QDQ graph (explicit quantization: calibration already happened, on
    # CPU, in bedside optimize); FP16 from the FP32 graph.
    flags = "--int8 --fp16" if precision == "int8" else "--fp16"
    script = model_dir / "build_tensorrt_engines.sh"
    script.write_text(
        "#!/bin/sh\n# Build the TensorRT plan on the GPU node that will serve it (untested here:\n"
        "# no TensorRT on the development machines).\nset -e\n"
        'V=${1:?usage: build_tensorrt_engines.sh VERSION}\n'
        f'trtexec --onnx="$V/model.onnx" {flags} {shapes} --saveEngine="$V/model.plan"\n',
        encoding="utf-8")
    script.chmod(0o755)


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def write_repository(
    repo: Path, manifest: Manifest, onnx_path: Path, precision: str, options: ServingOptions,
    target: str = "cpu", cuda_graphs: bool = False,
) -> tuple[Path, int]:
    """Add a version of the model (the manifest's version for a new model, else the next
    free one); returns the model folder and the version written. For ``gpu-torch``,
    ``onnx_path`` is the TorchScript file instead."""
    if target == "gpu-torch":
        return _write_torch_version(repo, manifest, onnx_path, precision, options, cuda_graphs)
    model_dir, version, version_dir = _new_version(repo, manifest)
    shutil.copyfile(onnx_path, version_dir / "model.onnx")
    if target == "cpu":
        backend = resources.files("optimizer.triton_backend").joinpath("model.py")
        (version_dir / "model.py").write_text(backend.read_text(encoding="utf-8"),
                                              encoding="utf-8")
    cfg = model_config(manifest, options, precision, target, io_type(onnx_path))
    if target == "gpu":
        _write_engine_script(model_dir, manifest, options, precision)
        plan = model_config(manifest, options, precision, "gpu", io_type(onnx_path))
        plan.ClearField("backend")
        plan.ClearField("optimization")
        plan.platform = "tensorrt_plan"
        plan.default_model_filename = "model.plan"
        (model_dir / "config.tensorrt_plan.pbtxt").write_text(
            text_format.MessageToString(plan), encoding="utf-8")
    return _finish_version(model_dir, version, manifest, cfg)


def _new_version(repo: Path, manifest: Manifest) -> tuple[Path, int, Path]:
    """The model folder, the version to write (the manifest's for a new model, else the next
    free one) and its freshly made folder."""
    model_dir = repo / manifest.name
    version = manifest.version if not model_dir.is_dir() else max(
        manifest.version, next_version(model_dir))
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    return model_dir, version, version_dir


def _finish_version(model_dir: Path, version: int, manifest: Manifest,
                    cfg: mc.ModelConfig) -> tuple[Path, int]:
    """config.pbtxt and the manifest beside it, once the version's files are in place."""
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg), encoding="utf-8")
    dataclasses.replace(manifest, version=version).save(model_dir / MANIFEST_FILE)
    return model_dir, version


def _write_torch_version(repo: Path, manifest: Manifest, torchscript: Path, precision: str,
                         options: ServingOptions, cuda_graphs: bool) -> tuple[Path, int]:
    model_dir, version, version_dir = _new_version(repo, manifest)
    shutil.copyfile(torchscript, version_dir / "model.pt")
    backend = resources.files("optimizer.triton_backend")
    for src, dst in (("torch_model.py", "model.py"), ("torch_runner.py", "torch_runner.py")):
        (version_dir / dst).write_text(backend.joinpath(src).read_text(encoding="utf-8"),
                                       encoding="utf-8")
    cfg = model_config(manifest, options, precision, "gpu-torch", cuda_graphs=cuda_graphs)
    return _finish_version(model_dir, version, manifest, cfg)
