"""``bedside optimize``: checkpoint + manifest -> verified variants -> Triton repository + report.

Steps: load -> golden outputs (PyTorch FP32) -> export ONNX -> FP16 -> INT8 (calibration method
chosen on the validation set; accuracy recovery when it misses the budget) -> TensorRT (GPU
nodes only) -> OpenVINO FP32 / BF16 / INT8 (CPU target; optimizer.ov_variants) -> benchmark
(within a time budget) -> select -> repository -> report. Each step records its status
(ok / failed / skipped) and duration in ``steps.json`` as soon as it ends.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optimizer import checkpoint, ov_runtime, ov_variants
from optimizer.benchmark import (
    Budget,
    Contender,
    Profile,
    measure,
    onnx_contender,
    onnx_session,
    run_onnx,
    run_torch,
    torch_contender,
)
from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest
from optimizer.dataset import LabelledSet, load_inputs, load_labelled
from optimizer.errors import CheckpointError, QuantizationError, SelectionError
from optimizer.export import export_onnx
from optimizer.fp16 import convert_fp16
from optimizer.gpu_torch import (
    GpuVariant,
    device_info,
    make_runner,
    profile_runner,
    require_cuda,
    run_runner,
    trace,
)
from optimizer.gpu_torch import variants as gpu_variants
from optimizer.outputs import prediction
from optimizer.ov_options import OvOptions
from optimizer.ov_repository import drop_cluster_config, write_openvino_repository
from optimizer.ov_variants import OvJob, hardware
from optimizer.progress import progress
from optimizer.quantize import Int8Quantizer
from optimizer.report import VariantResult, build_report, write_report
from optimizer.repository import ServingOptions, write_repository
from optimizer.request import DEFAULT_PRECISIONS, OBJECTIVES, PRECISIONS, OptimizeRequest
from optimizer.steps import StepLog, optional_step, run_step
from optimizer.triton_backend.torch_runner import TorchRunner
from optimizer.verify import Verification, tuning_split, verify, verify_subset, with_held_out

LOG = logging.getLogger(__name__)
# What the PyTorch baseline is, by the form the model came in (checkpoint.format_of).
BASELINE_NAMES = {"bedside-checkpoint": "pytorch-eager", "state-dict": "pytorch-eager",
                  "torchscript": "pytorch-torchscript",
                  "exported-program": "pytorch-exported-program"}


@dataclass(frozen=True)
class OptimizeResult:
    report: dict[str, Any]
    repository: Path
    report_json: Path
    report_md: Path


def sha256_of(path: Path) -> str:
    """A file's digest, or a folder's (every file's relative name and bytes, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _ov_options(req: OptimizeRequest) -> OvOptions:
    return OvOptions(threads=req.threads, streams=req.ov_streams, hint=req.ov_hint)


@dataclass
class _Candidate:
    name: str
    precision: str
    path: Path
    verification: Verification
    details: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime-cpu"


def _size(path: Path) -> int:
    """Bytes on disk: one ONNX file, or an IR (model.xml and its model.bin)."""
    if path.suffix == ".xml":
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return path.stat().st_size


class _Optimizer:
    def __init__(self, req: OptimizeRequest) -> None:
        self.req = req
        self.out = req.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest: Manifest
        self.model: nn.Module
        self.validation: LabelledSet
        self.calibration: np.ndarray
        self.golden: np.ndarray
        self.model_format = "bedside-checkpoint"
        for stale in ("variants", "report.json", "report.md", "steps.json", "reproduce.sh",
                      "latency_vs_batch.png", "accuracy_vs_speed.png"):
            target = self.out / stale  # never mix this run's results with an earlier one's
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        (self.out / "variants").mkdir(parents=True)
        self.log = StepLog(self.out / "steps.json")

    def session_outputs(self, path: Path, inputs: np.ndarray) -> np.ndarray:
        return run_onnx(onnx_session(path, self.req.threads), inputs)

    def validation_outputs(self, path: Path) -> np.ndarray:
        try:
            return self.session_outputs(path, self.validation.inputs)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise QuantizationError(f"{path.name} does not run in ONNX Runtime: {exc}") from exc

    def check(self, precision: str, path: Path) -> Verification:
        return self.verify_outputs(precision, self.validation_outputs(path))

    def held_out(self, full: Verification, outputs: np.ndarray) -> Verification:
        """A tuned variant's verdict: the whole set's, and the held-out half's as well."""
        return with_held_out(full, outputs, self.golden, self.validation.labels,
                             self.manifest, tuning_split(self.validation.labels)[1])

    def tuning_passes(self, full: Verification, outputs: np.ndarray) -> bool:
        """Whether the tuning half passes ``full``'s gates (what recovery may look at)."""
        return not verify_subset(full, outputs, self.golden, self.validation.labels,
                                 self.manifest, tuning_split(self.validation.labels)[0])

    def verify_outputs(self, precision: str, outputs: np.ndarray) -> Verification:
        return verify(precision, outputs, self.golden, self.validation.labels, self.manifest,
                      mae_tolerance=self.req.mae_tolerances.get(precision))

    def int8(self, fp32_path: Path) -> _Candidate:
        quantizer = Int8Quantizer(fp32_path, self.out / "variants" / "int8-work",
                                  self.manifest.input.name, self.calibration)
        tried: list[_Candidate] = []
        failed: list[dict[str, Any]] = []
        for method in progress(self.req.calibration_methods, "INT8 calibration",
                               unit="method"):
            path = self.out / "variants" / f"model.int8.{method}.onnx"
            try:  # one method failing (a histogram's bins on a narrow range) leaves the others
                quantizer.quantize(path, method)
                check = self.check("int8", path)
            except QuantizationError as exc:
                LOG.warning("INT8 calibration %s failed: %s", method, exc)
                failed.append({"calibration_method": method, "passed": False,
                               "error": str(exc)})
                continue
            tried.append(_Candidate(f"onnx-int8-{method}", "int8", path, check,
                                    {"calibration_method": method}))
        trials = [{"calibration_method": c.details["calibration_method"],
                   "mae": c.verification.mae, "metric_delta": c.verification.metric_delta,
                   "agreement": c.verification.agreement, "passed": c.verification.passed}
                  for c in tried] + failed
        if not tried:
            raise QuantizationError("every INT8 calibration method failed: " + "; ".join(
                f"{f['calibration_method']}: {f['error']}" for f in failed))
        passing = [c for c in tried if c.verification.passed]
        if passing:
            chosen = min(passing, key=lambda c: c.verification.mae)
        else:
            chosen = max(tried, key=lambda c: (c.verification.agreement, -c.verification.mae))
            if self.req.recovery:
                chosen = self.recover(quantizer, chosen)
        chosen.details["calibration_trials"] = trials
        return chosen

    def recover(self, quantizer: Int8Quantizer, best: _Candidate) -> _Candidate:
        """Keep the nodes that contribute most error in FP32, doubling their number until the
        budget holds on the validation set's tuning half or ``recovery_max_fraction`` of the
        graph would stay in FP32. The attempt that passes there is the result, judged on the
        whole set and on the held-out half it was not tuned on (verify.tuning_split)."""
        method = best.details["calibration_method"]
        samples = self.calibration[:16]
        golden = run_torch(self.model, samples)
        ranked = quantizer.rank_nodes(method, samples, golden, self.session_outputs)
        limit = max(1, int(len(quantizer.nodes) * self.req.recovery_max_fraction))
        attempts: list[dict[str, Any]] = []
        current = best
        for k in progress(_schedule(ranked, limit), "INT8 recovery", unit="attempt"):
            kept = [node for group in ranked[:k] for node in group.nodes]
            path = self.out / "variants" / f"model.int8.{method}.recovered.onnx"
            quantizer.quantize(path, method, exclude=kept)
            outputs = self.validation_outputs(path)
            check = self.verify_outputs("int8", outputs)
            tuned = self.tuning_passes(check, outputs)
            if tuned:
                check = self.held_out(check, outputs)
            attempts.append({"fp32_nodes": len(kept), "mae": check.mae,
                             "metric_delta": check.metric_delta, "agreement": check.agreement,
                             "tuning_half_passed": tuned, "passed": check.passed})
            current = _Candidate(f"onnx-int8-{method}-recovered", "int8", path, check, {
                "calibration_method": method, "fp32_nodes": kept, "recovery": attempts,
                "plain_int8_reasons": list(best.verification.reasons)})
            if tuned:  # stop here either way: going on would tune on the held-out half
                LOG.info("INT8 recovery with %d of %d nodes in FP32 %s", len(kept),
                         len(quantizer.nodes),
                         "passed" if check.passed else "failed on the held-out half")
                return current
        LOG.info("INT8 recovery stopped at its bound (%d nodes) without passing", limit)
        if not attempts:  # even the most sensitive group exceeds the bound
            current = dataclasses.replace(best, details={
                **best.details, "recovery": [], "fp32_nodes": [],
                "plain_int8_reasons": list(best.verification.reasons)})
        return current

    def openvino_variants(self, fp32_path: Path) -> list[_Candidate]:
        """OpenVINO FP32 / BF16 / INT8 (optimizer.ov_variants), on the CPU target only."""
        req = self.req
        if not req.openvino:
            self.log.skipped("openvino", "not requested")
            return []
        if req.target != "cpu":
            self.log.skipped("openvino", f"target {req.target}: OpenVINO variants serve CPU "
                                         "nodes (--target cpu)")
            return []
        if (why := ov_runtime.available()) is not None:
            self.log.skipped("openvino", why)
            return []
        job = OvJob(
            fp32_onnx=fp32_path, variants_dir=self.out / "variants", manifest=self.manifest,
            inputs=self.validation.inputs, labels=self.validation.labels, golden=self.golden,
            calibration=self.calibration, options=_ov_options(req), precisions=req.openvino,
            mae_tolerances=req.mae_tolerances, recovery=req.recovery,
            recovery_max_fraction=req.recovery_max_fraction, verify=self.verify_outputs,
            split=tuning_split(self.validation.labels), held_out=self.held_out)
        return [_Candidate(v.name, v.precision, v.path, v.verification, v.details,
                           runtime=ov_runtime.RUNTIME) for v in ov_variants.build(job, self.log)]

    def write_repository(self, repo: Path, chosen: VariantResult,
                         serving: ServingOptions) -> tuple[Path, int]:
        if chosen.runtime == ov_runtime.RUNTIME:
            params = {k: str(v) for k, v in _ov_options(self.req).properties(
                chosen.precision).items()}
            return write_openvino_repository(repo, self.manifest, self.out / chosen.file,
                                             chosen.precision, serving, params)
        drop_cluster_config(repo, self.manifest)  # an older OpenVINO version's, now stale
        return write_repository(repo, self.manifest, self.out / chosen.file, chosen.precision,
                                serving, self.req.target)

    def _golden(self) -> np.ndarray:
        out = self.manifest.output
        if self.manifest.task == "classification" and len(out.labels) > 1 \
                and out.activation != "softmax":
            raise ManifestError("multi-label sigmoid outputs need one label column each; "
                                "labels.csv has one: use softmax with class indices")
        try:
            golden = run_torch(self.model, self.validation.inputs)
        except RuntimeError as exc:
            raise CheckpointError(f"the model fails on inputs of shape "
                                  f"{self.manifest.input.shape}: {exc}") from exc
        if golden.shape[1:] != self.manifest.output_shape:
            raise ManifestError(
                f"the model outputs {golden.shape[1:]} per item; the manifest's "
                f"{len(self.manifest.output.labels)} label(s) imply {self.manifest.output_shape}")
        return golden

    def run(self) -> OptimizeResult:
        req, log = self.req, self.log
        torch.set_num_threads(req.threads)
        if req.target == "gpu-torch":  # refuse before minutes of loading, not after
            run_step(log, "require_cuda", require_cuda)
        self.manifest = run_step(log, "load_manifest", lambda: Manifest.load(req.manifest))
        self.model = run_step(log, "load_checkpoint", lambda: checkpoint.load(
            req.checkpoint, req.builder or None))
        self.model_format = checkpoint.format_of(req.checkpoint, req.builder or None)
        self.model = run_step(log, "select_prediction",
                              lambda: prediction(self.model, self.manifest))
        self.validation = run_step(log, "load_validation",
                               lambda: load_labelled(req.validation_dir, self.manifest))
        self.calibration = run_step(log, "load_calibration", lambda: load_inputs(
            req.calibration_dir, self.manifest, limit=req.calibration_limit))
        inputs = run_step(log, "hash_inputs", lambda: {
            "checkpoint": sha256_of(req.checkpoint), "manifest": sha256_of(req.manifest),
            "calibration": sha256_of(req.calibration_dir),
            "validation": sha256_of(req.validation_dir)})
        self.golden = run_step(log, "golden_outputs", self._golden)
        if req.target == "gpu-torch":
            return self.run_gpu_torch(inputs)

        fp32_path = self.out / "variants" / "model.fp32.onnx"
        run_step(log, "export_onnx_fp32", lambda: export_onnx(self.model, self.manifest, fp32_path))
        candidates = [run_step(log, "verify_fp32", lambda: _Candidate(
            "onnx-fp32", "fp32", fp32_path, self.check("fp32", fp32_path)))]
        if "fp16" in req.precisions:
            def fp16() -> _Candidate:
                path = convert_fp16(fp32_path, self.out / "variants" / "model.fp16.onnx",
                                    keep_io_types=req.fp16_io == "fp32")
                return _Candidate("onnx-fp16", "fp16", path, self.check("fp16", path),
                                  {"io": req.fp16_io,
                                   "fp32_ops": "normalisation, exp/log, reductions"})
            if (half := optional_step(log, "fp16", fp16)) is not None:
                candidates.append(half)
        else:
            log.skipped("fp16", "not requested")
        if "bf16" in req.precisions:
            log.skipped("bf16", "no BF16 variant for ONNX Runtime on the CPU")
        if "int8" in req.precisions:
            if (int8 := optional_step(log, "int8", lambda: self.int8(fp32_path))) is not None:
                candidates.append(int8)
        else:
            log.skipped("int8", "not requested")
        log.skipped("tensorrt", "TensorRT is not installed here; on a GPU node engines are built "
                                "from model.fp32.onnx (FP16) and the INT8 QDQ graph")
        candidates += self.openvino_variants(fp32_path)

        sample = self.validation.inputs[:1]
        baseline_name = BASELINE_NAMES[self.model_format]
        contenders: list[Contender] = [torch_contender("pytorch", self.model, sample,
                                                       req.threads)]
        for cand in candidates:
            if cand.runtime == ov_runtime.RUNTIME:
                contenders.append(ov_runtime.contender(cand.name, cand.path, cand.precision,
                                                       sample, _ov_options(req)))
            else:
                contenders.append(onnx_contender(cand.name, cand.path, sample, req.threads))
        deadline = Budget(req.bench_budget_s, 1).deadline(0, "every runtime, alternating")
        start = time.perf_counter()
        try:
            window = measure(contenders, req.bench, deadline)
        except Exception as exc:  # recorded, then raised: the window is all or nothing
            log.measured("benchmark", time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
            raise
        for c in contenders:
            log.measured(f"benchmark_{c.name}", window.seconds.get(c.name, 0.0),
                         window.failed.get(c.name))
        if "pytorch" not in window.profiles:
            raise CheckpointError(f"the PyTorch baseline does not run: "
                                  f"{window.failed.get('pytorch')}")
        baseline = window.profiles["pytorch"]
        variants = [VariantResult(
            name=cand.name, precision=cand.precision, runtime=cand.runtime,
            file=str(cand.path.relative_to(self.out)), size_bytes=_size(cand.path),
            verification=cand.verification, profile=window.profiles[cand.name],
            speedup=baseline.batch1.p50_ms / window.profiles[cand.name].batch1.p50_ms,
            details=cand.details) for cand in candidates if cand.name in window.profiles]

        serving = ServingOptions(intra_op_threads=req.threads)

        def report(selected: str | None, repository: str | None, version: int | None,
                   why_none: str | None = None) -> dict[str, Any]:
            return build_report(
                manifest=self.manifest, threads=req.threads, objective=req.objective,
                target=req.target, inputs=inputs, validation_size=len(self.validation),
                baseline=baseline, variants=variants, selected=selected,
                repository=repository, version=version, not_built=log.not_ok(),
                hardware=hardware(_ov_options(req)), steps=log.durations(),
                baseline_name=baseline_name, benchmark=window.as_dict(),
                selection_error=why_none)

        return self.finish(variants, serving, report,
                           lambda repo, chosen: self.write_repository(repo, chosen, serving))

    def finish(self, variants: list[VariantResult], serving: ServingOptions,
               report: Callable[..., dict[str, Any]],
               write: Callable[[Path, VariantResult], tuple[Path, int]]) -> OptimizeResult:
        """Select, write the chosen variant's repository, the report and reproduce.sh; when
        nothing can be selected, the report is still written (every measurement and every
        reason) before the SelectionError goes up. Shared by every target."""
        req, log = self.req, self.log
        try:
            chosen = run_step(log, "select", lambda: select(
                variants, req.objective, self.manifest.latency_slo_ms, serving.max_batch_size))
        except SelectionError as exc:
            why = str(exc)
            run_step(log, "write_report", lambda: write_report(self.out, report(
                None, None, None, why)))
            _write_reproduce(self.out, req)
            raise
        repo = self.out / "repository"
        model_dir, version = run_step(log, "write_repository", lambda: write(repo, chosen))
        done = report(chosen.name, str(model_dir.relative_to(self.out)), version)
        js, md = run_step(log, "write_report", lambda: write_report(self.out, done))
        _write_reproduce(self.out, req)
        return OptimizeResult(report=done, repository=repo, report_json=js, report_md=md)

    def run_gpu_torch(self, inputs: dict[str, str]) -> OptimizeResult:
        """The ``gpu-torch`` target: TorchScript on the GPU at each precision, eager and with
        CUDA graphs, verified against the CPU FP32 golden outputs, benchmarked against the
        checkpoint's own module run eagerly in FP32 on the same GPU, selected, and written as a
        python-backend repository that runs the chosen variant."""
        req, log = self.req, self.log
        gpu = require_cuda()
        LOG.info("gpu-torch on %s", gpu)
        ts_path = self.out / "variants" / "model.pt"
        run_step(log, "trace_torchscript", lambda: trace(self.model, self.manifest, ts_path))
        log.skipped("export_onnx_fp32", "target gpu-torch serves TorchScript, not ONNX")
        log.skipped("tensorrt", "TensorRT is not installed here (use --target gpu on a node "
                                "with TensorRT)")
        serving = ServingOptions(max_batch_size=32, preferred_batch_sizes=(8, 16, 32),
                                 max_queue_delay_us=200, intra_op_threads=req.threads)
        sample = self.validation.inputs[:1]

        def eager_baseline() -> Profile:
            runner = TorchRunner(copy.deepcopy(self.model), self.manifest.input.shape, "fp32",
                                 device="cuda", max_batch=serving.max_batch_size)
            try:
                return profile_runner(runner, sample, req.bench)
            finally:
                del runner
                torch.cuda.empty_cache()
        baseline = run_step(log, "benchmark_pytorch_cuda", eager_baseline)
        results: list[VariantResult] = []
        for variant in gpu_variants(req.precisions):
            def build(variant: GpuVariant = variant) -> VariantResult:
                runner = make_runner(ts_path, self.manifest, variant, serving.max_batch_size)
                try:
                    outputs = run_runner(runner, self.validation.inputs)
                    check = verify(variant.precision, outputs, self.golden,
                                   self.validation.labels, self.manifest,
                                   mae_tolerance=req.mae_tolerances.get(variant.precision))
                    prof = profile_runner(runner, sample, req.bench)
                finally:
                    del runner
                    torch.cuda.empty_cache()
                return VariantResult(
                    name=variant.name, precision=variant.precision, runtime="torch-cuda",
                    file=str(ts_path.relative_to(self.out)), size_bytes=ts_path.stat().st_size,
                    verification=check, profile=prof,
                    speedup=baseline.batch1.p50_ms / prof.batch1.p50_ms,
                    details={"cuda_graphs": variant.cuda_graphs, "gpu": gpu})
            if (res := optional_step(log, f"variant_{variant.name}", build)) is not None:
                results.append(res)
        if not results:
            raise SelectionError("no GPU variant could run; see steps.json")
        def report(selected: str | None, repository: str | None, version: int | None,
                   why_none: str | None = None) -> dict[str, Any]:
            return build_report(
                manifest=self.manifest, threads=req.threads, objective=req.objective,
                target=req.target, inputs=inputs, validation_size=len(self.validation),
                baseline=baseline, variants=results, selected=selected,
                repository=repository, version=version, not_built=log.not_ok(),
                baseline_name="pytorch-eager-cuda", baseline_runtime="torch-cuda",
                device=device_info(), steps=log.durations(), selection_error=why_none)

        return self.finish(results, serving, report, lambda repo, chosen: write_repository(
            repo, self.manifest, ts_path, chosen.precision, serving, req.target,
            cuda_graphs=bool(chosen.details["cuda_graphs"])))


def _schedule(ranked: list[Any], limit: int) -> list[int]:
    """How many of the most sensitive groups to keep in FP32 at each attempt: doubling, and
    finally as many as the bound allows."""
    sizes = np.cumsum([len(g.nodes) for g in ranked])
    fits = int(np.searchsorted(sizes, limit, side="right"))  # groups whose nodes fit the bound
    steps = []
    k = 1
    while k < fits:
        steps.append(k)
        k *= 2
    if fits:
        steps.append(fits)
    return steps


def select(variants: list[VariantResult], objective: str, slo_ms: float,
           max_batch: int = 8) -> VariantResult:
    """The best passing variant for the objective, among batch sizes Triton will form
    (``max_batch``); a SelectionError says why none fits.

    Every objective requires batch-1 p95 within the SLO; ``throughput-within-slo`` also keeps
    only the batch sizes whose p95 fits it. Figures marked unstable (benchmark.measure) are not
    selected on while a passing variant has stable ones; when none has (a loaded machine
    weighs on every runtime alike), the choice is made on them and the report says so.
    """
    passing = [v for v in variants if v.verification.passed]
    if not passing:
        why = "; ".join(f"{v.name}: {', '.join(v.verification.reasons)}" for v in variants)
        raise SelectionError(f"no variant passed verification ({why})")
    stable = [v for v in passing if not v.profile.unstable]
    trusted = stable or passing
    in_slo = [v for v in trusted if v.profile.batch1.p95_ms <= slo_ms]
    if not in_slo and stable:  # the stable ones miss the SLO: an unstable one may fit it
        in_slo = [v for v in passing if v.profile.batch1.p95_ms <= slo_ms]
    if not in_slo:
        raise SelectionError(f"no passing variant has p95 <= {slo_ms:g} ms even at batch 1")

    def best_throughput(v: VariantResult, slo: float = float("inf")) -> float:
        ok = [p.throughput for p in v.profile.points
              if p.batch <= max_batch and p.latency.p95_ms <= slo]
        return max(ok, default=0.0)

    if objective == "latency":
        return min(in_slo, key=lambda v: v.profile.batch1.p50_ms)
    if objective == "throughput":
        return max(in_slo, key=best_throughput)

    def within(v: VariantResult) -> float:
        return best_throughput(v, slo_ms)

    fitting = [v for v in trusted if within(v) > 0]
    if not fitting:
        raise SelectionError(f"no passing variant has p95 <= {slo_ms:g} ms even at batch 1")
    return max(fitting, key=within)


def _write_reproduce(out: Path, req: OptimizeRequest) -> None:
    script = out / "reproduce.sh"
    script.write_text(
        "#!/bin/sh\n# Re-runs the optimization that produced this folder (same inputs: compare\n"
        "# report.json 'inputs' digests). Run with Bedside's environment active.\nset -e\n"
        + shlex.join(req.command()) + "\n", encoding="utf-8")
    script.chmod(0o755)


def optimize(req: OptimizeRequest) -> OptimizeResult:
    """Run every step; raises a BedsideError subclass naming the step's problem on failure."""
    return _Optimizer(req).run()


__all__ = ["DEFAULT_PRECISIONS", "OBJECTIVES", "PRECISIONS", "OptimizeRequest",
           "OptimizeResult", "Profile", "optimize", "select"]
