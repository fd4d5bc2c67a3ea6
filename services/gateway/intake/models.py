"""The models a gateway serves: one ``ModelLane`` per model, each with its own spool folder,
job table, result store and worker, so that an instance several models take becomes one job per
model, each grouped at its model's level and producing its model's result type.

The default model's lane lives at the spool's root (the layout of a gateway serving one model);
every other model's lane at ``<spool>/models/<name>/`` (``lane_root``). Model names are the
manifest's (letters, digits, '_', '.', '-'), so they are safe folder names and carry no patient
data.

Versions (``inference/versions.py``): each lane's core is a ``VersionedCore``; ``ModelVersions``
reports, promotes and rolls back versions while the gateway serves, and ``ShadowRecorder``
stores a shadow version's results apart and exports its agreement with the primary.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.contract.manifest import Manifest
from services.gateway.errors import BadRequest, NotFound
from services.gateway.inference.agreement import compare
from services.gateway.inference.core import InferenceCore, Result
from services.gateway.inference.versions import VersionedCore, VersionPlan
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.worker import SpoolWorker
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from services.gateway.store.versions import VersionStore

LOG = logging.getLogger(__name__)


def lane_root(spool_dir: Path, name: str, default: bool) -> Path:
    """Where a model's spool, job table and results live under the gateway's spool."""
    return spool_dir if default else spool_dir / "models" / name


@dataclass(frozen=True)
class ModelLane:
    """One served model: its inference core and its own durable state and worker."""

    name: str
    core: InferenceCore
    spool: Spool
    results: ResultStore
    worker: SpoolWorker

    @property
    def manifest(self) -> Manifest:
        return self.core.manifest


class ShadowRecorder:
    """A model's ``ShadowSink``: the shadow's result is stored apart (``<lane>/shadow/``,
    never read by the study API or handed to delivery) with its agreement, and the agreement
    is exported per (model, primary version, shadow version, label)."""

    def __init__(self, manifest: Manifest, results: ResultStore, metrics: GatewayMetrics) -> None:
        self._manifest = manifest
        self.results = results
        self._metrics = metrics
        self._lock = threading.Lock()
        # (baseline, candidate) -> label -> [comparisons, agreements or dice sum, error sum]
        self._summary: dict[tuple[int, int], dict[str, list[float]]] = {}
        self.failures = 0

    def __call__(self, primary: Result, shadow: Result | None, version: int,
                 reason: str | None) -> None:
        model = self._manifest.name
        if shadow is None:
            self._metrics.shadow_failures.labels(model, str(version), reason or "unknown").inc()
            with self._lock:
                self.failures += 1
            return
        agreement = compare(self._manifest, primary, shadow)
        base, cand = str(primary.model_version), str(version)
        for label, agrees in agreement.decisions.items():
            self._metrics.version_decisions.labels(model, base, cand, label,
                                                   "true" if agrees else "false").inc()
            self._metrics.version_score_error.labels(model, base, cand, label).observe(
                agreement.score_errors[label])
        for label, value in agreement.dice.items():
            self._metrics.version_dice.labels(model, base, cand, label).observe(value)
        with self._lock:
            per_label = self._summary.setdefault((primary.model_version, version), {})
            for label, agrees in agreement.decisions.items():
                row = per_label.setdefault(label, [0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += float(agrees)
                row[2] += agreement.score_errors[label]
            for label, value in agreement.dice.items():
                row = per_label.setdefault(label, [0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += value
        doc = {**shadow.to_dict(), "shadow_of": primary.model_version,
               "agreement": agreement.to_dict()}
        # its own store (never read by the study API or delivery), in the namespace of
        # inferred results (``job``), not that of direct answers
        self.results.save(shadow.study_instance_uid, shadow.sop_instance_uid, doc,
                          job="shadow")

    def summary(self) -> list[dict[str, Any]]:
        """Agreement since start, per (primary, shadow) pair and label."""
        segmentation = self._manifest.task == "segmentation"
        out = []
        with self._lock:
            for (base, cand), per_label in sorted(self._summary.items()):
                labels = {}
                for label, (n, total, errors) in per_label.items():
                    labels[label] = ({"comparisons": int(n), "mean_dice": total / n}
                                     if segmentation else
                                     {"comparisons": int(n), "agreement": total / n,
                                      "mean_score_error": errors / n})
                out.append({"baseline": base, "candidate": cand, "labels": labels})
        return out


MakeCore = Callable[[Manifest, int], InferenceCore]
LoadVersions = Callable[[str, Sequence[int]], None]
OnChange = Callable[[str, str, VersionPlan, VersionPlan], None]
PlanFor = Callable[[str, Mapping[str, int | None]], VersionPlan]
OnFollow = Callable[[str, VersionPlan, VersionPlan], None]


class ModelVersions:
    """Status, promotion and rollback of the served models' versions, while serving.

    A change runs in this order: cores for any new version -> Triton loads exactly the versions
    the new plan uses plus the one rollback would return to (``load``; a refusal leaves
    everything as it was) -> the new primary saved durably (``VersionStore``) -> the model's
    ``VersionedCore`` switched -> ``on_change`` (audit record, metrics). A crash after the save
    starts with the new primary."""

    def __init__(self, lanes: Sequence[ModelLane], store: VersionStore, make_core: MakeCore,
                 load: LoadVersions | None, on_change: OnChange,
                 recorders: Mapping[str, ShadowRecorder],
                 plan_for: PlanFor | None = None, on_follow: OnFollow | None = None) -> None:
        """``plan_for`` (a model's name and its saved entry -> its plan) lets ``follow`` apply
        a change another gateway process or replica saved; ``on_follow`` is told of each."""
        self._lanes = {lane.name: lane for lane in lanes}
        self._store = store
        self._make_core = make_core
        self._load = load
        self._on_change = on_change
        self._recorders = dict(recorders)
        self._plan_for = plan_for
        self._on_follow = on_follow
        self._lock = threading.Lock()

    @property
    def versioned(self) -> bool:
        """Whether any served model runs under version control."""
        return any(isinstance(lane.core, VersionedCore) for lane in self._lanes.values())

    def follow(self) -> list[str]:
        """Apply the primaries saved by whichever process or replica promoted or rolled back
        (the saved file is the one truth; Triton already loaded what they need): the models
        whose plan changed here. Nothing is audited: the process that made the change did."""
        if self._plan_for is None:
            return []
        changed = []
        with self._lock:
            saved = self._store.load()
            for name, lane in self._lanes.items():
                core = lane.core
                if not isinstance(core, VersionedCore):
                    continue
                new = self._plan_for(name, saved.get(name, {}))
                old = core.plan
                if new == old:
                    continue
                base = core.cores[old.primary].manifest
                for version in new.versions:
                    if version not in core.cores:
                        core.add_core(version, self._make_core(base, version))
                core.set_plan(new)
                LOG.info("model %s: following a saved change, primary version %d -> %d", name,
                         old.primary, new.primary)
                if self._on_follow is not None:
                    self._on_follow(name, old, new)
                changed.append(name)
        return changed

    def _core(self, name: str) -> VersionedCore:
        lane = self._lanes.get(name)
        if lane is None:
            raise NotFound(f"unknown model {name[:64]!r}; served: "
                           f"{', '.join(sorted(self._lanes))}", "unknown_model")
        if not isinstance(lane.core, VersionedCore):
            raise BadRequest(f"model {name} has no version control", "no_versions")
        return lane.core

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name, lane in self._lanes.items():
            entry: dict[str, Any] = {"name": name, "task": lane.manifest.task}
            if isinstance(lane.core, VersionedCore):
                entry.update(lane.core.plan.to_dict())
            else:
                entry["primary"] = lane.manifest.version
            budget = lane.manifest.accuracy_budget
            entry["accuracy_budget"] = {"min_agreement": budget.min_agreement,
                                        "max_dice_drop": budget.max_dice_drop}
            recorder = self._recorders.get(name)
            entry["agreement"] = recorder.summary() if recorder is not None else []
            entry["shadow_failures"] = recorder.failures if recorder is not None else 0
            out.append(entry)
        return out

    def promote(self, name: str, version: int | None = None) -> VersionPlan:
        return self._change(name, "promote", lambda plan: plan.promote(version))

    def rollback(self, name: str) -> VersionPlan:
        return self._change(name, "rollback", lambda plan: plan.rollback())

    def _change(self, name: str, action: str,
                step: Callable[[VersionPlan], VersionPlan]) -> VersionPlan:
        with self._lock:
            core = self._core(name)
            old = core.plan
            try:
                new = step(old)
            except ValueError as exc:
                raise BadRequest(f"{action} {name}: {exc}", "bad_version") from exc
            base = core.cores[old.primary].manifest
            for version in new.versions:
                if version not in core.cores:
                    core.add_core(version, self._make_core(base, version))
            if self._load is not None:
                keep = set(new.versions) | ({new.previous} if new.previous else set())
                self._load(name, sorted(keep))
            self._store.save(name, new.primary, new.previous)
            core.set_plan(new)
            LOG.info("model %s: %s, primary version %d -> %d", name, action, old.primary,
                     new.primary)
            self._on_change(name, action, old, new)
            return new


class VersionFollower:
    """Checks the saved primaries every ``period_s`` and applies a change that another
    gateway process of the pod, or another replica on the shared spool, made
    (``ModelVersions.follow``). Cheap when nothing changed: one stat of the file."""

    def __init__(self, versions: ModelVersions, store: VersionStore,
                 period_s: float = 1.0) -> None:
        self._versions = versions
        self._store = store
        self._period_s = period_s
        self._stop = threading.Event()
        self._seen = store.stamp()
        self._thread = threading.Thread(target=self._run, name="version-follower",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> list[str]:
        """One look at the saved file: the models whose plan changed."""
        stamp = self._store.stamp()
        if stamp == self._seen:
            return []
        self._seen = stamp
        return self._versions.follow()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.check()
            except Exception:  # a bad file must not stop following: logged, tried again
                LOG.exception("following saved model versions failed")
