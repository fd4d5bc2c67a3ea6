"""One long-lived asynchronous Triton gRPC client: binary tensors, input and output names and
datatypes from the model's metadata, a deadline on every call, quick retries on UNAVAILABLE
within that deadline, and a circuit breaker so that a Triton that is down costs callers no time.

The client is ``tritonclient.grpc.aio`` on one event loop that runs in its own thread for the
life of the gateway: one HTTP/2 channel multiplexes every concurrent call (worker, REST, OIP
edges), and no caller thread is held by a pending RPC. Synchronous callers (the spool worker,
starlette's thread pool) use ``infer``; coroutines may await ``infer_async``.

Breaker: ``closed`` (calls go through) -> ``open`` after K consecutive "unavailable" failures
(refused, deadline exceeded, overloaded): every call fails at once with ``Unavailable``
(reason ``triton_circuit_open``), which edges answer 503 + Retry-After and the worker answers
by waiting, while DIMSE keeps acknowledging to the spool as long as it has room -> after the
cool-down, ``half_open``: one probe call goes through (others still fail fast); its success
closes the breaker, its failure opens it for another cool-down. A permanent error (the server
answered, the request was wrong) counts as the server being there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from services.gateway.errors import GatewayError, InferenceFailed, Unavailable

LOG = logging.getLogger(__name__)
# gRPC codes worth retrying: the server is down, overloaded or slow, not the request wrong.
# No status at all means the channel itself failed (connection refused).
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")
# Only these are retried inside one call (the server may be restarting or shedding load); a
# deadline already spent is not.
_RETRY_IN_CALL = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
_T = TypeVar("_T")


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


@dataclass(frozen=True)
class ModelIO:
    """The served model's tensors the gateway uses, as Triton's metadata declares them."""

    input_name: str
    input_datatype: str
    output_name: str


def resolve_io(meta: dict[str, Any], input_name: str, output_name: str) -> ModelIO:
    """Match the manifest's tensor names against the model metadata. A model with a single
    input (or output) is used whatever that tensor is called; with several, the manifest's
    name must be among them."""

    def pick(kind: str, wanted: str) -> dict[str, Any]:
        tensors = list(meta.get(kind, []))
        for tensor in tensors:
            if tensor.get("name") == wanted:
                return dict(tensor)
        if len(tensors) == 1:
            LOG.info("model %s %r is named %r in Triton; using it", kind[:-1], wanted,
                     tensors[0].get("name"))
            return dict(tensors[0])
        names = ", ".join(str(t.get("name")) for t in tensors) or "none"
        raise InferenceFailed(f"model has no {kind[:-1]} named {wanted!r} (it has: {names})",
                              "model_metadata")

    inp = pick("inputs", input_name)
    out = pick("outputs", output_name)
    return ModelIO(str(inp["name"]), str(inp.get("datatype", "FP32")), str(out["name"]))


def _classify(exc: InferenceServerException) -> GatewayError:
    status = str(exc.status() or "")
    if not status or any(code in status for code in RETRYABLE):
        return Unavailable(f"inference server unavailable: {exc.message()}",
                           "triton_unavailable")
    return InferenceFailed(f"inference failed: {exc.message()}", "triton_error")


class TritonInferer:
    """Calls one model. Transient failures raise ``Unavailable`` (retry, back-pressure);
    permanent ones raise ``InferenceFailed`` (the request itself cannot be served).

    ``retries`` extra attempts are made inside one call on UNAVAILABLE or RESOURCE_EXHAUSTED,
    with a short doubling pause, as long as the call's deadline (``timeout_s``) allows."""

    def __init__(self, url: str, model: str, input_name: str, output_name: str,
                 timeout_s: float, breaker: CircuitBreaker | None = None,
                 retries: int = 2, retry_pause_s: float = 0.05,
                 version: int | None = None) -> None:
        """``version`` None: the version Triton serves by default (its version policy)."""
        self.breaker = breaker if breaker is not None else CircuitBreaker(5, 5.0)
        self._model = model
        self._version = str(version) if version is not None else ""
        self._wanted = (input_name, output_name)
        self._timeout = timeout_s
        self._retries = max(0, retries)
        self._pause = retry_pause_s
        self._io: ModelIO | None = None  # from Triton's model metadata, on first use
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="triton-client",
                                        daemon=True)
        self._thread.start()
        self._client: aioclient.InferenceServerClient = self._run(self._connect(url), 10.0)

    async def _connect(self, url: str) -> aioclient.InferenceServerClient:
        return aioclient.InferenceServerClient(url)  # its channel binds to this loop

    def _run(self, coro: Coroutine[Any, Any, _T], timeout_s: float) -> _T:
        """Run ``coro`` on the client's loop and wait for it from this (non-loop) thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError as exc:
            future.cancel()
            raise Unavailable("inference server did not answer in time",
                              "triton_unavailable") from exc

    @property
    def model(self) -> str:
        return self._model

    @property
    def io(self) -> ModelIO | None:
        """The tensor names and input datatype, once read from Triton."""
        return self._io

    def ready(self) -> bool:
        try:
            return bool(self._run(self._client.is_model_ready(
                self._model, self._version, client_timeout=2.0), 3.0))
        except (InferenceServerException, Unavailable):
            return False

    async def _model_io(self) -> ModelIO:
        if self._io is None:
            meta = await self._client.get_model_metadata(self._model, self._version,
                                                         as_json=True,
                                                         client_timeout=self._timeout)
            self._io = resolve_io(meta, *self._wanted)
        return self._io

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # The loop enforces the deadline; the extra second only covers scheduling.
        return self._run(self.infer_async(batch), self._timeout + 1.0)

    async def infer_async(self, batch: np.ndarray) -> np.ndarray:
        """Must run on the client's loop (``infer`` takes care of that from other threads)."""
        self.breaker.before_call()
        try:
            out = await self._infer_with_retries(batch)
        except Unavailable:
            self.breaker.failure()
            raise
        except BaseException:  # answered (a permanent error) or our own bug: not an outage
            self.breaker.success()
            raise
        self.breaker.success()
        return out

    async def _infer_with_retries(self, batch: np.ndarray) -> np.ndarray:
        deadline = time.monotonic() + self._timeout
        pause = self._pause
        attempt = 0
        while True:
            try:
                return await self._infer(batch, deadline - time.monotonic())
            except InferenceServerException as exc:
                status = str(exc.status() or "")
                left = deadline - time.monotonic()
                retry = (attempt < self._retries and left > pause
                         and (not status or any(c in status for c in _RETRY_IN_CALL)))
                LOG.warning("triton call failed: %s%s", status or "no status",
                            "; retrying" if retry else "")
                if not retry:
                    raise _classify(exc) from exc
            attempt += 1
            await asyncio.sleep(pause)
            pause *= 2

    async def _infer(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        if timeout_s <= 0:
            raise InferenceServerException("deadline spent", status="StatusCode.DEADLINE_EXCEEDED")
        io = await self._model_io()
        dtype = np.float16 if io.input_datatype == "FP16" else np.float32
        tensor = grpcclient.InferInput(io.input_name, list(batch.shape), io.input_datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=dtype))
        result = await self._client.infer(
            self._model, [tensor], model_version=self._version,
            outputs=[grpcclient.InferRequestedOutput(io.output_name)],
            client_timeout=timeout_s,
        )
        out = result.as_numpy(io.output_name)
        if out is None or out.shape[0] != batch.shape[0]:
            raise InferenceFailed("inference server returned no usable output",
                                  "triton_empty_output")
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._run(self._client.close(), 5.0)
        except Exception:  # closing a broken channel: nothing left to save
            LOG.debug("triton client close failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def load_versions(url: str, model: str, versions: Sequence[int], timeout_s: float = 60.0) -> None:
    """Ask Triton (explicit model control) to serve exactly ``versions`` of ``model``: its
    current configuration with a ``specific`` version policy, through the repository API's
    load. Versions already loaded keep serving while the others load; one no longer listed is
    unloaded. Raises ``Unavailable`` when Triton refuses (not in explicit mode, a version
    missing from the repository) or cannot be reached."""
    client = grpcclient.InferenceServerClient(url)
    try:
        if not client.is_model_ready(model, client_timeout=timeout_s):
            # not loaded yet (explicit mode starts empty): load it as the repository says
            # first, so that its configuration can be read back
            client.load_model(model, client_timeout=timeout_s)
        config = client.get_model_config(model, as_json=True,
                                         client_timeout=timeout_s)["config"]
        config["version_policy"] = {"specific": {"versions": [str(v) for v in versions]}}
        client.load_model(model, config=json.dumps(config), client_timeout=timeout_s)
        for v in versions:
            if not client.is_model_ready(model, str(v), client_timeout=timeout_s):
                raise Unavailable(f"version {v} of {model} did not become ready",
                                  "version_not_ready")
    except InferenceServerException as exc:
        raise Unavailable(f"Triton refused to load versions {list(versions)} of {model}: "
                          f"{str(exc)[:300]}", "version_load_refused") from exc
    finally:
        client.close()
