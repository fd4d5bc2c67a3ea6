"""The ``bedside`` command: demo, optimize, serve, gateway, keys.

Each subcommand is a module of ``services/commands/`` with its flags and its run function;
this module builds the parser from them and dispatches. Errors that Bedside raises on purpose
end the command with a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from types import FrameType, ModuleType

from optimizer.contract.errors import BedsideError
from services.commands import (
    conformance,
    demo,
    deploy,
    gateway,
    keys,
    models,
    optimize,
    outbox,
    reference,
    serve,
    tune,
)
from services.gateway.phi import quiet_identifier_quoting_loggers

# In `bedside --help` order.
COMMANDS: dict[str, ModuleType] = {m.NAME: m for m in (
    demo, optimize, reference, tune, serve, gateway, models, keys, outbox, conformance,
    deploy)}


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # pydicom's own warnings can quote element values (names, UIDs): keep them out of logs.
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    quiet_identifier_quoting_loggers()  # pydicom, pynetdicom, highdicom
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bedside", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.HELP))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    # Stop cleanly on SIGTERM (Kubernetes, systemd) as on Ctrl-C, also when started from a
    # non-interactive shell that leaves SIGINT ignored for background jobs.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code: int = COMMANDS[args.command].run(args)
        return code
    except BedsideError as exc:
        print(f"bedside: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bedside: interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
