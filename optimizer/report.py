"""The optimization report: report.json (stable keys), report.md and plots, for sign-off."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from optimizer.benchmark import Latency, Profile
from optimizer.contract.manifest import Manifest
from optimizer.verify import Verification

REPORT_VERSION = 2


@dataclass(frozen=True)
class VariantResult:
    name: str
    precision: str
    runtime: str
    file: str
    size_bytes: int
    verification: Verification
    profile: Profile
    speedup: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "pass" if self.verification.passed else "fail"


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _latency(lat: Latency) -> dict[str, float]:
    return {"p50": round(lat.p50_ms, 4), "p95": round(lat.p95_ms, 4),
            "p99": round(lat.p99_ms, 4), "mean": round(lat.mean_ms, 4), "runs": lat.runs}


def _profile(prof: Profile) -> dict[str, Any]:
    return {
        "latency_ms": _latency(prof.batch1),
        "batches": [{"batch": p.batch, "p50_ms": round(p.latency.p50_ms, 4),
                     "p95_ms": round(p.latency.p95_ms, 4), "p99_ms": round(p.latency.p99_ms, 4),
                     "throughput_per_s": round(p.throughput, 2),
                     "spread": None if p.spread is None else round(p.spread, 4)}
                    for p in prof.points],
        "unstable": list(prof.unstable),
        "best_throughput_per_s": round(prof.best.throughput, 2),
        "best_throughput_batch": prof.best.batch,
        "peak_memory_mb": None if prof.peak_memory_mb is None else round(prof.peak_memory_mb, 1),
    }


def build_report(
    manifest: Manifest, threads: int, objective: str, target: str, inputs: dict[str, str],
    validation_size: int, baseline: Profile, variants: list[VariantResult],
    selected: str | None, repository: str | None, version: int | None,
    not_built: list[dict[str, str]],
    baseline_name: str = "pytorch-eager", baseline_runtime: str = "torch",
    device: dict[str, str] | None = None,
    hardware: dict[str, Any] | None = None, steps: list[dict[str, Any]] | None = None,
    benchmark: dict[str, Any] | None = None, selection_error: str | None = None,
) -> dict[str, Any]:
    """The report's content; ``device`` describes the GPU for GPU targets (baseline and
    variants then ran on it, and peak memory is GPU memory). ``selected`` is None when
    nothing could be selected (``selection_error`` says why): the report still holds every
    measurement and every variant's reasons. ``benchmark`` describes the timing window (how,
    load average, denormals); without it the runtimes were measured one after another."""
    ref = variants[0].verification
    return {
        "report_version": REPORT_VERSION,
        "model": manifest.name,
        "version": version,
        "task": manifest.task,
        "machine": {**machine(), **({"device": device} if device else {})},
        "hardware": hardware or {},
        "threads": threads,
        "objective": objective,
        "target": target,
        "inputs_sha256": inputs,
        "validation": {"instances": validation_size, "metric": ref.metric,
                       "reference": ref.metric_reference,
                       "output_spread": ref.reference_spread},
        "benchmark": benchmark or {"method": "one runtime after another", "unstable": []},
        "baseline": {"name": baseline_name, "runtime": baseline_runtime, "precision": "fp32",
                     **_profile(baseline)},
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
                "relative_mae": v.verification.relative_mae,
                "tolerance_rule": v.verification.rule,
                "metric": v.verification.metric,
                "metric_value": v.verification.metric_value,
                "metric_delta": v.verification.metric_delta,
                "decision_agreement": v.verification.agreement,
                "verdict": v.verdict,
                "reasons": list(v.verification.reasons),
                **_profile(v.profile),
                "speedup_vs_pytorch": round(v.speedup, 3),
                "details": v.details,
            }
            for v in variants
        ],
        "not_built": not_built,
        "selected": selected,
        "selection_error": selection_error,
        "repository": repository,
        "plots": ["latency_vs_batch.png", "accuracy_vs_speed.png"],
        "steps": steps or [],
    }


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    metric = report["validation"]["metric"].upper()
    base = report["baseline"]
    lines = [
        f"# Optimization report: {report['model']} v{report['version']} ({report['task']})",
        "",
        f"Machine: {m['cpu_model'] or m['processor']}, {m['cpus']} CPUs, {m['platform']}; "
        f"{report['threads']} inference threads; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}. Objective: {report['objective']}; target: {report['target']}.",
        *([f"GPU: {m['device']['gpu']} (compute capability {m['device']['capability']}, "
           f"{m['device']['memory_gib']} GiB, CUDA {m['device']['cuda']}); baseline and "
           "variants ran on it, peak memory is GPU memory."] if "device" in m else []),
        f"Validation: {report['validation']['instances']} labelled instances, PyTorch FP32 "
        f"{metric} {report['validation']['reference']:.4f}. Latency at batch 1.",
        *_benchmark_lines(report),
        "",
        f"| variant | precision | runtime | MAE | {metric} delta | agreement | verdict "
        "| p50 ms | p95 ms | p99 ms | best throughput /s (batch) | speed-up vs PyTorch | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {base['name']} (baseline{', unstable' if base.get('unstable') else ''}) | fp32 "
        f"| {base['runtime']} | - | - | - | reference "
        f"| {base['latency_ms']['p50']:.3f} | {base['latency_ms']['p95']:.3f} "
        f"| {base['latency_ms']['p99']:.3f} | {base['best_throughput_per_s']:.1f} "
        f"({base['best_throughput_batch']}) | 1.00x | - |",
    ]
    for v in report["variants"]:
        lat = v["latency_ms"]
        lines.append(
            f"| {v['name']} | {v['precision']} | {v['runtime']} | {v['mae']:.2e} "
            f"| {v['metric_delta']:+.4f} | {v['decision_agreement']:.4f} | {v['verdict']} "
            f"| {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} "
            f"| {v['best_throughput_per_s']:.1f} ({v['best_throughput_batch']}) "
            f"| {v['speedup_vs_pytorch']:.2f}x{' (unstable)' if v.get('unstable') else ''} "
            f"| {v['size_bytes'] / 1e6:.2f} |"
        )
    if report["selected"] is None:
        lines += ["", f"Selected: **none**: {report.get('selection_error')}. No repository "
                      "was written; every measurement and reason is above and below.", ""]
    else:
        lines += ["", f"Selected: **{report['selected']}** (objective: {report['objective']}).",
                  f"Triton model repository: `{report['repository']}` (version "
                  f"{report['version']}, target {report['target']}).", ""]
    # every batch size any runtime reached: a variant's best batch is never left out
    sizes = sorted({p["batch"] for row in [base, *report["variants"]] for p in row["batches"]})
    lines += ["Throughput by batch size (items/s; - where that runtime's sweep had stopped):",
              "", "| runtime | " + " | ".join(f"b{b}" for b in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for row in [base, *report["variants"]]:
        cells = {p["batch"]: f"{p['throughput_per_s']:.1f}" for p in row["batches"]}
        lines.append(f"| {row['name']} | " + " | ".join(cells.get(b, "-") for b in sizes) + " |")
    lines.append("")
    lines += [f"Tolerance for {v['name']}: {v['tolerance_rule']}." for v in report["variants"]
              if v.get("tolerance_rule")]
    lines.append("")
    for v in report["variants"]:
        broken = [t for t in v["details"].get("calibration_trials", []) if t.get("error")]
        if broken:
            lines.append(f"INT8 calibration methods that failed for {v['name']} (the others "
                         "went on): " + "; ".join(f"{t['calibration_method']}: {t['error']}"
                                                  for t in broken) + ".")
        if v["details"].get("fp32_nodes"):
            nodes = v["details"]["fp32_nodes"]
            lines.append(f"Accuracy recovery for {v['name']} (tuned on half of the validation "
                         "set, verified on the whole set and on the held-out half): "
                         f"{len(nodes)} nodes kept in FP32 "
                         f"({', '.join(nodes[:12])}{', ...' if len(nodes) > 12 else ''}); "
                         f"plain INT8 failed: {'; '.join(v['details']['plain_int8_reasons'])}.")
    failing = [v for v in report["variants"] if v["reasons"]]
    if failing:
        lines += ["", "Why variants failed:"]
        lines += [f"- {v['name']}: {'; '.join(v['reasons'])}" for v in failing]
    if report["not_built"]:
        lines += ["", "Not built: " + "; ".join(f"{s['name']} ({s['status']}: {s['reason']})"
                                                for s in report["not_built"]) + "."]
    lines += _hardware_lines(report)
    if report.get("steps"):
        total = sum(s["seconds"] for s in report["steps"])
        lines += ["", f"Step durations ({total:.0f} s in all, report writing excluded): "
                  + ", ".join(f"{s['name']} {s['seconds']:.1f} s"
                              + ("" if s["status"] == "ok" else f" ({s['status']})")
                              for s in report["steps"]) + "."]
    lines += ["",
              "![latency vs batch size](latency_vs_batch.png)",
              "![accuracy vs speed](accuracy_vs_speed.png)", ""]
    return "\n".join(lines)


def _benchmark_lines(report: dict[str, Any]) -> list[str]:
    """How the figures were taken, and which ones cannot be trusted and why."""
    bench = report.get("benchmark") or {}
    if "load_average" not in bench:
        return [f"Timing: {bench.get('method', 'one runtime after another')}."]
    load = bench["load_average"]
    lines = [f"Timing: {bench['method']}, in one window ({bench['attempts']} batch-1 "
             f"window(s)); load average {load[0]} at its start, {load[1]} at its end, on "
             f"{bench['cpus']} CPUs. Denormals: {bench['denormals']}."]
    rows = [report["baseline"], *report["variants"]]
    shaky = [f"{r['name']} ({'; '.join(r['unstable'])})" for r in rows if r.get("unstable")]
    if shaky:
        lines.append("**Unstable figures** (not selected on while a stable passing variant "
                     "exists; re-run on a quiet machine before trusting them): "
                     + ", ".join(shaky) + ".")
    return lines


def _hardware_lines(report: dict[str, Any]) -> list[str]:
    """The CPU features that decide speed, and what each OpenVINO variant used."""
    hw = report.get("hardware") or {}
    if not hw:
        return []
    have = [name for name, present in hw["cpu_features"].items() if present]
    lacks = [name for name, present in hw["cpu_features"].items() if not present]
    ov = hw["openvino_settings"]
    lines = ["", f"CPU features: {', '.join(have) or 'none of note'}"
             f"{'; lacks ' + ', '.join(lacks) if lacks else ''}. Paths: FP32 "
             f"{hw['paths']['fp32']}, BF16 {hw['paths']['bf16']}, INT8 {hw['paths']['int8']}. "
             f"OpenVINO {hw.get('openvino', 'not installed')} (NNCF {hw.get('nncf', '-')}): "
             f"{ov['threads']} threads, {ov['streams']} stream(s), hint {ov['hint']}."]
    for v in report["variants"]:
        d = v["details"]
        if "kernels" not in d:
            continue
        kernels = ", ".join(f"{k} x{n}" for k, n in d["kernels"].items())
        check = d.get("cluster_check", {})
        loads = ("loads in " + check["triton_image"] + f" (OpenVINO {check['openvino']}, IR v"
                 f"{check['ir_version']}, newest opset{check['newest_opset']})") \
            if check.get("loads") else f"does not load in the cluster image: " \
            f"{'; '.join(check.get('problems', []))}"
        lines.append(f"- {v['name']}: inference precision {d['inference_precision']}, "
                     f"{d['cpu_path']}; kernels {kernels}; IR {loads}.")
        if d.get("accuracy_control"):
            ac = d["accuracy_control"]
            lines.append(f"  NNCF accuracy control (at most {ac['max_iterations']} iterations): "
                         f"{len(ac['fp32_ops'])} ops back in floating point; gate score "
                         f"{ac['score_plain']} -> {ac['score_final']} (<= 1 passes) on the "
                         f"validation set's tuning half ({d.get('tuned_on_items', '?')} items); "
                         f"verified on the whole set and on the held-out half "
                         f"({d.get('held_out_items', '?')} items) it did not see.")
    return lines


def write_plots(out_dir: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["baseline"], *report["variants"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot([p["batch"] for p in row["batches"]], [p["p50_ms"] for p in row["batches"]],
                marker="o", label=row["name"])
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)",
           title=f"{report['model']}: latency vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_batch.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in report["variants"]:
        ax.scatter(v["speedup_vs_pytorch"], v["metric_delta"],
                   marker="o" if v["verdict"] == "pass" else "x", s=60)
        ax.annotate(v["name"], (v["speedup_vs_pytorch"], v["metric_delta"]), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(xlabel="speed-up vs PyTorch eager FP32 (batch 1)",
           ylabel=f"{report['validation']['metric'].upper()} delta vs FP32",
           title="accuracy vs speed (x = failed verification)")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_speed.png", dpi=110)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite figure (a variant that overflowed) is null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    js, md = out_dir / "report.json", out_dir / "report.md"
    js.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n",
                  encoding="utf-8")
    md.write_text(render_markdown(report), encoding="utf-8")
    write_plots(out_dir, report)
    return js, md
