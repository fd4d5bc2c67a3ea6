"""``bedside serve``: Triton (the bundled tritonserver) and the gateway on a model repository.
The gateway's flags are those of ``bedside gateway`` (less --triton-url); Triton's follow."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.commands.common import default_triton_env
from services.commands.gateway import serve_until_interrupted
from services.gateway.config import add_flags

NAME = "serve"
HELP = "run Triton and the gateway on a model repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, NAME)
    parser.add_argument("--triton-grpc-port", type=int, default=8001)
    parser.add_argument("--triton-env", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from services.net import free_port
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

    install = TritonInstall.discover(args.triton_env or default_triton_env())
    triton = TritonServer(install, args.repository.absolute(), args.spool.absolute() / "triton",
                          TritonPorts(free_port(), args.triton_grpc_port, free_port()))
    try:
        triton.start()
        serve_until_interrupted(args, triton.grpc_url)
    finally:
        triton.stop()
    return 0
