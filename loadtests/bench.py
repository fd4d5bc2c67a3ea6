"""The benchmark harness: one command, one run on this machine, ratios side by side.

    python -m loadtests.bench --optimized bedside-demo --out bench-out

Rows (all measured now, here; nothing is read back from earlier runs):

1. the selected variant (the model file in the Triton repository, ONNX Runtime in-process) vs
   PyTorch eager FP32 (the optimizer's checkpoint), batch 1, the same thread count;
2. Triton-served vs in-process throughput at several concurrencies: ``c`` gRPC clients sending
   batch-1 requests back to back to the real bundled Triton, vs ``c`` threads calling one
   in-process ONNX Runtime session with the same intra-op threads as the served model;
3. gateway end to end (``POST /v1/infer`` with a 512x512 CR instance, decode + preprocess +
   Triton + result) vs the same model called directly on Triton with the ready tensor, and the
   gateway's own overhead from each response's ``timings_ms`` (everything but the Triton call);
4. DIMSE ingest (durable C-STORE acks, dcmtk storescu) vs Orthanc, from
   ``loadtests.bench_ingest``.

Rows 3 and 4 are measured for each gateway process count of ``--processes`` (default ``1,0``:
one process, then the gateway's default of one per CPU given), one after the other in the
same run, and a last table puts the issue's figures side by side per process count: REST
throughput at concurrency 4 vs 1, gateway vs direct Triton at concurrency 4, the gateway
overhead p50 at concurrency 1 and 4, DIMSE ingest vs Orthanc with 1 and 4 associations.

It prints the machine (CPU, cores, load average: other work on the machine depresses every
absolute figure, ratios less so), writes ``bench.json`` (for comparing runs), ``bench.md`` and
``throughput_vs_concurrency.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shlex
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.payloads import Payloads
from loadtests.stack import Endpoints, Stack, expected_processes
from optimizer.contract.manifest import Manifest

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """Closed-loop load: ``concurrency`` workers calling back to back for a duration."""

    concurrency: int
    requests: int
    errors: int
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    seconds: float = 0.0
    samples_ms: tuple[float, ...] = ()


def _load(concurrency: int, samples: list[float], errors: int, seconds: float) -> Load:
    flat = np.asarray(samples or [np.nan])
    return Load(concurrency, len(samples), errors, round(len(samples) / seconds, 2),
                round(float(np.percentile(flat, 50)), 3), round(float(np.percentile(flat, 95)), 3),
                seconds, tuple(samples))


def interleaved(a: Callable[[], Callable[[], object]], b: Callable[[], Callable[[], object]],
                concurrency: int, seconds: float, rounds: int = 3) -> tuple[Load, Load]:
    """``a`` and ``b`` measured in alternating slices, so that other work on the machine,
    which comes and goes, weighs on both alike; each side's figures over all its slices."""
    from optimizer.benchmark import alternate  # the optimizer's comparisons take turns alike

    parts = alternate([lambda: closed_loop(a, concurrency, seconds / rounds),
                       lambda: closed_loop(b, concurrency, seconds / rounds)], rounds)
    merged = [_load(concurrency, [x for p in side for x in p.samples_ms],
                    sum(p.errors for p in side), sum(p.seconds for p in side))
              for side in parts]
    return merged[0], merged[1]


