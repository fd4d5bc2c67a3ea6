"""Step bookkeeping shared by the optimizer's steps: each step's status (ok / failed /
skipped), seconds and reason written to ``steps.json`` as soon as it ends, and the policy for
optional variant steps (a variant that cannot be built is reported and left out)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from optimizer.contract.errors import BedsideError

LOG = logging.getLogger(__name__)
T = TypeVar("T")


class StepLog:
    """Writes the status of every step to ``steps.json`` right after the step ends."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._steps: list[dict[str, Any]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        LOG.info("step %s", name)
        try:
            yield
        except BaseException as exc:
            self._record(name, "failed", start, f"{type(exc).__name__}: {exc}")
            raise
        self._record(name, "ok", start, None)

    def durations(self) -> list[dict[str, Any]]:
        """Every step so far with its status and seconds (the report's timing table)."""
        return [{"name": s["step"], "status": s["status"], "seconds": s["seconds"]}
                for s in self._steps]

    def not_ok(self) -> list[dict[str, str]]:
        """Steps that were skipped or failed, with why: what the report says was not built."""
        return [{"name": s["step"], "status": s["status"], "reason": s["detail"] or ""}
                for s in self._steps if s["status"] != "ok"]

    def measured(self, name: str, seconds: float, failed: str | None = None) -> None:
        """A step whose time was spent inside a shared one (a runtime's share of the
        benchmark window), recorded with that time."""
        LOG.info("step %s: %.1f s%s", name, seconds, f", failed: {failed}" if failed else "")
        self._steps.append({"step": name, "status": "failed" if failed else "ok",
                            "seconds": round(seconds, 3), "detail": failed})
        self._flush()

    def skipped(self, name: str, why: str) -> None:
        LOG.info("step %s skipped: %s", name, why)
        self._steps.append({"step": name, "status": "skipped", "seconds": 0.0, "detail": why})
        self._flush()

    def _record(self, name: str, status: str, start: float, detail: str | None) -> None:
        self._steps.append({"step": name, "status": status,
                            "seconds": round(time.perf_counter() - start, 3), "detail": detail})
        self._flush()

    def _flush(self) -> None:
        self._path.write_text(json.dumps(self._steps, indent=2) + "\n", encoding="utf-8")


def run_step(log: StepLog, name: str, fn: Callable[[], T]) -> T:
    with log.step(name):
        return fn()


def optional_step(log: StepLog, name: str, fn: Callable[[], T]) -> T | None:
    """A variant that cannot be built is reported and left out; the others go on."""
    try:
        with log.step(name):
            return fn()
    except BedsideError as exc:
        LOG.warning("variant step %s failed: %s", name, exc)
        return None
