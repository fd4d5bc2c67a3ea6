"""``bedside tune``: sweep Triton's scheduling settings against a live server, keep the best.

Like Triton Model Analyzer, on a small scale: for each candidate (dynamic-batching queue delay,
preferred batch sizes, instance count) the model is reloaded with that configuration, loaded by
concurrent gRPC clients at several concurrencies, and measured. The configuration with the
highest throughput whose p95 latency stays within the budget is written to config.pbtxt
(through Triton's protobuf); the whole sweep goes to tune.json and tune.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from optimizer.contract.manifest import Manifest
from optimizer.errors import TuneError
from optimizer.repository import MANIFEST_FILE

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    instances: int


@dataclass(frozen=True)
class Grid:
    queue_delays_us: tuple[int, ...] = (0, 500, 2000)
    preferred_batch_sizes: tuple[tuple[int, ...], ...] = ((), (4, 8))
    instances: tuple[int, ...] = (1, 2)
    concurrencies: tuple[int, ...] = (1, 4, 8)

    def candidates(self) -> list[Candidate]:
        return [Candidate(d, p, i) for d, p, i in itertools.product(
            self.queue_delays_us, self.preferred_batch_sizes, self.instances)]


@dataclass(frozen=True)
class Measurement:
    concurrency: int
    requests: int
    errors: int
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def apply(base: mc.ModelConfig, cand: Candidate) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    cfg.CopyFrom(base)
    cfg.ClearField("dynamic_batching")
    cfg.dynamic_batching.max_queue_delay_microseconds = cand.max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(
        [b for b in cand.preferred_batch_sizes if b <= cfg.max_batch_size])
    for group in cfg.instance_group:
        group.count = cand.instances
    return cfg


def load(url: str, model: str, input_name: str, sample: np.ndarray, concurrency: int,
         duration_s: float) -> Measurement:
    """``concurrency`` clients, each sending batch-1 requests back to back for the duration,
    after one untimed warm-up request each (connection set-up is not serving latency)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_error: list[str] = []
    start_gate = threading.Barrier(concurrency + 1, timeout=60)
    datatype = "FP16" if sample.dtype == np.float16 else "FP32"

    def client(i: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        try:
            tensor = grpcclient.InferInput(input_name, list(sample.shape), datatype)
            tensor.set_data_from_numpy(sample)
            try:
                c.infer(model, [tensor], client_timeout=30)
            except InferenceServerException as exc:
                first_error.append(exc.message())
            start_gate.wait()
            end = time.perf_counter() + duration_s
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    c.infer(model, [tensor], client_timeout=30)
                    latencies[i].append((time.perf_counter() - t0) * 1000.0)
                except InferenceServerException as exc:
                    errors[i] += 1
                    first_error.append(exc.message())
        except threading.BrokenBarrierError:
            pass
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        start_gate.wait()
    except threading.BrokenBarrierError as exc:
        raise TuneError("load clients did not start within 60 s") from exc
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if not any(latencies):
        raise TuneError(f"every request failed at concurrency {concurrency}: "
                        f"{first_error[0] if first_error else 'no answer'}")
    flat = np.asarray([x for lat in latencies for x in lat]) if any(latencies) else np.zeros(1)
    return Measurement(
        concurrency=concurrency, requests=int(sum(len(x) for x in latencies)),
        errors=sum(errors), throughput=sum(len(x) for x in latencies) / elapsed,
        p50_ms=float(np.percentile(flat, 50)), p95_ms=float(np.percentile(flat, 95)),
        p99_ms=float(np.percentile(flat, 99)),
    )


def tune(url: str, repository: Path, model: str, grid: Grid, duration_s: float,
         budget_ms: float | None, out_dir: Path) -> dict[str, Any]:
    """Run the sweep against the Triton at ``url`` (explicit model-control mode)."""
    model_dir = repository / model
    manifest = Manifest.load(model_dir / MANIFEST_FILE)
    budget = budget_ms if budget_ms is not None else manifest.latency_slo_ms
    try:
        base = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise TuneError(f"cannot read {model_dir / 'config.pbtxt'}: {exc}") from exc
    half = base.input[0].data_type == mc.TYPE_FP16
    sample = np.zeros((1, *manifest.input.shape), dtype=np.float16 if half else np.float32)
    admin = grpcclient.InferenceServerClient(url)
    rows: list[dict[str, Any]] = []
    chosen: Candidate | None = None
    try:
        for cand in grid.candidates():
            cfg = apply(base, cand)
            try:
                admin.load_model(model, config=json_format.MessageToJson(cfg))
            except InferenceServerException as exc:
                raise TuneError(f"Triton refused the configuration {cand}: {exc.message()} "
                                "(is it in explicit model-control mode?)") from exc
            for concurrency in grid.concurrencies:
                m = load(url, model, manifest.input.name, sample, concurrency, duration_s)
                rows.append({**asdict(cand), **asdict(m),
                             "within_budget": m.errors == 0 and m.p95_ms <= budget})
                LOG.info("%s c=%d: %.1f/s p95 %.1f ms", cand, concurrency, m.throughput,
                         m.p95_ms)
        fitting = [r for r in rows if r["within_budget"]]
        if not fitting:
            raise TuneError(f"no configuration kept p95 within {budget:g} ms")
        best = max(fitting, key=lambda r: r["throughput"])
        chosen = Candidate(best["max_queue_delay_us"], tuple(best["preferred_batch_sizes"]),
                           best["instances"])
        (model_dir / "config.pbtxt").write_text(
            text_format.MessageToString(apply(base, chosen)), encoding="utf-8")
    finally:
        # leave the server on what is on disk: the chosen configuration, or the original one
        try:
            admin.load_model(model)
        except InferenceServerException as exc:
            LOG.warning("could not reload %s from its config.pbtxt: %s", model, exc.message())
        admin.close()
    result = {"model": model, "latency_budget_ms": budget, "duration_s": duration_s,
              "chosen": asdict(chosen), "best": best, "sweep": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / "tune.md").write_text(render(result), encoding="utf-8")
    plot(result, out_dir / "throughput_vs_concurrency.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["sweep"]:
        label = (f"delay {r['max_queue_delay_us']}us, pref {list(r['preferred_batch_sizes'])}, "
                 f"x{r['instances']}")
        series.setdefault(label, []).append((r["concurrency"], r["throughput"]))
    for label, points in series.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
    ax.set(xlabel="concurrent clients", ylabel="throughput (inferences/s)",
           title=f"{result['model']}: throughput vs concurrency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict[str, Any]) -> str:
    lines = [f"# Triton tuning: {result['model']}", "",
             f"Latency budget (p95): {result['latency_budget_ms']:g} ms; "
             f"{result['duration_s']:g} s per point.", "",
             "| queue delay us | preferred batch | instances | concurrency | throughput /s "
             "| p50 ms | p95 ms | errors | within budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["sweep"]:
        lines.append(
            f"| {r['max_queue_delay_us']} | {list(r['preferred_batch_sizes']) or '-'} "
            f"| {r['instances']} | {r['concurrency']} | {r['throughput']:.1f} "
            f"| {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['errors']} "
            f"| {'yes' if r['within_budget'] else 'no'} |")
    c = result["chosen"]
    lines += ["", f"Chosen: queue delay {c['max_queue_delay_us']} us, preferred batch sizes "
              f"{list(c['preferred_batch_sizes']) or 'none'}, {c['instances']} instance(s): "
              f"{result['best']['throughput']:.1f}/s at concurrency "
              f"{result['best']['concurrency']} (p95 {result['best']['p95_ms']:.2f} ms).", "",
              "![throughput vs concurrency](throughput_vs_concurrency.png)", ""]
    return "\n".join(lines)
