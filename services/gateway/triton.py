"""One long-lived Triton gRPC client: binary tensors, a deadline on every call, and a circuit
breaker so that a Triton that is down costs callers no time.

Breaker: ``closed`` (calls go through) -> ``open`` after K consecutive "unavailable" failures
(refused, deadline exceeded, overloaded): every call fails at once with ``Unavailable``
(reason ``triton_circuit_open``), which edges answer 503 + Retry-After and the worker answers
by waiting, while DIMSE keeps acknowledging to the spool as long as it has room -> after the
cool-down, ``half_open``: one probe call goes through (others still fail fast); its success
closes the breaker, its failure opens it for another cool-down. A permanent error (the server
answered, the request was wrong) counts as the server being there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.gateway.errors import InferenceFailed, Unavailable

LOG = logging.getLogger(__name__)
# gRPC codes worth retrying: the server is down, overloaded or slow, not the request wrong.
# No status at all means the channel itself failed (connection refused).
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)


class CircuitBreaker:
    """Thread-safe; ``clock`` is injectable for tests (seconds, monotonic)."""

    def __init__(self, failures: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be >= 1 and cooldown_s > 0")
        self._threshold = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown:
                return HALF_OPEN  # the next call will be let through as the probe
            return self._state

    def retry_after_s(self) -> float:
        """Seconds until the next probe may be made (0 when closed)."""
        with self._lock:
            if self._state == CLOSED:
                return 0.0
            return max(0.0, self._cooldown - (self._clock() - self._opened_at))

    def before_call(self) -> None:
        """Raise ``Unavailable`` at once when the call must not be made."""
        with self._lock:
            if self._state == CLOSED:
                return
            if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown:
                self._state = HALF_OPEN
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True  # this caller is the probe
                return
            raise Unavailable("inference server unavailable (circuit open); retry later",
                              "triton_circuit_open")

    def success(self) -> None:
        with self._lock:
            if self._state != CLOSED:
                LOG.info("triton circuit closed: the inference server answers again")
            self._state, self._failures, self._probing = CLOSED, 0, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state == HALF_OPEN or (self._state == CLOSED
                                            and self._failures >= self._threshold):
                if self._state == CLOSED:
                    LOG.warning("triton circuit open after %d consecutive failures; probing "
                                "again in %.1fs", self._failures, self._cooldown)
                self._state, self._opened_at = OPEN, self._clock()


class TritonInferer:
    """Calls one model. Transient failures raise ``Unavailable`` (retry, back-pressure);
    permanent ones raise ``InferenceFailed`` (the request itself cannot be served)."""

    def __init__(self, url: str, model: str, input_name: str, output_name: str,
                 timeout_s: float, breaker: CircuitBreaker | None = None) -> None:
        self.breaker = breaker if breaker is not None else CircuitBreaker(5, 5.0)
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
        self.breaker.before_call()
        try:
            out = self._infer(batch)
        except Unavailable:
            self.breaker.failure()
            raise
        except BaseException:  # answered (a permanent error) or our own bug: not an outage
            self.breaker.success()
            raise
        self.breaker.success()
        return out

    def _infer(self, batch: np.ndarray) -> np.ndarray:
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
