"""The optimization report: report.json (stable keys) and report.md (for a human to sign off)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from optimizer.benchmark import Latency
from optimizer.verify import Verification

REPORT_VERSION = 1


@dataclass(frozen=True)
class VariantResult:
    name: str
    precision: str
    runtime: str
    file: str
    size_bytes: int
    verification: Verification
    latency: Latency
    speedup: float

    @property
    def verdict(self) -> str:
        return "pass" if self.verification.passed else "fail"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _latency(lat: Latency) -> dict[str, float]:
    return {"p50": round(lat.p50_ms, 4), "p95": round(lat.p95_ms, 4),
            "p99": round(lat.p99_ms, 4), "mean": round(lat.mean_ms, 4), "runs": lat.runs}


def build_report(
    model: str, version: int, threads: int, validation_size: int, baseline: Latency,
    variants: list[VariantResult], selected: str, repository: str,
) -> dict[str, Any]:
    return {
        "report_version": REPORT_VERSION,
        "model": model,
        "version": version,
        "machine": machine(),
        "threads": threads,
        "batch_size": 1,
        "validation": {"instances": validation_size,
                       "auc_reference": variants[0].verification.auc_reference},
        "baseline": {"runtime": "pytorch-eager", "precision": "fp32",
                     "latency_ms": _latency(baseline)},
        "variants": [
            {
                "name": v.name,
                "precision": v.precision,
                "runtime": v.runtime,
                "file": v.file,
                "size_bytes": v.size_bytes,
                "mae": v.verification.mae,
                "max_abs_error": v.verification.max_abs,
                "mae_tolerance": v.verification.mae_tolerance,
                "auc": v.verification.auc,
                "auc_delta": v.verification.auc_delta,
                "decision_agreement": v.verification.agreement,
                "verdict": v.verdict,
                "reasons": list(v.verification.reasons),
                "latency_ms": _latency(v.latency),
                "speedup_vs_pytorch": round(v.speedup, 3),
            }
            for v in variants
        ],
        "selected": selected,
        "repository": repository,
    }


def render_markdown(report: dict[str, Any]) -> str:
    base = report["baseline"]["latency_ms"]
    lines = [
        f"# Optimization report: {report['model']} v{report['version']}",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs; "
        f"{report['threads']} inference threads; batch size {report['batch_size']}; "
        f"torch {report['machine']['torch']}, onnxruntime {report['machine']['onnxruntime']}.",
        f"Validation: {report['validation']['instances']} labelled instances, "
        f"PyTorch FP32 AUC {report['validation']['auc_reference']:.4f}.",
        "",
        "| variant | precision | runtime | MAE | AUC delta | agreement | verdict "
        "| p50 ms | p95 ms | speed-up vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| pytorch-eager (baseline) | fp32 | torch | - | - | - | reference "
        f"| {base['p50']:.3f} | {base['p95']:.3f} | 1.00x |",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {v['precision']} | {v['runtime']} | {v['mae']:.2e} "
            f"| {v['auc_delta']:+.4f} | {v['decision_agreement']:.4f} | {v['verdict']} "
            f"| {v['latency_ms']['p50']:.3f} | {v['latency_ms']['p95']:.3f} "
            f"| {v['speedup_vs_pytorch']:.2f}x |"
        )
    lines += ["", f"Selected: **{report['selected']}** (lowest p50 among variants that pass).",
              f"Triton model repository: `{report['repository']}`.", ""]
    failing = [v for v in report["variants"] if v["reasons"]]
    if failing:
        lines.append("Why variants failed:")
        lines += [f"- {v['name']}: {'; '.join(v['reasons'])}" for v in failing]
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    js, md = out_dir / "report.json", out_dir / "report.md"
    js.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report), encoding="utf-8")
    return js, md
