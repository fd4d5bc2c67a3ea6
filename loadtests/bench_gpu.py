"""GPU serving figures for ``--target gpu-torch``, in one run on a machine with a CUDA GPU.

    python -m loadtests.bench_gpu --out gpu-out --triton-dist DIR --triton-libs DIR

For each reference model (MONAI DenseNet121 2-D 1x224x224, the 2-D segmentation UNet 1x256x256;
random seeded weights, synthetic DICOM):
1. ``bedside optimize --target gpu-torch``: PyTorch eager FP32 on the GPU (the baseline) and
   each GPU variant (FP32/FP16/BF16, eager and CUDA graphs) in-process: verification against
   the CPU FP32 golden outputs, latency p50/p95/p99 at batch 1, throughput per batch size, GPU
   memory; the selected variant's Triton repository;
2. that repository served by the bundled tritonserver (python backend, the model on the GPU),
   twice: with dynamic batching, and a copy without it (every request runs alone);
   ``c`` client processes send batch-1 gRPC requests back to back for ``--seconds`` at each
   concurrency; the served outputs are compared with the in-process variant's.
Ratios printed: best variant vs eager FP32 at batch 1; batching vs no batching at the highest
concurrency; Triton-served vs in-process throughput (in-process at the batch size the
concurrency allows).

Triton comes from an unpacked ``nvidia-pytriton`` wheel (``--triton-dist`` is its
``pytriton/tritonserver`` folder, ``--triton-libs`` its ``nvidia_pytriton.libs``); its python
backend stub runs with this interpreter's environment, which must hold torch. The model's I/O
crosses the backend through DLPack, so that environment may have numpy 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("bench_gpu")
MODELS = ("densenet121", "unet2d")


def _nvidia_smi(*query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True,
                              timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "driver": _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def optimize_model(name: str, work: Path, seconds: float) -> dict[str, Any]:
    from optimizer.benchmark import BenchOptions
    from optimizer.pipeline import OptimizeRequest, optimize
    from optimizer.reference import write_reference

    ref_dir = work / name / "reference"
    write_reference(name, ref_dir, None, calibration=4, validation=48)
    req = OptimizeRequest(
        checkpoint=ref_dir / "model.pt", manifest=ref_dir / "manifest.json",
        calibration_dir=ref_dir / "calibration", validation_dir=ref_dir / "validation",
        out_dir=work / name / "optimized", threads=8, target="gpu-torch",
        precisions=("fp32", "fp16", "bf16"),
        bench=BenchOptions(warmup=20, min_runs=100, min_seconds=seconds, max_batch=32,
                           min_gain=0.02))
    t0 = time.perf_counter()
    result = optimize(req)
    report = result.report
    report["optimize_seconds"] = round(time.perf_counter() - t0, 1)
    report["repository_path"] = str(result.repository)
    return report


def serving_repository(reports: dict[str, dict[str, Any]], repo: Path) -> dict[str, str]:
    """Each model's selected variant three times: ``<name>`` as the optimizer wrote it
    (dynamic batching, one instance), ``<name>-nobatch`` without dynamic batching, and
    ``<name>-2inst`` with two instances (two stub processes, each with its own graphs);
    returns served model name -> input name."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    names: dict[str, str] = {}
    for name, report in reports.items():
        src = Path(report["repository_path"]) / name
        for served, batching, instances in ((name, True, 1), (f"{name}-nobatch", False, 1),
                                            (f"{name}-2inst", True, 2)):
            dst = repo / served
            shutil.copytree(src, dst)
            cfg = text_format.Parse((dst / "config.pbtxt").read_text(), mc.ModelConfig())
            cfg.name = served
            if not batching:
                cfg.ClearField("dynamic_batching")
            cfg.instance_group[0].count = instances
            (dst / "config.pbtxt").write_text(text_format.MessageToString(cfg))
            names[served] = cfg.input[0].name
    return names


