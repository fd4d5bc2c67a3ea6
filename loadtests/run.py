"""Headless Locust runs against the gateway, with a summary per protocol.

    python -m loadtests.run --optimized bedside-demo --steps 1,2,4 --run-time 20 --out load-out
    python -m loadtests.run --optimized bedside-demo --protocols rest --sustain 300

With ``--optimized`` (an optimizer output folder) or ``--repository`` the runner starts the real
bundled Triton and the gateway itself; with ``--host`` it loads a gateway already running.
Each step runs Locust with that many users per protocol and writes, under ``--out``:
``step-<k>/stats.json`` (final figures), ``step-<k>/locust_stats.csv`` (+ history, failures),
``step-<k>/report.html``; then
``summary.json`` and ``summary.md`` (p50/p95/p99, throughput, failures per protocol and step)
and the plots ``latency_vs_load.png`` and ``throughput_vs_concurrency.png``.
``--sustain S`` then holds ``--load-fraction`` (0.8) of the measured capacity (the highest
throughput of the steps) for S seconds, paced, and reports it as its own row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.protocols import PROTOCOLS
from loadtests.stack import ROOT, Endpoints, Stack

LOG = logging.getLogger(__name__)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class Row:
    """One protocol in one run: Locust's figures, in milliseconds and requests per second."""

    step: str
    protocol: str
    users: int
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_per_s: float


def locust_command(ends: Endpoints, protocols: list[str], users_per_protocol: int,
                   seconds: float, out: Path, pace: float = 0.0) -> list[str]:
    users = users_per_protocol * len(protocols)
    # Runs of 10 s or more leave out the ramp-up (connections, first requests); shorter ones
    # would risk keeping nothing at all on a slow machine.
    reset = ["--reset-stats"] if seconds >= 10 else []
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", ends.http_url, "--grpc-port", str(ends.grpc_port),
            "--dicom-port", str(ends.dicom_port), "--ae-title", ends.ae_title,
            "--model", ends.model, "--pace", str(pace),
            "-u", str(users), "-r", str(users), "-t", f"{max(1, round(seconds))}s",
            *reset, "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING",
            "--json-file", str(out / "stats"),  # Locust adds ".json"
            "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
            *[PROTOCOLS[p] for p in protocols]]


def _percentile(response_times: dict[str, int], q: float) -> float:
    """Locust's own way: the smallest (rounded) response time covering ``q`` of the requests."""
    total = sum(response_times.values())
    seen = 0
    for ms, count in sorted((float(k), v) for k, v in response_times.items()):
        seen += count
        if seen >= q * total:
            return ms
    return 0.0


def read_stats(path: Path, step: str, users: int) -> list[Row]:
    """Rows from Locust's ``--json-file``, written once at shutdown from the final statistics
    (its CSV is rewritten every second by a greenlet and can miss the last requests)."""
    rows = []
    for entry in json.loads(path.read_text(encoding="utf-8")):
        n = int(entry["num_requests"])
        span = float(entry["last_request_timestamp"] or 0) - float(entry["start_time"])
        times = entry["response_times"]
        rows.append(Row(step=step, protocol=entry["name"], users=users, requests=n,
                        failures=int(entry["num_failures"]),
                        p50_ms=_percentile(times, 0.50), p95_ms=_percentile(times, 0.95),
                        p99_ms=_percentile(times, 0.99),
                        throughput_per_s=round(n / span, 2) if span > 0 else 0.0))
    return sorted(rows, key=lambda r: r.protocol)


