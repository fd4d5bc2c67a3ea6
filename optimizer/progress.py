"""Progress of the optimizer's long steps (INT8 calibration and recovery, sensitivity probes,
OpenVINO variants): a tqdm bar with its estimate on a terminal, and otherwise an INFO line per
item with the time so far and an estimate of the time left, so that a log shows the same.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None,
             unit: str = "it") -> Iterator[T]:
    """``items``, reporting progress on the console (tqdm) or in the log (INFO lines)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)
        return
    start = time.monotonic()
    for done, item in enumerate(items):
        yield item
        elapsed = time.monotonic() - start
        left = (f", about {elapsed / (done + 1) * (total - done - 1):.0f} s left"
                if total else "")
        LOG.info("%s: %d%s %s done (%.0f s%s)", desc, done + 1,
                 f"/{total}" if total else "", unit, elapsed, left)