def _find_libpython() -> str | None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dirs = [sysconfig.get_config_var("LIBDIR") or "", "/usr/lib/x86_64-linux-gnu", "/usr/lib",
            "/usr/local/lib", str(Path(sys.base_prefix) / "lib")]
    for d in dirs:
        if d and (Path(d) / f"libpython{version}.so.1.0").exists():
            return d
    try:  # a Python built elsewhere (uv, pyenv) keeps it beside its own tree
        found = subprocess.run(["find", "/usr", "/opt", "/root", "-name",
                                f"libpython{version}.so.1.0"], capture_output=True, text=True,
                               timeout=60, check=False).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        found = []
    return str(Path(found[0]).parent) if found else None


def _client(url: str, model: str, input_name: str, shape: tuple[int, ...], seconds: float,
            barrier: Any, queue: Any) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    x = np.random.default_rng(os.getpid()).standard_normal((1, *shape)).astype(np.float32)
    inp = grpcclient.InferInput(input_name, [1, *shape], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(5):
        client.infer(model, [inp])
    barrier.wait()
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        client.infer(model, [inp])
        lat.append((time.perf_counter() - t0) * 1000.0)
    queue.put(lat)
    client.close()


def load(url: str, model: str, input_name: str, shape: tuple[int, ...], concurrency: int,
         seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(concurrency), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, model, input_name, shape, seconds, barrier,
                                               queue)) for _ in range(concurrency)]
    for p in procs:
        p.start()
    lats: list[float] = []
    for _ in procs:
        lats += queue.get(timeout=seconds + 120)
    for p in procs:
        p.join(timeout=30)
    arr = np.asarray(lats)
    return {"concurrency": concurrency, "requests": len(lats),
            "throughput_per_s": len(lats) / seconds,
            "p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "p99_ms": float(np.percentile(arr, 99))}


_STAGES = ("nv_inference_request_success", "nv_inference_exec_count",
           "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
           "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
           "nv_inference_request_duration_us")


def triton_counters(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's cumulative per-model counters (requests, executions, stage durations)."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = dict.fromkeys(_STAGES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in out and f'model="{model}"' in line:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def stage_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size Triton formed and mean microseconds per request in each stage."""
    d = {k: after[k] - before[k] for k in _STAGES}
    req = max(d["nv_inference_request_success"], 1.0)
    return {"mean_batch": req / max(d["nv_inference_exec_count"], 1.0),
            "queue_us": d["nv_inference_queue_duration_us"] / req,
            "input_us": d["nv_inference_compute_input_duration_us"] / req,
            "infer_us": d["nv_inference_compute_infer_duration_us"] / req,
            "output_us": d["nv_inference_compute_output_duration_us"] / req,
            "request_us": d["nv_inference_request_duration_us"] / req}


def served_vs_in_process(url: str, name: str, report: dict[str, Any]) -> float:
    """Largest absolute difference between Triton's output and the in-process variant's on the
    same random batch of four (one request each)."""
    import torch
    import tritonclient.grpc as grpcclient

    from optimizer.contract.manifest import Manifest
    from optimizer.triton_backend.torch_runner import TorchRunner, load_torchscript

    model_dir = Path(report["repository_path"]) / name
    manifest = Manifest.load(model_dir / "manifest.json")
    version = model_dir / str(report["version"])
    selected = next(v for v in report["variants"] if v["name"] == report["selected"])
    runner = TorchRunner(load_torchscript(str(version / "model.pt"), "cuda"),
                         manifest.input.shape, selected["precision"], device="cuda",
                         cuda_graphs=bool(selected["details"]["cuda_graphs"]), max_batch=32)
    x = np.random.default_rng(7).standard_normal((4, *manifest.input.shape)).astype(np.float32)
    expected = runner(torch.from_numpy(x)).numpy()
    client = grpcclient.InferenceServerClient(url)
    worst = 0.0
    for i in range(4):
        inp = grpcclient.InferInput(manifest.input.name, [1, *manifest.input.shape], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        got = client.infer(name, [inp]).as_numpy(manifest.output.name)
        worst = max(worst, float(np.abs(got - expected[i:i + 1]).max()))
    client.close()
    del runner
    torch.cuda.empty_cache()
    return worst


def serve_and_load(reports: dict[str, dict[str, Any]], work: Path, dist: Path, libs: Path,
                   concurrencies: list[int], seconds: float) -> dict[str, Any]:
    from services.net import free_port
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

    repo = work / "serving"
    inputs = serving_repository(reports, repo)
    libpython = _find_libpython()
    if libpython:
        os.environ["LD_LIBRARY_PATH"] = ":".join(
            p for p in (os.environ.get("LD_LIBRARY_PATH", ""), libpython) if p)
    install = TritonInstall(env_dir=Path(sys.prefix), dist_dir=dist, libs_dir=libs,
                            python_version=f"{sys.version_info[0]}.{sys.version_info[1]}")
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    server = TritonServer(install, repo, work / "triton", ports)
    out: dict[str, Any] = {"libpython_dir": libpython, "models": {}, "instance_kind": "KIND_GPU"}
    t0 = time.perf_counter()
    try:
        server.start(timeout_s=240)
    except Exception:
        # Triton's own CUDA runtime may not see the GPU even where torch does: the model
        # still runs on cuda:0 from a CPU-kind instance (it picks its device itself).
        out["kind_gpu_error"] = server.log_tail(3000)
        LOG.warning("KIND_GPU instances did not load; retrying with KIND_CPU instances")
        for cfg in repo.glob("*/config.pbtxt"):
            cfg.write_text(cfg.read_text().replace("KIND_GPU", "KIND_CPU"))
        out["instance_kind"] = "KIND_CPU (model on cuda:0)"
        t0 = time.perf_counter()
        try:
            server.start(timeout_s=240)
        except Exception:
            out["error"] = server.log_tail(4000)
            return out
    out["load_seconds"] = round(time.perf_counter() - t0, 1)
    try:
        out["gpu_memory"] = _nvidia_smi("--query-compute-apps=pid,used_memory",
                                        "--format=csv,noheader")
        for name, report in reports.items():
            shape = tuple(report_shape(report))
            entry: dict[str, Any] = {"max_abs_vs_in_process": served_vs_in_process(
                server.grpc_url, name, report)}
            metrics = f"http://127.0.0.1:{ports.metrics}/metrics"
            for served in (name, f"{name}-nobatch", f"{name}-2inst"):
                entry[served] = []
                for c in concurrencies:
                    before = triton_counters(metrics, served)
                    point = load(server.grpc_url, served, inputs[served], shape, c, seconds)
                    point["triton"] = stage_split(before, triton_counters(metrics, served))
                    entry[served].append(point)
                LOG.info("%s: %s", served, entry[served])
            out["models"][name] = entry
    finally:
        server.stop()
    return out


def report_shape(report: dict[str, Any]) -> list[int]:
    from optimizer.contract.manifest import Manifest

    return list(Manifest.load(Path(report["repository_path"]) / report["model"]
                              / "manifest.json").input.shape)


def _row(v: dict[str, Any]) -> str:
    lat = v["latency_ms"]
    thr = " ".join(f"b{p['batch']}:{p['throughput_per_s']:.0f}" for p in v["batches"])
    mem = f"{v['peak_memory_mb']:.0f}" if v.get("peak_memory_mb") is not None else "-"
    verdict = v.get("verdict", "baseline")
    mae = f"{v['mae']:.1e}" if "mae" in v else "-"
    speed = f"{v.get('speedup_vs_pytorch', 1.0):.2f}x"
    return (f"| {v['name']} | {mae} | {verdict} | {lat['p50']:.3f} | {lat['p95']:.3f} | "
            f"{lat['p99']:.3f} | {speed} | {thr} | {mem} |")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# GPU serving figures ({m['date']})", "",
             f"GPU: {m['gpu']}, driver {m['driver']}; torch {m['torch']} (CUDA {m['cuda']}, "
             f"cuDNN {m['cudnn']}), Python {m['python']}, {m['cpus']} CPUs.", ""]
    for name, report in results["optimize"].items():
        if "error" in report:
            lines += [f"## {name}: optimize failed", "", "```", report["error"], "```", ""]
            continue
        lines += [f"## {name} in-process (batch-1 latency ms; throughput items/s per batch)",
                  "", f"Selected: {report['selected']}; optimize took "
                  f"{report['optimize_seconds']} s.", "",
                  "| variant | MAE vs CPU FP32 | verdict | p50 | p95 | p99 | speed-up vs eager "
                  "FP32 | throughput | GPU MB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [_row({**report["baseline"], "name": report["baseline"]["name"] + " (baseline)"})]
        lines += [_row(v) for v in report["variants"]]
        lines.append("")
        for v in report["variants"]:
            if v["reasons"]:
                lines.append(f"- {v['name']} failed: {'; '.join(v['reasons'])}")
        lines.append("")
    serving = results.get("serving", {})
    if "error" in serving:
        lines += ["## Triton: failed", "", "```", serving["error"][-3000:], "```", ""]
    for name, entry in serving.get("models", {}).items():
        report = results["optimize"][name]
        selected = next(v for v in report["variants"] if v["name"] == report["selected"])
        by_batch = {p["batch"]: p["throughput_per_s"] for p in selected["batches"]}
        lines += [f"## {name} served by Triton ({report['selected']}, python backend on the "
                  f"GPU; max |served - in-process| = {entry['max_abs_vs_in_process']:.2e})", "",
                  "| concurrency | batching req/s | p50 ms | p95 ms | p99 ms | no batching "
                  "req/s | p50 ms | batching/no batching | in-process items/s (batch <= c) "
                  "| served/in-process |", "|---|---|---|---|---|---|---|---|---|---|"]
        for on, off in zip(entry[name], entry[f"{name}-nobatch"], strict=True):
            c = on["concurrency"]
            inproc = max((t for b, t in by_batch.items() if b <= c), default=float("nan"))
            lines.append(
                f"| {c} | {on['throughput_per_s']:.0f} | {on['p50_ms']:.2f} | {on['p95_ms']:.2f}"
                f" | {on['p99_ms']:.2f} | {off['throughput_per_s']:.0f} | {off['p50_ms']:.2f} | "
                f"{on['throughput_per_s'] / off['throughput_per_s']:.2f}x | {inproc:.0f} | "
                f"{on['throughput_per_s'] / inproc:.2f} |")
        lines += ["", "Where the time goes inside Triton (mean per request, microseconds; the "
                  "warm-up requests are counted too):", "",
                  "| model | concurrency | req/s | mean batch | queue | compute input "
                  "| compute infer | compute output | request total |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for served in (name, f"{name}-nobatch", f"{name}-2inst"):
            for pt in entry[served]:
                t = pt["triton"]
                lines.append(
                    f"| {served} | {pt['concurrency']} | {pt['throughput_per_s']:.0f} | "
                    f"{t['mean_batch']:.1f} | {t['queue_us']:.0f} | {t['input_us']:.0f} | "
                    f"{t['infer_us']:.0f} | {t['output_us']:.0f} | {t['request_us']:.0f} |")
        lines.append("")
    if serving.get("gpu_memory"):
        lines += [f"Triton GPU memory (pid, used): {serving['gpu_memory']}; models loaded in "
                  f"{serving.get('load_seconds')} s; instances {serving['instance_kind']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--triton-dist", type=Path, default=None)
    parser.add_argument("--triton-libs", type=Path, default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=4.0, help="per load point")
    parser.add_argument("--bench-seconds", type=float, default=0.5,
                        help="per in-process batch point")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu needs a CUDA GPU visible to PyTorch; none here", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bedside-bench-gpu"
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {"machine": machine(), "optimize": {}}
    reports: dict[str, dict[str, Any]] = {}

    def save() -> None:
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "bench_gpu.md").write_text(markdown(results))

    for name in args.models.split(","):
        try:
            reports[name] = optimize_model(name, work, args.bench_seconds)
            results["optimize"][name] = reports[name]
            shutil.copy(work / name / "optimized" / "report.md", args.out / f"report_{name}.md")
        except Exception:
            results["optimize"][name] = {"error": traceback.format_exc()[-3000:]}
        save()
    if args.triton_dist and reports:
        try:
            results["serving"] = serve_and_load(
                reports, work, args.triton_dist, args.triton_libs or args.triton_dist,
                [int(c) for c in args.concurrency.split(",")], args.seconds)
        except Exception:
            results["serving"] = {"error": traceback.format_exc()[-3000:]}
        log = work / "triton" / "tritonserver.log"
        if log.exists():
            shutil.copy(log, args.out / "tritonserver.log")
        save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
