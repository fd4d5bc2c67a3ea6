"""``bedside optimize``: checkpoint + manifest -> verified variants -> Triton repository and
report. Its flags are declared with the request in ``optimizer/request.py``."""

from __future__ import annotations

import argparse
import sys

from optimizer import request

NAME = "optimize"
HELP = "checkpoint + manifest -> verified Triton repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    request.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        req = request.from_args(args)
    except ValueError as exc:
        print(f"bedside: error: {exc}", file=sys.stderr)
        return 2
    from optimizer.pipeline import optimize

    result = optimize(req)
    print(result.report_md.read_text(encoding="utf-8"))
    return 0