def run_locust(ends: Endpoints, protocols: list[str], users_per_protocol: int, seconds: float,
               out: Path, step: str, pace: float = 0.0) -> list[Row]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = locust_command(ends, protocols, users_per_protocol, seconds, out, pace)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=seconds + 120, check=False)
    (out / "locust.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    stats = out / "stats.json"
    if not stats.exists():
        raise RuntimeError(f"locust wrote no statistics (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    rows = read_stats(stats, step, users_per_protocol)
    missing = set(protocols) - {r.protocol for r in rows}
    if missing:
        raise RuntimeError(f"no requests completed for {sorted(missing)}: {proc.stderr[-2000:]}")
    return rows


def render(rows: list[Row], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| run | protocol | users | requests | failures | p50 ms | p95 ms | p99 ms | req/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.step} | {r.protocol} | {r.users} | {r.requests} | {r.failures} | "
              f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | {r.throughput_per_s:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], out: Path) -> list[str]:
    """Latency percentiles vs load and throughput vs concurrency, per protocol (steps only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r.step.startswith("step")]
    protocols = sorted({r.protocol for r in steps})
    fig, axes = plt.subplots(1, len(protocols), figsize=(4 * len(protocols), 3.5),
                             squeeze=False)
    for ax, proto in zip(axes[0], protocols, strict=True):
        pts = sorted((r for r in steps if r.protocol == proto), key=lambda r: r.users)
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
            ax.plot([r.users for r in pts], [getattr(r, key) for r in pts], style,
                    label=key[:3])
        ax.set_title(proto)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel("latency (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for proto in protocols:
        pts = sorted((r for r in steps if r.protocol == proto), key=lambda r: r.users)
        ax.plot([r.users for r in pts], [r.throughput_per_s for r in pts], "o-", label=proto)
    ax.set_xlabel("concurrent users per protocol")
    ax.set_ylabel("requests / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=100)
    plt.close(fig)
    return ["latency_vs_load.png", "throughput_vs_concurrency.png"]


def machine_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"


def run(ends: Endpoints, protocols: list[str], steps: list[int], seconds: float, out: Path,
        sustain_s: float = 0.0, load_fraction: float = 0.8) -> dict[str, Any]:
    rows: list[Row] = []
    for users in steps:
        rows += run_locust(ends, protocols, users, seconds, out / f"step-{users}",
                           f"step-{users}")
    sustained: dict[str, Any] | None = None
    if sustain_s > 0:
        users = max(steps)
        capacity = {p: max(r.throughput_per_s for r in rows if r.protocol == p)
                    for p in protocols}
        # one pace for every user: the slowest protocol's share sets it, none is overloaded
        pace = min(load_fraction * capacity[p] / users for p in protocols)
        rows += run_locust(ends, protocols, users, sustain_s, out / "sustained", "sustained",
                           pace=pace)
        sustained = {"seconds": sustain_s, "load_fraction": load_fraction,
                     "capacity_per_s": capacity, "pace_per_user_per_s": round(pace, 3),
                     "users_per_protocol": users}
    machine = machine_line()
    plots = plot(rows, out) if len(steps) > 1 else []
    summary: dict[str, Any] = {"machine": machine, "protocols": protocols,
                               "rows": [asdict(r) for r in rows], "sustained": sustained,
                               "plots": plots}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    md = render(rows, machine)
    if sustained:
        md += (f"\nSustained: {sustain_s:.0f} s at {load_fraction:.0%} of the measured capacity "
               f"({sustained['pace_per_user_per_s']} req/s per user, "
               f"{users} users per protocol).\n")
    md += "".join(f"\n![{p}]({p})\n" for p in plots)
    (out / "summary.md").write_text(md, encoding="utf-8")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--optimized", type=Path, help="optimizer output folder (has repository/)")
    where.add_argument("--repository", type=Path, help="a Triton model repository")
    where.add_argument("--host", help="a running gateway's HTTP URL (needs --grpc-port etc.)")
    p.add_argument("--model", default=None, help="default: the optimized folder's report model")
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--dicom-port", type=int, default=11112)
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help=f"comma-separated, from {', '.join(PROTOCOLS)}")
    p.add_argument("--steps", default="1,2,4", help="users per protocol, one run per step")
    p.add_argument("--run-time", type=float, default=20.0, help="seconds per step")
    p.add_argument("--sustain", type=float, default=0.0,
                   help="then hold --load-fraction of the capacity for this many seconds")
    p.add_argument("--load-fraction", type=float, default=0.8)
    p.add_argument("--out", type=Path, default=Path("load-out"))
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise SystemExit(f"unknown protocols {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    steps = [int(x) for x in args.steps.split(",")]
    out = args.out.absolute()
    if args.host:
        from urllib.parse import urlsplit

        url = urlsplit(args.host)
        ends = Endpoints(model=args.model or "cxr-lesion", http_port=url.port or 80,
                         dicom_port=args.dicom_port, grpc_port=args.grpc_port,
                         triton_grpc_port=0, triton_metrics_port=0, host=url.hostname or "")
        summary = run(ends, protocols, steps, args.run_time, out, args.sustain,
                      args.load_fraction)
    else:
        repo = args.repository or args.optimized / "repository"
        model = args.model or _only_model(repo)
        with tempfile.TemporaryDirectory(prefix="bedside-load-") as work, \
                Stack(repo, model, Path(work)) as ends:
            summary = run(ends, protocols, steps, args.run_time, out, args.sustain,
                          args.load_fraction)
    print((out / "summary.md").read_text(encoding="utf-8"))
    failures = sum(r["failures"] for r in summary["rows"])
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, per-step CSV and HTML")
    return 1 if failures else 0


def _only_model(repository: Path) -> str:
    models = sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").exists())
    if len(models) != 1:
        raise SystemExit(f"{repository} holds {models}: pass --model")
    return models[0]


if __name__ == "__main__":
    raise SystemExit(main())
