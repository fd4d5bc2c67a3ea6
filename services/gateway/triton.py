"""One long-lived Triton gRPC client: binary tensors, a deadline on every call."""

from __future__ import annotations

import logging

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.gateway.errors import InferenceFailed, Unavailable

LOG = logging.getLogger(__name__)
# gRPC codes worth retrying: the server is down, overloaded or slow, not the request wrong.
# No status at all means the channel itself failed (connection refused).
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")


class TritonInferer:
    """Calls one model. Transient failures raise ``Unavailable`` (retry, back-pressure);
    permanent ones raise ``InferenceFailed`` (the request itself cannot be served)."""

    def __init__(self, url: str, model: str, input_name: str, output_name: str,
                 timeout_s: float) -> None:
        self._client = grpcclient.InferenceServerClient(url)
        self._model = model
        self._input = input_name
        self._output = output_name
        self._timeout = timeout_s
        self._datatype: str | None = None  # from Triton's model metadata, on first use

    @property
    def model(self) -> str:
        return self._model

    def ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self._model, client_timeout=2.0))
        except InferenceServerException:
            return False

    def _input_datatype(self) -> str:
        """FP32, or FP16 for FP16-I/O variants: what the served model declares."""
        if self._datatype is None:
            meta = self._client.get_model_metadata(self._model, as_json=True,
                                                   client_timeout=self._timeout)
            declared = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
            if self._input not in declared:
                raise InferenceFailed(f"model has no input named {self._input!r}",
                                      "model_metadata")
            self._datatype = declared[self._input]
        return self._datatype

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            datatype = self._input_datatype()
            dtype = np.float16 if datatype == "FP16" else np.float32
            tensor = grpcclient.InferInput(self._input, list(batch.shape), datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=dtype))
            result = self._client.infer(
                self._model, [tensor],
                outputs=[grpcclient.InferRequestedOutput(self._output)],
                client_timeout=self._timeout,
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            LOG.warning("triton call failed: %s", status or "no status")
            if not status or any(code in status for code in RETRYABLE):
                raise Unavailable(f"inference server unavailable: {exc.message()}",
                                  "triton_unavailable") from exc
            raise InferenceFailed(f"inference failed: {exc.message()}",
                                  "triton_error") from exc
        out = result.as_numpy(self._output)
        if out is None or out.shape[0] != batch.shape[0]:
            raise InferenceFailed("inference server returned no usable output",
                                  "triton_empty_output")
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._client.close()
