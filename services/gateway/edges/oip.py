"""The Open Inference Protocol v2 dataplane, shared by the REST (oip_rest.py) and gRPC
(oip_grpc.py) edges, so that a stock tritonclient or KServe client can call the gateway.

The gateway serves each of its models under the manifest's name (``/v2/models`` lists them;
``/v2/models/{name}/infer`` infers with one), each with this signature:

- input ``DICOM``, datatype ``BYTES``, shape ``[N]``: each element one DICOM Part-10 file;
- output ``SCORES``, ``FP32``, shape ``[N, L]``: per label, the activated score
  (classification) or the highest pixel score (segmentation);
- output ``FINDINGS_JSON``, ``BYTES``, shape ``[N]``: the gateway's JSON result per instance
  (findings, thresholds, decisions, timings), as ``/v1/infer`` returns it.

Inference is synchronous: the answer carries the findings. Results are also stored, so
``/v1/studies/{uid}/results`` lists them. Errors are GatewayErrors; each edge maps them.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.gateway.dicom.parsing import parse
from services.gateway.errors import BadRequest, NotFound, PayloadTooLarge
from services.gateway.inference.core import InferenceCore, Result, complete_timings
from services.gateway.intake.ingest import with_preamble
from services.gateway.intake.models import ModelLane
from services.gateway.metrics import GatewayMetrics
from services.gateway.store.results import ResultStore

INPUT = "DICOM"
SCORES = "SCORES"
FINDINGS = "FINDINGS_JSON"
MAX_BATCH = 64
PLATFORM = "bedside_gateway"


def decode_bytes_tensor(raw: bytes, count: int) -> list[bytes]:
    """Triton's binary BYTES layout: per element a little-endian uint32 length, then bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest("BYTES tensor data truncated inside an element length",
                             "bad_tensor")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest("BYTES tensor data shorter than its element length", "bad_tensor")
        out.append(raw[pos:pos + n])
        pos += n
    if len(out) != count:
        raise BadRequest(f"BYTES tensor holds {len(out)} elements, its shape says {count}",
                         "bad_tensor")
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@dataclass(frozen=True)
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes  # Triton's binary layout (FP32 little-endian; BYTES length-prefixed)
    json_data: list[Any]  # the same values for the JSON form


@dataclass(frozen=True)
class _Served:
    core: InferenceCore
    results: ResultStore

    @property
    def version(self) -> str:
        return str(self.core.manifest.version)


class Dataplane:
    def __init__(self, core: InferenceCore, results: ResultStore, metrics: GatewayMetrics,
                 ready: Callable[[], bool], lanes: Sequence[ModelLane] = ()) -> None:
        """``core``/``results``: the default model's; ``lanes``: every model served (empty:
        the default model alone)."""
        self.core = core
        self._results = results
        self._metrics = metrics
        self._ready = ready
        self.model = core.manifest.name
        self.version = str(core.manifest.version)
        self._served: dict[str, _Served] = {
            lane.name: _Served(lane.core, lane.results) for lane in lanes}
        self._served.setdefault(self.model, _Served(core, results))

    @property
    def models(self) -> list[str]:
        return sorted(self._served)

    def version_of(self, name: str) -> str:
        return self._served[name].version if name in self._served else self.version

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model served: name, version, task, labels and readiness."""
        ready = self.server_ready()
        return [{"name": name, "version": served.version,
                 "task": served.core.manifest.task,
                 "labels": list(served.core.manifest.output.labels),
                 "state": "READY" if ready else "UNAVAILABLE"}
                for name, served in sorted(self._served.items())]

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return bool(self._ready())

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "bedside-gateway", "version": "1", "extensions": ["binary_tensor_data"]}

    def _check_model(self, name: str, version: str = "") -> _Served:
        served = self._served.get(name)
        if served is None:
            raise NotFound(f"unknown model {name!r}; this gateway serves "
                           f"{', '.join(repr(m) for m in self.models)}", "unknown_model")
        if version not in ("", served.version):
            raise NotFound(f"model {name!r} has no version {version!r}", "unknown_version")
        return served

    def model_ready(self, name: str, version: str = "") -> bool:
        self._check_model(name, version)
        return self.server_ready()

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        served = self._check_model(name, version)
        labels = served.core.manifest.output.labels
        return {
            "name": name, "versions": [served.version], "platform": PLATFORM,
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": SCORES, "datatype": "FP32", "shape": [-1, len(labels)]},
                        {"name": FINDINGS, "datatype": "BYTES", "shape": [-1]}],
        }

    def check_input(self, name: str, datatype: str, shape: list[int]) -> int:
        """The batch size N of a valid ``DICOM`` input; BadRequest saying what is wrong."""
        if name != INPUT:
            raise BadRequest(f"unknown input {name!r}; the input is {INPUT!r}", "bad_tensor")
        if datatype != "BYTES":
            raise BadRequest(f"input {INPUT} must be BYTES, got {datatype}", "bad_tensor")
        if len(shape) == 2 and shape[1] == 1:  # [N, 1] is a common client habit
            shape = shape[:1]
        if len(shape) != 1 or shape[0] < 1:
            raise BadRequest(f"input {INPUT} must have shape [N] with N >= 1, got {shape}",
                             "bad_tensor")
        if shape[0] > MAX_BATCH:
            raise PayloadTooLarge(f"batch of {shape[0]} exceeds {MAX_BATCH}", "batch_too_large")
        return shape[0]

    def infer(self, name: str, version: str, files: list[bytes], protocol: str,
              arrival: float, requested: list[str] | None = None) -> list[InferOutput]:
        """Run every file through the core; all-or-nothing (OIP has no per-element errors)."""
        served = self._check_model(name, version)
        wanted = requested or [SCORES, FINDINGS]
        for out in wanted:
            if out not in (SCORES, FINDINGS):
                raise BadRequest(f"unknown output {out!r}; outputs are {SCORES}, {FINDINGS}",
                                 "bad_output")
        results: list[Result] = []
        for data in files:
            ds = parse(with_preamble(data))
            result = served.core.analyze(
                ds, {"receive": (time.perf_counter() - arrival) * 1000.0})
            complete_timings(result.timings_ms, arrival, time.perf_counter())
            results.append(result)
        for result in results:
            served.results.save(result.study_instance_uid, result.sop_instance_uid,
                                result.to_dict())
            self._metrics.observe(name, protocol, result.timings_ms)
        key = "score" if served.core.manifest.task == "classification" else "max_score"
        scores = np.array([[f[key] for f in r.findings] for r in results], dtype="<f4")
        docs = [json.dumps(r.to_dict(), sort_keys=True).encode("utf-8") for r in results]
        outputs = {
            SCORES: InferOutput(SCORES, "FP32", list(scores.shape), scores.tobytes(),
                                scores.ravel().tolist()),
            FINDINGS: InferOutput(FINDINGS, "BYTES", [len(docs)], encode_bytes_tensor(docs),
                                  [d.decode("utf-8") for d in docs]),
        }
        return [outputs[n] for n in wanted]
