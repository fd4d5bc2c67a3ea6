"""``bedside demo``: synthesize data, train, optimize, serve and query, all locally."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.commands.common import TRITON_ENV_HELP, default_triton_env

NAME = "demo"
HELP = "synthesize, train, optimize, serve and query, locally"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bedside-demo"))
    parser.add_argument("--quick", action="store_true", help="tiny data (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--triton-env", type=Path, default=None, help=TRITON_ENV_HELP)


def run(args: argparse.Namespace) -> int:
    from services.demo import DemoSizes, run_demo

    sizes = DemoSizes.quick() if args.quick else DemoSizes()
    return run_demo(args.out.absolute(), args.triton_env or default_triton_env(), sizes,
                    threads=args.threads)
