"""``bedside optimize``: checkpoint + manifest -> verified variants -> Triton repository + report.

Each step records its status (ok / failed / skipped) and duration in ``steps.json`` as soon as it
ends, so a failed run shows where it stopped and why.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from optimizer import checkpoint
from optimizer.benchmark import bench_onnx, bench_torch, onnx_session, run_onnx, run_torch
from optimizer.dataset import load_labelled
from optimizer.errors import SelectionError
from optimizer.export import export_onnx
from optimizer.manifest import Manifest
from optimizer.quantize import quantize_int8
from optimizer.report import VariantResult, build_report, write_report
from optimizer.repository import ServingOptions, write_repository
from optimizer.verify import verify

LOG = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class OptimizeRequest:
    checkpoint: Path
    manifest: Path
    calibration_dir: Path
    validation_dir: Path
    out_dir: Path
    threads: int = 2
    calibration_method: str = "minmax"
    calibration_limit: int = 64
    # Per-precision MAE ceilings overriding optimizer.verify.MAE_TOLERANCE, e.g. {"int8": 0.1}.
    mae_tolerances: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizeResult:
    report: dict[str, Any]
    repository: Path
    report_json: Path
    report_md: Path


class StepLog:
    """Writes the status of every step to ``steps.json`` right after the step ends."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._steps: list[dict[str, Any]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        LOG.info("step %s", name)
        try:
            yield
        except BaseException as exc:
            self._record(name, "failed", start, f"{type(exc).__name__}: {exc}")
            raise
        self._record(name, "ok", start, None)

    def skipped(self, name: str, why: str) -> None:
        self._steps.append({"step": name, "status": "skipped", "seconds": 0.0, "detail": why})
        self._flush()

    def _record(self, name: str, status: str, start: float, detail: str | None) -> None:
        self._steps.append({"step": name, "status": status,
                            "seconds": round(time.perf_counter() - start, 3), "detail": detail})
        self._flush()

    def _flush(self) -> None:
        self._path.write_text(json.dumps(self._steps, indent=2) + "\n", encoding="utf-8")


def _run(log: StepLog, name: str, fn: Callable[[], T]) -> T:
    with log.step(name):
        return fn()


def optimize(req: OptimizeRequest) -> OptimizeResult:
    """Run every step; raises a BedsideError subclass naming the step's problem on failure."""
    out = req.out_dir
    (out / "variants").mkdir(parents=True, exist_ok=True)
    log = StepLog(out / "steps.json")
    torch.set_num_threads(req.threads)

    manifest = _run(log, "load_manifest", lambda: Manifest.load(req.manifest))
    model = _run(log, "load_checkpoint", lambda: checkpoint.load(req.checkpoint))
    validation = _run(log, "load_validation",
                      lambda: load_labelled(req.validation_dir, manifest.input))
    calibration = _run(
        log, "load_calibration",
        lambda: load_labelled(req.calibration_dir, manifest.input, limit=req.calibration_limit),
    )
    golden = _run(log, "golden_outputs", lambda: run_torch(model, validation.inputs))

    fp32_path = out / "variants" / "model.fp32.onnx"
    _run(log, "export_onnx_fp32", lambda: export_onnx(model, manifest, fp32_path))
    int8_path = out / "variants" / "model.int8.onnx"
    _run(log, "quantize_int8", lambda: quantize_int8(
        fp32_path, int8_path, manifest.input.name, calibration.inputs, req.calibration_method))
    log.skipped("tensorrt", "TensorRT is not available on this machine (CPU target)")

    sample = validation.inputs[:1]
    baseline = _run(log, "benchmark_pytorch", lambda: bench_torch(model, sample, req.threads))
    variants: list[VariantResult] = []
    for name, precision, path in (("onnx-fp32", "fp32", fp32_path),
                                  ("onnx-int8", "int8", int8_path)):
        def evaluate(name: str = name, precision: str = precision,
                     path: Path = path) -> VariantResult:
            session = onnx_session(path, req.threads)
            outputs = run_onnx(session, validation.inputs)
            check = verify(precision, outputs, golden, validation.labels, manifest,
                           mae_tolerance=req.mae_tolerances.get(precision))
            latency = bench_onnx(session, sample)
            return VariantResult(
                name=name, precision=precision, runtime="onnxruntime-cpu",
                file=str(path.relative_to(out)), size_bytes=path.stat().st_size,
                verification=check, latency=latency, speedup=baseline.p50_ms / latency.p50_ms,
            )
        variants.append(_run(log, f"verify_benchmark_{name}", evaluate))

    def select() -> VariantResult:
        passing = [v for v in variants if v.verification.passed]
        if not passing:
            why = "; ".join(f"{v.name}: {', '.join(v.verification.reasons)}" for v in variants)
            raise SelectionError(f"no variant passed verification ({why})")
        return min(passing, key=lambda v: v.latency.p50_ms)

    chosen = _run(log, "select", select)
    repo = out / "repository"
    serving = ServingOptions(intra_op_threads=req.threads)
    model_dir = _run(log, "write_repository", lambda: write_repository(
        repo, manifest, out / chosen.file, chosen.precision, serving))
    report = build_report(
        model=manifest.name, version=manifest.version, threads=req.threads,
        validation_size=len(validation), baseline=baseline, variants=variants,
        selected=chosen.name, repository=str(model_dir.relative_to(out)),
    )
    js, md = _run(log, "write_report", lambda: write_report(out, report))
    return OptimizeResult(report=report, repository=repo, report_json=js, report_md=md)

