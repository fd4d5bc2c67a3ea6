"""OpenVINO's CPU settings as Bedside sets them: which variants, threads / streams / hint, and
the inference precision each variant runs with. Torch- and OpenVINO-free (the request and the
``bedside`` command's flags are built from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OV_PRECISIONS = ("fp32", "bf16", "int8")
HINTS = ("latency", "throughput")
# The inference precision each variant is verified and served with. INT8 variants keep their
# non-quantized operations in FP32, as verified.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@dataclass(frozen=True)
class OvOptions:
    """CPU plugin settings: set from flags, recorded in the report and the Triton config."""

    threads: int = 2
    streams: int = 1
    hint: str = "latency"

    def __post_init__(self) -> None:
        if self.threads < 1 or self.streams < 1:
            raise ValueError("OpenVINO threads and streams must be >= 1")
        if self.hint not in HINTS:
            raise ValueError(f"OpenVINO performance hint must be one of {HINTS}")

    def properties(self, precision: str) -> dict[str, Any]:
        return {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
                "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": self.streams,
                "PERFORMANCE_HINT": self.hint.upper()}
