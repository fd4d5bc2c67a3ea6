"""Groups of instances (one instance, a series or a study) and what the worker hands on when a
group closes.

A group collects acknowledged instances of one series (or one study) until no new instance of it
has arrived for the inactivity timeout; then the series are selected by the manifest's rules and
inferred (per instance or per series), and the completed group goes to the ``GroupSink`` (the
delivery outbox). Only after ``GroupSink.accept`` returned is the group closed and are its spool
files released; an ``accept`` that raises is retried later, never dropped.

Slice order, the selection rules and the series volume are the model contract's
(``optimizer.contract.series``); this module holds only the gateway's groups.

The key of a group is stable across restarts and carries no UID: a hash of the level, the
hashed study/series UIDs and the name of the job that opened the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from optimizer.contract.manifest import GroupLevel, InferUnit, Manifest, Selection
from services.errors import ConfigError
from services.gateway.store.jobs import group_key as group_key  # the key's one definition

LEVELS: tuple[GroupLevel, ...] = ("instance", "series", "study")


@dataclass(frozen=True)
class CompletedGroup:
    """A closed group, as the delivery side sees it. Raw UIDs live in memory only (never logs)."""

    key: str  # stable idempotency key (see ``group_key``); no raw UID
    level: str  # "instance" | "series" | "study"
    study_uid: str
    series_uids: tuple[str, ...]
    job_names: tuple[str, ...]  # job-table names of every instance in the group
    # Part-10 files of the inferred source instances (series order), valid until accept returned.
    sources: tuple[Path, ...]
    results: tuple[dict[str, Any], ...]  # result documents of the inferred items, errors included
    # Segmentation only: .npy activated class maps per inferred item (same order as results).
    maps: tuple[Path, ...]
    protocols: tuple[str, ...]  # e.g. ("dimse",), ("stow",), ("rest",)
    calling_aets: tuple[str, ...]  # DIMSE calling AE titles seen; empty for HTTP
    model: str = ""  # the model (manifest name) whose results these are; "" : the default


class GroupSink(Protocol):
    def accept(self, group: CompletedGroup) -> None:
        """Durably record the group (outbox) before returning; raising means "try again later"."""
        ...




@dataclass(frozen=True)
class GroupingPolicy:
    """What the worker does with arrivals, resolved once at start from the manifest and the
    gateway config: the manifest says what the model needs (level, timeout, per-instance or
    per-series inference, selection); the config may override the level and the timeout."""

    level: GroupLevel = "instance"
    timeout_s: float = 30.0
    infer: InferUnit = "instance"
    selection: Selection = field(default_factory=Selection)

    @classmethod
    def resolve(cls, manifest: Manifest, level: str | None = None,
                timeout_s: float | None = None) -> GroupingPolicy:
        """``level``/``timeout_s`` None: the manifest's. ConfigError when the override leaves
        the manifest's needs unmet (per-series inference or min_instances > 1 with no groups)."""
        chosen = level if level is not None else manifest.grouping.level
        if chosen not in LEVELS:
            raise ConfigError(f"group level {chosen!r} is not one of {', '.join(LEVELS)}")
        timeout = timeout_s if timeout_s is not None else manifest.grouping.timeout_s
        if timeout <= 0:
            raise ConfigError("group timeout must be > 0 seconds")
        if chosen == "instance" and manifest.infer == "series":
            raise ConfigError(f"model {manifest.name} infers per series: group level must be "
                              "series or study")
        if chosen == "instance" and manifest.selection.min_instances > 1:
            raise ConfigError(f"model {manifest.name} selects series of at least "
                              f"{manifest.selection.min_instances} instances: group level must "
                              "be series or study")
        return cls(level=chosen, timeout_s=timeout,
                   infer=manifest.infer, selection=manifest.selection)
