"""Versions of one model behind one name: the primary version answers; a shadow version is
inferred on the same inputs (its results are stored and compared, never returned or
delivered); a canary version answers for a share of studies, chosen sticky per study (a hash
of the Study Instance UID, so every instance of a study, and every retry, gets the same
version).

``VersionedCore`` is an ``InferenceCore`` to the worker and the edges: it picks the core of the
version that answers and hands the shadow's result, with the primary's, to a ``ShadowSink``.
A shadow that fails never fails the request: it is counted by the sink's caller and ignored.
Its plan can be swapped while the gateway runs (promotion, rollback): a call in progress
finishes with the plan it started with.

PHI: a study UID is hashed to choose the version and never kept or logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from services.gateway.errors import GatewayError
from services.gateway.inference.core import InferenceCore, Result

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionPlan:
    """Which versions of a model run: ``primary`` answers; ``shadow`` runs beside it;
    ``canary`` answers for ``share`` (0..1) of studies; ``previous`` is what rollback goes
    back to (the primary before the last promotion)."""

    primary: int
    shadow: int | None = None
    canary: int | None = None
    share: float = 0.0
    previous: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError("canary share must lie in [0, 1]")
        if self.canary is not None and self.canary == self.primary:
            raise ValueError("the canary version is the primary version")
        if self.shadow is not None and self.shadow == self.primary:
            raise ValueError("the shadow version is the primary version")

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version this plan infers with, primary first."""
        out = [self.primary]
        for v in (self.canary, self.shadow):
            if v is not None and v not in out:
                out.append(v)
        return tuple(out)

    def promote(self, version: int | None = None) -> VersionPlan:
        """``version`` (default: the canary, else the shadow) becomes the primary; the old
        primary is kept for rollback. The promoted version stops being canary or shadow."""
        chosen = version if version is not None else (
            self.canary if self.canary is not None else self.shadow)
        if chosen is None:
            raise ValueError("nothing to promote: no canary or shadow version, none given")
        if chosen == self.primary:
            raise ValueError(f"version {chosen} is already the primary")
        return VersionPlan(
            primary=chosen, previous=self.primary,
            shadow=None if self.shadow == chosen else self.shadow,
            canary=None if self.canary == chosen else self.canary,
            share=0.0 if self.canary == chosen else self.share)

    def rollback(self) -> VersionPlan:
        """Back to the previous primary; the rolled-back version runs nowhere."""
        if self.previous is None:
            raise ValueError("nothing to roll back to: no earlier primary")
        return VersionPlan(
            primary=self.previous, previous=None,
            shadow=None if self.shadow == self.previous else self.shadow,
            canary=None if self.canary == self.previous else self.canary,
            share=0.0 if self.canary == self.previous else self.share)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def plan_from(saved: Mapping[str, int | None], manifest_version: int, shadow: int | None,
              canary: int | None, share: float) -> VersionPlan:
    """The plan a saved primary/previous (``store/versions.py``; empty: the manifest's
    version) and the shadow/canary settings give: what a gateway starts with, and what every
    other process or replica follows after one of them promoted or rolled back (the same plan
    the one that changed it holds: a promoted or restored version stops being shadow or
    canary)."""
    primary = saved.get("primary") or manifest_version
    return VersionPlan(primary=primary, previous=saved.get("previous"),
                       shadow=None if shadow == primary else shadow,
                       canary=None if canary == primary else canary,
                       share=0.0 if canary == primary else share)


def canary_bucket(study_uid: str) -> float:
    """A study's place in [0, 1): the first 64 bits of SHA-256 of its UID. The canary takes
    the studies below its share, so the split is sticky per study and stable across
    restarts and replicas."""
    digest = hashlib.sha256(study_uid.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def answering_version(plan: VersionPlan, study_uid: str) -> int:
    """The version whose result a study gets under ``plan``."""
    if plan.canary is not None and canary_bucket(study_uid) < plan.share:
        return plan.canary
    return plan.primary


# (primary result, shadow result or None when the shadow failed, shadow version, the failure's
# bounded reason or None) -> None
ShadowSink = Callable[[Result, Result | None, int, str | None], None]


class VersionedCore(InferenceCore):
    """The versions of one model as one ``InferenceCore`` (see the module docstring)."""

    def __init__(self, cores: Mapping[int, InferenceCore], plan: VersionPlan,
                 shadow_sink: ShadowSink | None = None) -> None:
        """``cores``: one per version the plan may use (each with its version's manifest)."""
        primary = cores[plan.primary]
        super().__init__(primary.manifest, primary.inferer)
        self._cores = dict(cores)
        self._sink = shadow_sink
        self._lock = threading.Lock()
        self._plan = plan
        self.set_plan(plan)

    @property
    def plan(self) -> VersionPlan:
        return self._plan

    @property
    def cores(self) -> Mapping[int, InferenceCore]:
        return self._cores

    def add_core(self, version: int, core: InferenceCore) -> None:
        with self._lock:
            self._cores[version] = core

    def set_plan(self, plan: VersionPlan) -> None:
        """Swap the plan (promotion, rollback): later calls use it."""
        missing = [v for v in plan.versions if v not in self._cores]
        if missing:
            raise ValueError(f"no inference core for version(s) {missing}")
        with self._lock:
            self._plan = plan
            primary = self._cores[plan.primary]
            self.manifest = primary.manifest
            self._inferer = primary.inferer

    def _choose(self, ds: Dataset) -> tuple[InferenceCore, InferenceCore | None, int | None]:
        with self._lock:
            plan, cores = self._plan, self._cores
        version = answering_version(plan, str(ds.get("StudyInstanceUID", "")))
        shadow = cores[plan.shadow] if plan.shadow is not None else None
        return cores[version], shadow, plan.shadow

    def analyze(self, ds: Dataset, timings_ms: dict[str, float] | None = None) -> Result:
        core, shadow, shadow_version = self._choose(ds)
        result = core.analyze(ds, timings_ms)
        if shadow is not None and shadow_version is not None:
            self._shadow(result, shadow_version, lambda: shadow.analyze(ds, {}))
        return result

    def analyze_input(self, ds: Dataset, x: np.ndarray, timings_ms: dict[str, float] | None,
                      t0: float) -> Result:
        core, shadow, shadow_version = self._choose(ds)
        result = core.analyze_input(ds, x, timings_ms, t0)
        if shadow is not None and shadow_version is not None:
            self._shadow(result, shadow_version,
                         lambda: shadow.analyze_input(ds, x, {}, time.perf_counter()))
        return result

    def _shadow(self, primary: Result, version: int, run: Callable[[], Result]) -> None:
        """Infer with the shadow and hand both on; nothing it does reaches the caller."""
        if self._sink is None:
            return
        try:
            shadow: Result | None = run()
            reason = None
        except GatewayError as exc:
            shadow, reason = None, exc.reason
        except Exception as exc:  # a shadow's bug must not fail the primary's answer
            LOG.exception("shadow version %d of %s failed", version, primary.model)
            shadow, reason = None, type(exc).__name__
        try:
            self._sink(primary, shadow, version, reason)
        except Exception:
            LOG.exception("recording the shadow result of %s failed", primary.model)


def version_manifest(core: InferenceCore, version: int) -> InferenceCore:
    """A core like ``core`` naming ``version`` in its results (same inferer)."""
    return InferenceCore(dataclasses.replace(core.manifest, version=version), core.inferer)
