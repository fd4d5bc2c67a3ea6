"""CPU runtimes side by side on one model, in one run, alternating: PyTorch eager FP32, ONNX
Runtime FP32 and INT8 (QDQ), OpenVINO FP32, BF16 (where the CPU has it) and INT8 (NNCF).

    python -m loadtests.bench_runtimes --reference bedside-ref/densenet121 --out bench-cpu

``--reference`` is a folder ``bedside reference`` wrote (model.pt, manifest.json, calibration/,
validation/). Every runtime gets the same thread count and batch-1 inputs; the rounds go
through the runtimes in turn so that other work on the machine, which comes and goes, weighs
on all alike; each runtime's p50 is the median of its per-round p50s. The INT8 variants are
also checked against PyTorch (MAE on the validation inputs) so that a fast wrong answer shows.
Writes runtimes.json and runtimes.md (the CPU named, from lscpu).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} vCPU)"


def build(reference: Path, work: Path, threads: int, calibration: int
          ) -> tuple[dict[str, Callable[[], object]], dict[str, float], np.ndarray]:
    """Every runtime's batch-1 call, and each one's MAE against PyTorch on validation."""
    import torch

    from optimizer import checkpoint, ov_runtime
    from optimizer.benchmark import onnx_session, run_onnx, run_torch
    from optimizer.contract.manifest import Manifest
    from optimizer.cpu_features import bf16_path, cpu_flags
    from optimizer.dataset import load_inputs, load_labelled
    from optimizer.export import export_onnx
    from optimizer.ov_quantize import OvInt8
    from optimizer.quantize import Int8Quantizer

    torch.set_num_threads(threads)
    manifest = Manifest.load(reference / "manifest.json")
    model = checkpoint.load(reference / "model.pt")
    val = load_labelled(reference / "validation", manifest).inputs
    cal = load_inputs(reference / "calibration", manifest, limit=calibration)
    golden = run_torch(model, val)
    x = np.ascontiguousarray(val[:1])
    calls: dict[str, Callable[[], object]] = {}
    mae: dict[str, float] = {}

    tensor = torch.from_numpy(x)

    def eager() -> object:
        with torch.inference_mode():
            return model(tensor)

    calls["pytorch-eager-fp32"] = eager
    fp32 = export_onnx(model, manifest, work / "model.onnx")
    int8 = Int8Quantizer(fp32, work / "int8", manifest.input.name, cal).quantize(
        work / "model.int8.onnx", "minmax")
    for name, path in (("onnxruntime-fp32", fp32), ("onnxruntime-int8-qdq", int8)):
        session = onnx_session(path, threads)
        mae[name] = float(np.abs(run_onnx(session, val) - golden).mean())
        calls[name] = (lambda s, n: lambda: s.run(None, {n: x}))(session,
                                                                 manifest.input.name)
    options = ov_runtime.OvOptions(threads=threads)
    ov_model = ov_runtime.read(fp32)
    ov_int8 = OvInt8(ov_model, cal).quantize()
    precisions = [("openvino-fp32", ov_model, "fp32"), ("openvino-int8-nncf", ov_int8, "int8")]
    if bf16_path(cpu_flags()) is not None:
        precisions.insert(1, ("openvino-bf16", ov_model, "bf16"))
    for name, m, precision in precisions:
        compiled = ov_runtime.compile_model(m, precision, options)
        mae[name] = float(np.abs(ov_runtime.run(compiled, val) - golden).mean())
        request = compiled.create_infer_request()
        calls[name] = (lambda r: lambda: r.infer([x]))(request)
    return calls, mae, x


def measure(calls: dict[str, Callable[[], object]], rounds: int, seconds: float
            ) -> dict[str, dict[str, float]]:
    from optimizer.benchmark import time_calls

    per_round: dict[str, list[float]] = {name: [] for name in calls}
    means: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            lat = time_calls(call, warmup=5, min_runs=10, min_seconds=seconds)
            per_round[name].append(lat.p50_ms)
            means[name].append(lat.mean_ms)
            LOG.info("round %d/%d %s: p50 %.2f ms", r + 1, rounds, name, lat.p50_ms)
    return {name: {"p50_ms": round(statistics.median(v), 3), "p50_min_ms": round(min(v), 3),
                   "p50_max_ms": round(max(v), 3),
                   "throughput_per_s": round(1000.0 / statistics.median(means[name]), 2)}
            for name, v in per_round.items()}


def render(result: dict[str, Any]) -> str:
    rows = result["runtimes"]
    eager = rows["pytorch-eager-fp32"]["p50_ms"]
    lines = [f"{result['model']} {result['input']}, batch 1, {result['threads']} threads, "
             f"{result['rounds']} alternating rounds; CPU: {result['cpu']}.", "",
             "| runtime | p50 ms (median of rounds) | range of round p50s | speed-up vs eager "
             "| MAE vs PyTorch |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        mae = result["mae"].get(name)
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p50_min_ms']:.2f}-{r['p50_max_ms']:.2f}"
                     f" | {eager / r['p50_ms']:.2f}x | {'-' if mae is None else f'{mae:.2e}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-cpu"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="per runtime per round")
    p.add_argument("--calibration", type=int, default=32)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bedside-runtimes-") as work:
        calls, mae, x = build(args.reference, Path(work), args.threads, args.calibration)
        rows = measure(calls, args.rounds, args.seconds)
    manifest = json.loads((args.reference / "manifest.json").read_text())
    result = {"model": manifest["name"], "input": "x".join(map(str, x.shape)),
              "threads": args.threads, "rounds": args.rounds, "cpu": cpu_name(),
              "runtimes": rows, "mae": mae}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtimes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "runtimes.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
