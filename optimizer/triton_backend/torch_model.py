"""Triton python-backend model that runs a TorchScript model on a CUDA GPU (``gpu-torch``).

Copied into each model version folder (as ``model.py``, beside ``torch_runner.py`` and
``model.pt``) by ``bedside optimize --target gpu-torch``. It runs inside Triton's Python
environment (NGC's ``-pyt-python-py3`` image has torch; locally any environment with torch), so
it imports nothing from Bedside. Tensors cross the backend through DLPack, never numpy: the
python backend's numpy path returns empty tensors when the stub's environment has numpy 2.
Requests that Triton's dynamic batcher groups together run as one batch (one CUDA graph
replay when ``cuda_graphs`` is on).
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_runner import TorchRunner, load_torchscript


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not torch.cuda.is_available():
            raise pb_utils.TritonModelException(
                "gpu-torch model needs a CUDA GPU visible to Triton's python backend")
        gpu = args.get("model_instance_device_id") or "0"
        device = f"cuda:{gpu}" if args.get("model_instance_kind") == "GPU" else "cuda:0"
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        shape = tuple(int(d) for d in config["input"][0]["dims"])
        module = load_torchscript(os.path.join(version_dir, params.get("torch_file", "model.pt")),
                                  device)
        self.runner = TorchRunner(
            module, shape, params.get("bedside_precision", "fp32"), device=device,
            cuda_graphs=params.get("cuda_graphs", "false") == "true",
            max_batch=max(1, int(config.get("max_batch_size", 1))))

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name).to_dlpack())
                  for r in requests]
        try:
            batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
            out = self.runner(batch.to(self.runner.device)).cpu().contiguous()
        except Exception as exc:  # report per request instead of killing the stub
            err = pb_utils.TritonError(f"torch failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, offset = [], 0
        for x in inputs:
            n = x.shape[0]
            part = out[offset:offset + n].contiguous()
            tensor = pb_utils.Tensor.from_dlpack(self.output_name, to_dlpack(part))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            offset += n
        return responses
