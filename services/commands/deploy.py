"""``bedside deploy``: install or upgrade the Helm release for a model (services/deploy/)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "deploy"
HELP = ("install or upgrade the Helm release for a model, wait for the rollout and the model, "
        "roll back on failure")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True,
                        help="the optimizer's --out folder or its repository/ folder")
    parser.add_argument("--model", default=None, help="needed when the repository has several")
    parser.add_argument("--release", default="bedside")
    parser.add_argument("--namespace", default="bedside")
    parser.add_argument("--chart", type=Path, default=None,
                        help="default: the bundled charts/bedside")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[],
                        help="a values file (repeatable; later files win)")
    parser.add_argument("--set", dest="set_values", action="append", default=[],
                        metavar="KEY=VALUE", help="a value, Helm --set syntax (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds, rollout included")
    parser.add_argument("--kubeconfig", type=Path, default=None)
    parser.add_argument("--context", default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="render every object (hooks included) without a cluster")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --dry-run: write one file per template here, not to stdout")


def run(args: argparse.Namespace) -> int:
    from services.deploy.command import run_deploy

    return run_deploy(args)
