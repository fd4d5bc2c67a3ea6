"""The OpenVINO variants of ``bedside optimize``: FP32, BF16 and INT8 (NNCF), each saved as
OpenVINO IR (model.xml + model.bin) and verified like the ONNX Runtime ones.

- ``openvino-fp32``: the exported ONNX read by OpenVINO, run with an explicit f32 inference
  precision (the CPU plugin would otherwise pick BF16 on CPUs that have it).
- ``openvino-bf16``: the same IR with the BF16 inference-precision hint; built only where the
  CPU has native BF16 (AVX-512 BF16 or AMX), since elsewhere OpenVINO would emulate it slowly.
  Verified against its own rung of the ladder (optimizer.verify, 'bf16').
- ``openvino-int8``: NNCF post-training quantization on the calibration inputs; when it fails
  verification, NNCF's accuracy-controlled quantization (optimizer.ov_quantize) with the
  recovery bound of the request, recording the ops kept in floating point.

Every IR written here is checked against the OpenVINO release of the cluster's Triton image
(optimizer.ov_repository.ir_check) and the result goes to the variant's details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.benchmark import BenchOptions, Profile
from optimizer.contract.manifest import Manifest
from optimizer.cpu_features import bf16_path, cpu_flags, fp32_path, int8_path
from optimizer.errors import QuantizationError
from optimizer.ov_quantize import OvInt8
from optimizer.ov_repository import ir_check
from optimizer.ov_runtime import (
    OvOptions,
    capabilities,
    compile_model,
    kernels,
    profile_openvino,
    read,
    run,
    save,
)
from optimizer.steps import StepLog, optional_step
from optimizer.verify import Verification

LOG = logging.getLogger(__name__)


@dataclass
class OvVariant:
    name: str
    precision: str
    path: Path  # the IR's model.xml
    verification: Verification
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OvJob:
    """What the OpenVINO steps need from the pipeline."""

    fp32_onnx: Path
    variants_dir: Path
    manifest: Manifest
    inputs: np.ndarray  # validation inputs
    labels: np.ndarray
    golden: np.ndarray
    calibration: np.ndarray
    options: OvOptions
    precisions: tuple[str, ...]
    mae_tolerances: dict[str, float]
    recovery: bool
    recovery_max_fraction: float
    verify: Callable[[str, np.ndarray], Verification]
    # (tuning, held-out) indices of the validation set, and the held-out verdict of a variant
    # tuned on the first (verify.tuning_split, verify.with_held_out)
    split: tuple[np.ndarray, np.ndarray]
    held_out: Callable[[Verification, np.ndarray], Verification]


def _details(precision: str, options: OvOptions, compiled: Any, xml: Path,
             flags: frozenset[str]) -> dict[str, Any]:
    isa = {"fp32": fp32_path(flags), "bf16": bf16_path(flags) or "emulated",
           "int8": int8_path(flags)}[precision]
    return {"inference_precision": options.properties(precision)["INFERENCE_PRECISION_HINT"],
            "threads": options.threads, "streams": options.streams, "hint": options.hint,
            "cpu_path": isa, "kernels": kernels(compiled), "cluster_check": ir_check(xml)}


def _checked(job: OvJob, name: str, precision: str, xml: Path,
             flags: frozenset[str], extra: dict[str, Any] | None = None,
             tuned: bool = False) -> OvVariant:
    """Verified on the validation set; a ``tuned`` variant on its held-out half as well."""
    compiled = compile_model(read(xml), precision, job.options)
    outputs = run(compiled, job.inputs)
    verification = job.verify(precision, outputs)
    if tuned:
        verification = job.held_out(verification, outputs)
    return OvVariant(name, precision, xml, verification,
                     {**_details(precision, job.options, compiled, xml, flags), **(extra or {})})


def build(job: OvJob, log: StepLog) -> list[OvVariant]:
    """Every requested OpenVINO variant that can be built; the others are logged as skipped
    or failed with their reason, and the pipeline goes on."""

    flags = cpu_flags()
    built: list[OvVariant] = []

    def fp32_ir() -> Path:
        return save(read(job.fp32_onnx), job.variants_dir / "openvino-fp32")

    xml = optional_step(log, "openvino_ir", fp32_ir)
    if xml is None:
        for p in job.precisions:
            log.skipped(f"openvino_{p}", "the FP32 ONNX could not be converted to OpenVINO IR")
        return built
    def fp32() -> OvVariant:
        return _checked(job, "openvino-fp32", "fp32", xml, flags)

    def bf16() -> OvVariant:
        # the FP32 IR run with the BF16 hint, in its own folder so that the repository
        # writer copies a self-contained version
        return _checked(job, "openvino-bf16", "bf16",
                        save(read(xml), job.variants_dir / "openvino-bf16"), flags)

    steps: dict[str, Callable[[], OvVariant]] = {
        "fp32": fp32, "bf16": bf16, "int8": lambda: _int8(job, xml, flags)}
    for precision, step in steps.items():
        if precision not in job.precisions:
            continue
        why_not = _bf16_unsupported(flags) if precision == "bf16" else None
        if why_not:
            log.skipped(f"openvino_{precision}", why_not)
        elif (v := optional_step(log, f"openvino_{precision}", step)) is not None:
            built.append(v)
    return built


def _bf16_unsupported(flags: frozenset[str]) -> str | None:
    if bf16_path(flags) is None:
        return "the CPU has no native BF16 (neither AVX-512 BF16 nor AMX-BF16)"
    if "BF16" not in capabilities():
        return "OpenVINO's CPU plugin does not offer BF16 on this CPU"
    return None


def _int8(job: OvJob, fp32_xml: Path, flags: frozenset[str]) -> OvVariant:
    quantizer = OvInt8(read(fp32_xml), job.calibration)
    plain_model = quantizer.quantize()
    plain_xml = save(plain_model, job.variants_dir / "openvino-int8")
    plain = _checked(job, "openvino-int8", "int8", plain_xml, flags,
                     {"quantizer": "nncf", "calibration_inputs": len(job.calibration)})
    if plain.verification.passed or not job.recovery:
        return plain
    tolerance = plain.verification.mae_ceiling  # the rule that failed it, in absolute MAE
    LOG.info("OpenVINO INT8 failed (%s): accuracy-controlled quantization",
             "; ".join(plain.verification.reasons))
    tune = job.split[0]  # accuracy control sees the tuning half only
    model, control = quantizer.accuracy_controlled(
        plain_model, job.inputs[tune], job.golden[tune], job.labels[tune], job.manifest,
        tolerance, job.recovery_max_fraction)
    xml = save(model, job.variants_dir / "openvino-int8-ac")
    result = _checked(job, "openvino-int8-ac", "int8", xml, flags, {
        "quantizer": "nncf accuracy control", "calibration_inputs": len(job.calibration),
        "fp32_nodes": control.reverted_ops, "accuracy_control": control.as_dict(),
        "plain_int8_reasons": list(plain.verification.reasons),
        "tuned_on_items": len(tune), "held_out_items": len(job.split[1])}, tuned=True)
    if not result.verification.passed:
        LOG.info("OpenVINO accuracy control stopped at its bound (%d iterations) without "
                 "passing", control.max_iterations)
    return result


def profile(variant_xml: Path, precision: str, sample: np.ndarray, options: OvOptions,
            bench: BenchOptions, deadline: float | None = None) -> Profile:
    try:
        return profile_openvino(read(variant_xml), precision, sample, options, bench, deadline)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"OpenVINO benchmark of {variant_xml.parent.name} failed: "
                                f"{exc}") from exc


def hardware(options: OvOptions) -> dict[str, Any]:
    """What the report says about the CPU: the features that decide speed, the path each
    precision can take, and the OpenVINO settings used (threads, streams, hint)."""
    from optimizer.cpu_features import speed_features
    from optimizer.ov_runtime import available, versions

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu_features": speed_features(flags),
        "paths": {"fp32": fp32_path(flags), "bf16": bf16_path(flags) or "emulated (no native "
                  "BF16)", "int8": int8_path(flags)},
        "openvino_settings": {"threads": options.threads, "streams": options.streams,
                              "hint": options.hint},
    }
    if available() is None:
        info["openvino_capabilities"] = list(capabilities())
        info.update(versions())
    return info
