"""Triton python-backend model that hosts OpenVINO on CPU.

Copied into each model version folder (as model.py) by the Bedside optimizer when an OpenVINO
variant is selected. It runs inside Triton's own Python environment (numpy<2, openvino), so it
imports nothing from Bedside. The inference precision, threads, streams and performance hint
are the ones the variant was verified and benchmarked with (config.pbtxt parameters).
OpenVINO's telemetry module is made unimportable before openvino is imported: nothing leaves
the machine. Requests that Triton's dynamic batcher groups are run as one batch.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.modules["openvino_telemetry"] = None  # openvino falls back to its no-op stub
import openvino as ov  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        properties = {
            "INFERENCE_PRECISION_HINT": params.get("INFERENCE_PRECISION_HINT", "f32"),
            "INFERENCE_NUM_THREADS": int(params.get("INFERENCE_NUM_THREADS", "0")),
            "NUM_STREAMS": int(params.get("NUM_STREAMS", "1")),
            "PERFORMANCE_HINT": params.get("PERFORMANCE_HINT", "LATENCY"),
        }
        if params.get("denormals_as_zero") == "1":  # as the optimizer benchmarked it
            properties["CPU_DENORMALS_OPTIMIZATION"] = True
        core = ov.Core()
        model = core.read_model(os.path.join(version_dir, params.get("openvino_file",
                                                                     "model.xml")))
        self.compiled = core.compile_model(model, "CPU", properties)
        self.request = self.compiled.create_infer_request()
        self.output_name = config["output"][0]["name"]
        self.input_name = config["input"][0]["name"]

    def execute(self, requests):
        arrays = [
            pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests
        ]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            result = self.request.infer([np.ascontiguousarray(batch)])
            out = np.array(result[self.compiled.output(0)], copy=True)
        except Exception as exc:  # report per request instead of killing the stub
            err = pb_utils.TritonError(f"openvino failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, offset = [], 0
        for a in arrays:
            n = a.shape[0]
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out[offset:offset + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            offset += n
        return responses
