"""The served variant run in-process, whatever its runtime: ONNX Runtime for ``model.onnx``,
OpenVINO for ``model.xml`` (with the inference precision, streams and hint its config.pbtxt
gives the python backend), so that the harness compares Triton with the same computation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc


@dataclass(frozen=True)
class InProcess:
    runtime: str
    dtype: type[np.floating]
    # each caller (thread) gets its own call: an ONNX Runtime session is shared, an OpenVINO
    # infer request is not
    make: Callable[[np.ndarray], Callable[[], object]]


def load(version_dir: Path, threads: int) -> InProcess:
    xml = version_dir / "model.xml"
    if xml.exists():
        from optimizer.ov_runtime import OvOptions, compile_model, read

        cfg = text_format.Parse((version_dir.parent / "config.pbtxt").read_text(),
                                mc.ModelConfig())
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        options = OvOptions(threads=threads, streams=int(params.get("NUM_STREAMS", "1")),
                            hint=params.get("PERFORMANCE_HINT", "LATENCY").lower())
        compiled = compile_model(read(xml), params["bedside_precision"], options)

        def make_ov(x: np.ndarray) -> Callable[[], object]:
            request = compiled.create_infer_request()
            return lambda: request.infer([x])

        return InProcess("openvino", np.float32, make_ov)
    from optimizer.benchmark import input_dtype, onnx_session

    session = onnx_session(version_dir / "model.onnx", threads)
    name, dtype = session.get_inputs()[0].name, input_dtype(session)

    def make_ort(x: np.ndarray) -> Callable[[], object]:
        feed = {name: x.astype(dtype)}
        return lambda: session.run(None, feed)

    return InProcess("onnxruntime", dtype, make_ort)
