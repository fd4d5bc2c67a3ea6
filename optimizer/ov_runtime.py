"""OpenVINO on CPU: the one module that imports it, with telemetry off; compile with the
user's threads / streams / performance hint, run, profile, and say which kernels ran.

Telemetry: ``openvino`` and ``nncf`` both depend on ``openvino-telemetry``, which sends usage
events unless the user opted out. Nothing may leave the machine, so before either is imported
the telemetry module is made unimportable in this process; both then fall back to their own
no-op stubs (``openvino.tools.ovc`` and ``nncf.telemetry`` catch the ImportError).

Precision: the CPU plugin runs FP32 models in BF16 by default on CPUs with native BF16 (AMX,
AVX-512 BF16); a variant verified as FP32 must run as FP32, so the inference precision is
always set explicitly.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.benchmark import BenchOptions, Contender, PeakMemory, Profile, sweep
from optimizer.errors import QuantizationError
from optimizer.ov_options import OvOptions

LOG = logging.getLogger(__name__)

RUNTIME = "openvino-cpu"


def _block_telemetry() -> None:
    """Make ``openvino_telemetry`` unimportable (a None entry in sys.modules raises
    ImportError on import); refuse to go on if something already imported it."""
    loaded = sys.modules.get("openvino_telemetry", None)
    if loaded is not None:
        raise QuantizationError("openvino_telemetry was imported before Bedside could turn it "
                                "off; telemetry would be sent, so OpenVINO is not used")
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


def openvino() -> Any:
    """The ``openvino`` module, imported with telemetry off; QuantizationError if absent."""
    _block_telemetry()
    try:
        import openvino as ov
    except ImportError as exc:
        raise QuantizationError(f"OpenVINO is not installed ({exc}): pip install openvino, "
                                "or bedside[optimizer]") from exc
    return ov


def nncf() -> Any:
    """The ``nncf`` module, imported with telemetry off."""
    _block_telemetry()
    try:
        import nncf as nncf_module
    except ImportError as exc:
        raise QuantizationError(f"NNCF is not installed ({exc}): pip install nncf") from exc
    return nncf_module


def available() -> str | None:
    """None when OpenVINO can be used here, else why not."""
    try:
        openvino()
    except QuantizationError as exc:
        return str(exc)
    return None


def capabilities() -> tuple[str, ...]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8)."""
    return tuple(openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def versions() -> dict[str, str]:
    """openvino and nncf versions where installed (for the report)."""
    found: dict[str, str] = {}
    try:
        found["openvino"] = str(openvino().get_version()).split("-")[0]
        found["nncf"] = str(nncf().__version__)
    except QuantizationError:
        pass
    return found


def read(path: Path) -> Any:
    """An ov.Model from ONNX or IR (model.xml beside model.bin)."""
    try:
        return openvino().Core().read_model(str(path))
    except QuantizationError:
        raise
    except Exception as exc:  # OpenVINO raises RuntimeError with the frontend's message
        raise QuantizationError(f"OpenVINO cannot read {path.name}: {exc}") from exc


def save(model: Any, folder: Path) -> Path:
    """model.xml + model.bin in ``folder``, weights as they are (no FP16 compression)."""
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "model.xml"
    openvino().save_model(model, str(xml), compress_to_fp16=False)
    return xml


def compile_model(model: Any, precision: str, options: OvOptions,
                  flush_denormals: bool = False) -> Any:
    """Compile for the CPU with explicit precision, threads, streams and hint;
    ``flush_denormals`` for timing beside a PyTorch that flushes them (benchmark.measure)."""
    properties = options.properties(precision)
    if flush_denormals:
        properties["CPU_DENORMALS_OPTIMIZATION"] = True
    try:
        return openvino().Core().compile_model(model, "CPU", properties)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"OpenVINO cannot compile the {precision} model: {exc}") from exc


def run(compiled: Any, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    request = compiled.create_infer_request()
    parts = []
    for i in range(0, len(inputs), batch):
        result = request.infer([np.ascontiguousarray(inputs[i : i + batch])])
        parts.append(np.array(result[compiled.output(0)], copy=True))
    return np.concatenate(parts).astype(np.float32)


def kernels(compiled: Any, top: int = 6) -> dict[str, int]:
    """The CPU plugin's primitive types as executed (e.g. ``brgconv_avx512_amx_I8``,
    ``jit_avx512_core_bf16``) with how many nodes ran each, most frequent first: which
    instructions a variant really used, not what the CPU offers."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "primitiveType" not in info or op.get_type_name() in ("Parameter", "Result"):
            continue
        kind = str(info["primitiveType"].astype(str))
        if kind and not kind.startswith(("unknown", "undef")):
            counts[kind] += 1
    return dict(counts.most_common(top))


def profile_openvino(model: Any, precision: str, sample: np.ndarray, options: OvOptions,
                     bench: BenchOptions, deadline: float | None = None) -> Profile:
    """Latency and throughput per batch size, as optimizer.benchmark does for ONNX Runtime;
    compile time and memory included in the peak-memory figure."""
    with PeakMemory() as mem:
        compiled = compile_model(model, precision, options)
        request = compiled.create_infer_request()

        def make(batch: int) -> Callable[[], object]:
            x = np.ascontiguousarray(np.repeat(sample[:1], batch, axis=0))
            return lambda: request.infer([x])

        points = sweep(make, bench, deadline)
    return Profile(points=tuple(points), peak_memory_mb=mem.mb)


def contender(name: str, xml: Path, precision: str, sample: np.ndarray,
              options: OvOptions) -> Contender:
    """An OpenVINO variant in a benchmark window (optimizer.benchmark.measure)."""
    def open_() -> Callable[[int], Callable[[], object]]:
        request = compile_model(read(xml), precision, options,
                                flush_denormals=True).create_infer_request()

        def make(batch: int) -> Callable[[], object]:
            x = np.ascontiguousarray(np.repeat(sample[:1], batch, axis=0))
            return lambda: request.infer([x])
        return make
    return Contender(name, open_)
