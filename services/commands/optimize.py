"""``bedside optimize``: checkpoint + manifest -> verified variants -> Triton repository and
report. Its flags are declared with the request in ``optimizer/request.py``.

The console shows Bedside's own progress and errors; everything, third-party exporters' and
quantizers' warnings included, goes to ``optimize.log`` in the output folder."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optimizer import request

NAME = "optimize"
HELP = "checkpoint + manifest -> verified Triton repository"
LOG_FILE = "optimize.log"
OWN = ("optimizer", "services", "loadtests")  # the loggers whose lines reach the console


class _OwnOnly(logging.Filter):
    """Bedside's own records, and anyone's errors: what a console reader acts on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OWN) or record.levelno >= logging.ERROR


def _detached() -> list[logging.Logger]:
    """Loggers that print through their own handlers and do not propagate (torch's)."""
    return [lg for lg in logging.root.manager.loggerDict.values()
            if isinstance(lg, logging.Logger) and not lg.propagate and lg.handlers]


@contextmanager
def console_and_file(path: Path) -> Iterator[Path]:
    """While the block runs: every record (DEBUG up) and every Python warning into ``path``;
    the console's handlers (the root's, and those of loggers that print on their own, such as
    torch's) keep only Bedside's own records and errors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    own = _OwnOnly()
    level = root.level
    detached = _detached()
    console = list(root.handlers) + [h for lg in detached for h in lg.handlers]
    unset = [h for h in root.handlers if h.level == logging.NOTSET]
    for h in console:
        h.addFilter(own)
    for h in unset:
        h.setLevel(level)  # the console keeps the level it had; the file takes DEBUG
    for lg in [root, *detached]:
        lg.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for lg in [root, *detached]:
            lg.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        for h in console:
            h.removeFilter(own)
        for h in unset:
            h.setLevel(logging.NOTSET)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    request.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        req = request.from_args(args)
    except ValueError as exc:
        print(f"bedside: error: {exc}", file=sys.stderr)
        return 2
    from optimizer.pipeline import optimize

    with console_and_file(req.out_dir / LOG_FILE) as log:
        logging.getLogger(__name__).info("full log: %s", log)
        result = optimize(req)
    print(result.report_md.read_text(encoding="utf-8"))
    return 0
