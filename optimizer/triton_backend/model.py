"""Triton python-backend model that hosts ONNX Runtime on CPU.

Copied into each model version folder by the Bedside optimizer. It runs inside Triton's own
Python environment (numpy<2, onnxruntime), so it imports nothing from Bedside. Requests that
Triton's dynamic batcher groups together are run as one ONNX Runtime batch.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if params.get("denormals_as_zero") == "1":  # as the optimizer benchmarked it
            opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        arrays = [
            pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests
        ]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # report per request instead of killing the stub
            err = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, offset = [], 0
        for a in arrays:
            n = a.shape[0]
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out[offset:offset + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            offset += n
        return responses
