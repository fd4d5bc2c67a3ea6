"""The ``gpu-torch`` target: PyTorch on a CUDA GPU, in FP32, FP16 and BF16, with CUDA graphs.

The model is traced once to TorchScript (``model.pt``, FP32 weights, on the CPU); every variant
loads that file, so what is verified and benchmarked is exactly what Triton serves. A variant
is a precision plus eager or CUDA-graph execution, run by
``optimizer/triton_backend/torch_runner.py`` both here and inside Triton's python backend.

What is not here: TensorRT (not on the development or lent machines) and torch.compile (its
compiled kernels would need a C toolchain and a compile cache inside the serving image; CUDA
graphs remove the same launch overhead that dominates batch-1 latency, without either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimizer.benchmark import BenchOptions, Profile, sweep
from optimizer.contract.errors import BedsideError
from optimizer.contract.manifest import Manifest
from optimizer.errors import ExportError
from optimizer.triton_backend.torch_runner import TorchRunner, load_torchscript

RUNTIME = "torch-cuda"
GPU_PRECISIONS = ("fp32", "fp16", "bf16")


class TargetUnavailable(BedsideError):
    """The requested target cannot run on this machine (e.g. no CUDA GPU)."""


@dataclass(frozen=True)
class GpuVariant:
    precision: str
    cuda_graphs: bool

    @property
    def name(self) -> str:
        return f"torch-cuda-{self.precision}" + ("-graphs" if self.cuda_graphs else "")


def require_cuda() -> str:
    """The device name, or TargetUnavailable saying why the target cannot run here."""
    if not torch.cuda.is_available():
        raise TargetUnavailable(
            "--target gpu-torch needs a CUDA GPU visible to PyTorch, and this machine has none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use --target cpu here, or run on a GPU node")
    return torch.cuda.get_device_name(0)


def device_info() -> dict[str, str]:
    """What the report says about the GPU (name, driver-visible CUDA, capability)."""
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "cuda": str(torch.version.cuda),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": f"{props.total_memory / 2**30:.1f}",
            "cudnn": str(torch.backends.cudnn.version())}


def variants(precisions: tuple[str, ...]) -> list[GpuVariant]:
    """Eager and CUDA-graph execution for each requested GPU precision, FP32 eager first (the
    baseline every speed-up is quoted against)."""
    wanted = [p for p in GPU_PRECISIONS if p in precisions]
    return [GpuVariant(p, graphs) for p in wanted for graphs in (False, True)]


def trace(model: nn.Module, manifest: Manifest, path: Path) -> Path:
    """TorchScript of the FP32 model, traced on the CPU with a batch of two (the batch axis must
    stay free), and checked against the eager model on a batch of three."""
    model = model.eval().cpu()
    example = torch.randn(2, *manifest.input.shape)
    try:
        with torch.inference_mode():
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
        traced.save(str(path))
        check = torch.randn(3, *manifest.input.shape)
        with torch.inference_mode():
            ref = model(check)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            got = load_torchscript(str(path), "cpu")(check)
            got = got[0] if isinstance(got, (tuple, list)) else got
    except Exception as exc:  # tracing raises whatever the model's code raises
        raise ExportError(f"the model does not trace to TorchScript: {exc}") from exc
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
        raise ExportError("the traced model disagrees with the eager model on a batch of three "
                          "(data-dependent control flow?)")
    return path


def make_runner(path: Path, manifest: Manifest, variant: GpuVariant,
                max_batch: int) -> TorchRunner:
    return TorchRunner(load_torchscript(str(path), "cuda"), manifest.input.shape,
                       variant.precision, device="cuda", cuda_graphs=variant.cuda_graphs,
                       max_batch=max_batch)


def run_runner(runner: TorchRunner, inputs: np.ndarray) -> np.ndarray:
    """Outputs for every input, in chunks of the runner's largest batch, as FP32 numpy."""
    step = runner.max_batch
    parts = [runner(torch.from_numpy(np.ascontiguousarray(inputs[i:i + step]))).numpy()
             for i in range(0, len(inputs), step)]
    return np.concatenate(parts).astype(np.float32)


def profile_runner(runner: TorchRunner, sample: np.ndarray, opts: BenchOptions) -> Profile:
    """Latency from a host array to a host array (copies included, as the served path pays
    them), batch 1, 2, 4, ... ``runner.max_batch``. Peak memory is what PyTorch had allocated
    on the GPU at its peak (weights, graph pools, activations): free other runners first."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def make(batch: int) -> Callable[[], object]:
        x = torch.from_numpy(np.repeat(sample[:1], batch, axis=0)).pin_memory()
        return lambda: runner(x)  # returns on the host: the copy back synchronizes

    points = sweep(make, BenchOptions(warmup=opts.warmup, min_runs=opts.min_runs,
                                      min_seconds=opts.min_seconds,
                                      max_batch=min(opts.max_batch, runner.max_batch),
                                      min_gain=opts.min_gain))
    return Profile(points=tuple(points), peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20)