def closed_loop(make_call: Callable[[], Callable[[], object]], concurrency: int,
                seconds: float) -> Load:
    """Each worker gets its own ``make_call()`` (its own client), warms up once untimed, then
    all start together."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    gate = threading.Barrier(concurrency + 1, timeout=120)

    def worker(i: int) -> None:
        call: Callable[[], object] | None = None
        try:
            call = make_call()
            call()  # warm-up: connections, first-call costs
        except Exception:  # a failed warm-up is an error, and the worker still starts
            errors[i] += 1
        gate.wait()
        if call is None:
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                call()
                lat[i].append((time.perf_counter() - t0) * 1000.0)
            except Exception:  # counted, reported; the run goes on
                errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return _load(concurrency, [x for w in lat for x in w], sum(errors), elapsed)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": round(os.getloadavg()[0], 2)}


def _checkpoint(optimized: Path) -> Path:
    """The checkpoint the optimizer ran on, as its reproduce.sh names it (else ``model/``
    inside the folder, where ``bedside demo`` puts it)."""
    script = optimized / "reproduce.sh"
    if script.exists():
        for line in script.read_text(encoding="utf-8").splitlines():
            if line.startswith("bedside optimize"):
                args = shlex.split(line)
                named = Path(args[args.index("--checkpoint") + 1])
                if named.exists():
                    return named
    return optimized / "model" / "model.pt"


def variant_vs_eager(optimized: Path, version_dir: Path, sample: np.ndarray,
                     threads: int) -> list[dict[str, Any]]:
    """At the served thread count and at one thread: PyTorch's intra-op threads suffer badly
    when other work shares the cores (spinning OpenMP workers), one thread much less."""
    import torch

    from loadtests.inprocess import load
    from optimizer import checkpoint
    from optimizer.benchmark import time_calls

    model = checkpoint.load(_checkpoint(optimized))
    tensor = torch.from_numpy(sample)

    def eager() -> object:
        with torch.inference_mode():
            return model(tensor)

    rows = []
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        variant = load(version_dir, n)
        torch_lat = time_calls(eager, warmup=10, min_runs=100, min_seconds=3.0)
        onnx_lat = time_calls(variant.make(sample.astype(variant.dtype)), warmup=10,
                              min_runs=100, min_seconds=3.0)
        rows.append({"threads": n, "runtime": variant.runtime,
                     "pytorch_eager_p50_ms": round(torch_lat.p50_ms, 3),
                     "variant_p50_ms": round(onnx_lat.p50_ms, 3),
                     "speedup": round(torch_lat.p50_ms / onnx_lat.p50_ms, 2)})
    return rows


def triton_vs_inprocess(ends: Endpoints, version_dir: Path, manifest: Manifest,
                        sample: np.ndarray, threads: int, concurrencies: list[int],
                        seconds: float) -> list[dict[str, Any]]:
    import tritonclient.grpc as grpcclient

    from loadtests.inprocess import load

    variant = load(version_dir, threads)
    triton_sample = sample.astype(variant.dtype)
    datatype = "FP16" if variant.dtype == np.float16 else "FP32"

    def in_process() -> Callable[[], object]:
        return variant.make(triton_sample)

    def served() -> Callable[[], object]:
        client = grpcclient.InferenceServerClient(ends.triton_grpc_url)
        tensor = grpcclient.InferInput(manifest.input.name, list(triton_sample.shape), datatype)
        tensor.set_data_from_numpy(triton_sample)
        return lambda: client.infer(manifest.name, [tensor], client_timeout=60)

    rows = []
    for c in concurrencies:
        local, triton = interleaved(in_process, served, c, seconds)
        rows.append({"concurrency": c, "in_process_per_s": local.throughput_per_s,
                     "triton_per_s": triton.throughput_per_s,
                     "ratio": round(triton.throughput_per_s / local.throughput_per_s, 3),
                     "triton_p50_ms": triton.p50_ms, "triton_errors": triton.errors})
        LOG.info("concurrency %d: in-process %.1f/s, Triton %.1f/s", c,
                 local.throughput_per_s, triton.throughput_per_s)
    return rows


def _median(timings: list[dict[str, float]], stage: str) -> float | None:
    values = [float(t[stage]) for t in timings if stage in t]
    return round(statistics.median(values), 3) if values else None


def gateway_vs_triton(ends: Endpoints, manifest: Manifest, sample: np.ndarray,
                      concurrencies: list[int], seconds: float) -> list[dict[str, Any]]:
    import tritonclient.grpc as grpcclient

    timings: list[dict[str, float]] = []
    lock = threading.Lock()

    def rest() -> Callable[[], object]:
        client = httpx.Client(base_url=ends.http_url, timeout=60)
        payloads = Payloads(seed=5)
        files = [payloads.part10() for _ in range(16)]  # made before the clock starts
        turn = itertools.cycle(files)

        def call() -> None:
            r = client.post("/v1/infer", content=next(turn),
                            headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            with lock:
                timings.append(r.json()["timings_ms"])
        return call

    def direct() -> Callable[[], object]:
        client = grpcclient.InferenceServerClient(ends.triton_grpc_url)
        tensor = grpcclient.InferInput(manifest.input.name, list(sample.shape), "FP32")
        tensor.set_data_from_numpy(sample.astype(np.float32))
        return lambda: client.infer(manifest.name, [tensor], client_timeout=60)

    rows = []
    for c in concurrencies:
        timings.clear()
        gw, tr = interleaved(rest, direct, c, seconds)
        rows.append({"concurrency": c, "gateway_p50_ms": gw.p50_ms, "gateway_p95_ms": gw.p95_ms,
                     "triton_p50_ms": tr.p50_ms, "triton_p95_ms": tr.p95_ms,
                     "gateway_per_s": gw.throughput_per_s, "triton_per_s": tr.throughput_per_s,
                     "throughput_ratio": round(gw.throughput_per_s / tr.throughput_per_s, 3),
                     "gateway_overhead_p50_ms": _median(timings, "gateway_overhead"),
                     # where the overhead goes, and what the gateway's clock leaves out
                     "stage_p50_ms": {k: _median(timings, k) for k in (
                         "receive", "preprocess", "inference", "postprocess", "total")},
                     "gateway_errors": gw.errors})
    return rows


def ingest_vs_orthanc(n: int, processes: list[int]) -> dict[str, Any]:
    """``bench_ingest`` once per gateway process count; its rows tagged with the count."""
    from loadtests import bench_ingest

    merged: dict[str, Any] = {}
    for count in processes:
        args = ["--processes", str(count)]
        figures = dict(bench_ingest.run(n=n, associations=(1, 4), gateway_args=args))
        rows = [{**r, "processes": expected_processes(args)} for r in figures["rows"]]
        merged = {**figures, "rows": [*merged.get("rows", []), *rows]}
    return merged


def _per(rows: list[dict[str, Any]], processes: int, key: str, value: int) -> dict[str, Any]:
    return next((r for r in rows if r.get("processes", 1) == processes and r[key] == value),
                {})


def issue_figures(report: dict[str, Any]) -> list[str]:
    """The issue's figures, one row per gateway process count."""
    gw = report["gateway_vs_triton"]
    ingest = report.get("ingest_vs_orthanc")
    ingest_rows = ingest.get("rows", []) if isinstance(ingest, dict) else []
    counts = sorted({r.get("processes", 1) for r in [*gw, *ingest_rows]})
    lines = ["| gateway processes | REST c4 / c1 (>= 1.6) | gateway / Triton, c4 (>= 0.3 "
             "demo, >= 0.85 DenseNet121) | overhead p50 c1 (<= 5 ms) | overhead p50 c4 "
             "(<= 8 ms) | DIMSE / Orthanc, 1 assoc. (>= 0.75) | 4 assoc. (>= 1.0) |",
             "|---|---|---|---|---|---|---|"]

    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    for n in counts:
        c1, c4 = _per(gw, n, "concurrency", 1), _per(gw, n, "concurrency", 4)
        i1, i4 = _per(ingest_rows, n, "associations", 1), _per(ingest_rows, n, "associations", 4)
        scaling = (c4["gateway_per_s"] / c1["gateway_per_s"]
                   if c1.get("gateway_per_s") and c4.get("gateway_per_s") else None)
        lines.append(f"| {n} | {fmt(scaling)} | {fmt(c4.get('throughput_ratio'))} | "
                     f"{fmt(c1.get('gateway_overhead_p50_ms'), '.1f')} ms | "
                     f"{fmt(c4.get('gateway_overhead_p50_ms'), '.1f')} ms | "
                     f"{fmt(i1.get('ratio'))} | {fmt(i4.get('ratio'))} |")
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, load average {m['load_average_at_start']}"
             f" at start, Python {m['python']}; model {report['model']} "
             f"({report['input']}), {report['threads']} threads", "",
             "| comparison | measured | ratio | target |", "|---|---|---:|---|"]
    for v in report["variant_vs_eager"]:
        lines.append(f"| selected variant vs PyTorch eager (batch 1, p50, {v['threads']} "
                     f"thread(s)) | {v['variant_p50_ms']} ms vs {v['pytorch_eager_p50_ms']} ms"
                     f" | {v['speedup']}x | >= 4x |")
    for r in report["triton_vs_inprocess"]:
        lines.append(f"| Triton vs in-process throughput, concurrency {r['concurrency']} | "
                     f"{r['triton_per_s']}/s vs {r['in_process_per_s']}/s | {r['ratio']:.2f} |"
                     " >= 0.95 |")
    for r in report["gateway_vs_triton"]:
        procs = f", {r['processes']} process(es)" if "processes" in r else ""
        lines.append(f"| gateway end to end vs direct Triton, concurrency {r['concurrency']}"
                     f"{procs} | "
                     f"p50 {r['gateway_p50_ms']} ms vs {r['triton_p50_ms']} ms; "
                     f"{r['gateway_per_s']}/s vs {r['triton_per_s']}/s | "
                     f"{r['throughput_ratio']:.2f} (throughput) | - |")
        stages = ", ".join(f"{k} {v}" for k, v in r.get("stage_p50_ms", {}).items())
        lines.append(f"| gateway overhead p50 (512x512 CR), concurrency {r['concurrency']}"
                     f"{procs} | "
                     f"{r['gateway_overhead_p50_ms']} ms (stage p50s, ms: {stages}) | - | "
                     "<= 5 ms |")
    ingest = report.get("ingest_vs_orthanc")
    if isinstance(ingest, dict) and ingest.get("rows"):
        for r in ingest["rows"]:
            alone = r.get("gateway_ingest_only_per_s")
            only = (f" (ingest only {alone:.0f}/s, {alone / r['orthanc_per_s']:.2f})"
                    if alone else "")
            procs = f", {r['processes']} process(es)" if "processes" in r else ""
            lines.append(f"| DIMSE ingest vs Orthanc, {r['associations']} association(s), "
                         f"{ingest['side']}x{ingest['side']} CT{procs} | "
                         f"{r['gateway_per_s']:.0f}/s "
                         f"inferring{only} vs {r['orthanc_per_s']:.0f}/s | {r['ratio']:.2f} | "
                         ">= 1.0 |")
    else:
        lines.append(f"| DIMSE ingest vs Orthanc | not available: {ingest} | - | >= 1.0 |")
    lines += ["", "The issue's figures, side by side per gateway process count:", "",
              *issue_figures(report),
              "", "![throughput vs concurrency](throughput_vs_concurrency.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    rows = report["triton_vs_inprocess"]
    cs = [r["concurrency"] for r in rows]
    ax.plot(cs, [r["in_process_per_s"] for r in rows], "o-", label="in-process ONNX Runtime")
    ax.plot(cs, [r["triton_per_s"] for r in rows], "s-", label="Triton (gRPC)")
    gw = report["gateway_vs_triton"]
    for n in sorted({r.get("processes", 1) for r in gw}):
        mine = [r for r in gw if r.get("processes", 1) == n]
        ax.plot([r["concurrency"] for r in mine], [r["gateway_per_s"] for r in mine], "^-",
                label=f"gateway REST, 512x512 DICOM, {n} process(es)")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("inferences / s")
    ax.set_xticks(sorted(set(cs) | {r["concurrency"] for r in gw}))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(optimized: Path, out: Path, concurrencies: list[int], gateway_concurrencies: list[int],
        seconds: float, ingest_n: int, processes: list[int] | None = None) -> dict[str, Any]:
    """``processes``: gateway process counts to measure rows 3 and 4 with (0: the gateway's
    default, one per CPU given)."""
    processes = processes if processes is not None else [1, 0]
    repo = optimized / "repository"
    report_json = json.loads((optimized / "report.json").read_text(encoding="utf-8"))
    model, threads = str(report_json["model"]), int(report_json["threads"])
    manifest = Manifest.load(repo / model / "manifest.json")
    versions = sorted((d for d in (repo / model).iterdir() if d.name.isdigit()),
                      key=lambda d: int(d.name))
    version_dir = versions[-1]
    shape = (1, manifest.input.channels, manifest.input.height, manifest.input.width)
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    report: dict[str, Any] = {"machine": machine(), "model": model, "threads": threads,
                              "input": "x".join(map(str, shape)), "seconds_per_point": seconds}
    LOG.info("variant vs PyTorch eager")
    report["variant_vs_eager"] = variant_vs_eager(optimized, version_dir, sample, threads)
    with tempfile.TemporaryDirectory(prefix="bedside-bench-") as work:
        stack = Stack(repo, model, Path(work), start_gateway=False)
        try:
            ends = stack.start()
            LOG.info("Triton vs in-process")
            report["triton_vs_inprocess"] = triton_vs_inprocess(
                ends, version_dir, manifest, sample, threads, concurrencies, seconds)
            report["gateway_vs_triton"] = []
            for count in processes:
                stack.gateway_args = ["--processes", str(count)]
                n = expected_processes(stack.gateway_args)
                LOG.info("gateway (%d processes) vs direct Triton", n)
                stack.start_gateway()
                rows = gateway_vs_triton(ends, manifest, sample, gateway_concurrencies, seconds)
                report["gateway_vs_triton"] += [{**r, "processes": n} for r in rows]
                stack.stop_gateway()
        finally:
            stack.stop()
    if ingest_n > 0:
        LOG.info("DIMSE ingest vs Orthanc (%d instances per scenario)", ingest_n)
        try:
            report["ingest_vs_orthanc"] = ingest_vs_orthanc(ingest_n, processes)
        except Exception as exc:  # the other rows stand; this one says why it is missing
            LOG.exception("DIMSE ingest benchmark failed")
            report["ingest_vs_orthanc"] = f"failed: {exc}"
    else:
        report["ingest_vs_orthanc"] = "skipped (--ingest-n 0)"
    report["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / "throughput_vs_concurrency.png")
    report["plots"] = ["throughput_vs_concurrency.png"]
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(render(report), encoding="utf-8")
    return report


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m loadtests.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--optimized", type=Path, default=Path("bedside-demo"),
                   help="the optimizer's output folder (report.json, repository/)")
    p.add_argument("--concurrency", default="1,2,4", help="Triton vs in-process")
    p.add_argument("--gateway-concurrency", default="1,4", help="gateway vs direct Triton")
    p.add_argument("--seconds", type=float, default=5.0, help="per measured point")
    p.add_argument("--ingest-n", type=int, default=200,
                   help="instances per DIMSE ingest scenario (0: skip that row)")
    p.add_argument("--processes", default="1,0",
                   help="gateway process counts for the gateway and DIMSE rows, one after the "
                        "other (0: the gateway's default, one per CPU given)")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    if not (args.optimized / "report.json").exists():
        raise SystemExit(f"{args.optimized}/report.json missing: run `bedside demo --out "
                         f"{args.optimized}` (or bedside optimize) first")
    report = run(args.optimized.absolute(), args.out.absolute(), _ints(args.concurrency),
                 _ints(args.gateway_concurrency), args.seconds, args.ingest_n,
                 _ints(args.processes))
    print((args.out / "bench.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out / 'bench.json'}")
    return 0 if report else 1


if __name__ == "__main__":
    raise SystemExit(main())
