"""``bedside tune``: sweep Triton's batching and instance settings on a model and write the
best config.pbtxt."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.commands.common import default_triton_env
from services.errors import ConfigError

NAME = "tune"
HELP = "sweep Triton's batching and instance settings and write the best config.pbtxt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: ./tune-<model>")
    parser.add_argument("--triton-url", default=None,
                        help="a Triton in explicit model-control mode; default: start one here")
    parser.add_argument("--triton-env", type=Path, default=None)
    parser.add_argument("--latency-budget-ms", type=float, default=None,
                        help="p95 budget (default: the manifest's latency_slo_ms)")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--queue-delays-us", default="0,500,2000")
    parser.add_argument("--instances", default="1,2")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measured point")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from exc


def run(args: argparse.Namespace) -> int:
    from optimizer.tune import Grid, tune
    from services.net import free_port
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

    grid = Grid(queue_delays_us=_ints(args.queue_delays_us), instances=_ints(args.instances),
                concurrencies=_ints(args.concurrency))
    repo = args.repository.absolute()
    out = (args.out or Path(f"tune-{args.model}")).absolute()
    triton = None
    url = args.triton_url
    if url is None:
        install = TritonInstall.discover(args.triton_env or default_triton_env())
        triton = TritonServer(install, repo, out / "triton",
                              TritonPorts(free_port(), free_port(), free_port()),
                              explicit_models=True)
        triton.start()
        url = triton.grpc_url
    try:
        result = tune(url, repo, args.model, grid, args.seconds, args.latency_budget_ms, out)
    finally:
        if triton is not None:
            triton.stop()
    print((out / "tune.md").read_text(encoding="utf-8"))
    print(f"wrote {repo / args.model / 'config.pbtxt'} ({result['chosen']})")
    return 0
