"""The worker's groups in memory: which acknowledged instances wait together, and when each group
is due to close.

At level ``instance`` every arrival is a group of its own, due at once. At level ``series`` or
``study`` an arrival joins the open group of its series (study); the group is due when no
instance of it was acknowledged for the policy's ``timeout_s``. A group that could not finish
closing (the worker is stopping, or the sink refused it) waits in ``closing`` until it is due
again.

Time comes from an injected clock (monotonic seconds, ``time.monotonic`` in the gateway), so
tests drive it instead of sleeping. Nothing here writes to disk: the memberships to record are
queued in ``joins`` for the worker to write in one transaction, and no group comes due while a
membership is unrecorded (a restart must find every member of a group it closes).

Several workers (processes, replicas) share the job table: a group's key is the one the table
gives (``JobTable.join_groups``: the open group any worker opened for the series or study), so
``joins_recorded`` may re-key a group, or split off the members that joined a newer one when
another worker closed the old group meanwhile. Local timers only say when to try to claim a
group; the table decides who closes it (``JobTable.claim_group``).

PHI: raw UIDs stay in memory (``Member.ds``); keys, hashes and job names are all that is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import GroupingPolicy, group_key
from services.gateway.store.jobs import GroupRow, JobRow

LOG = logging.getLogger(__name__)
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

Clock = Callable[[], float]
Join = tuple[str, str, str, str, str]  # group key, level, study hash, series hash, job name


@dataclass(frozen=True)
class Job:
    """One acknowledged instance in the spool, as the worker is handed it."""

    path: Path
    protocol: str
    arrival: float | None = None  # perf_counter at arrival; None for work found at restart
    acked: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    calling_aet: str | None = None  # DIMSE calling AE title; None for HTTP edges


@dataclass
class Member:
    job: Job
    ds: Dataset  # the header (series/study groups) or the whole instance (instance level)
    full: bool

    @property
    def name(self) -> str:
        return self.job.path.name

    def uid(self, keyword: str) -> str:
        return str(self.ds.get(keyword, ""))


@dataclass
class Group:
    key: str
    level: str
    study_hash: str
    series_hash: str  # "" for a study group
    persisted: bool  # a row in the table's ``groups`` (series and study levels)
    members: list[Member] = field(default_factory=list)
    due: float = 0.0  # clock time at which it closes (or retries its sink)
    sink_backoff: float = 0.0


def hashed(uid: str) -> str:
    """The UID's hash as the job table and result store key it; "" for no UID."""
    return uid_hash(uid) if uid else ""


def read_header(path: Path) -> Dataset | None:
    """A spooled file's header (no pixels), or None when unreadable."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # damaged file: any pydicom error
        return None


class Groups:
    """Open and closing groups, the job names they hold, and the memberships not yet recorded.
    Used by one thread (the worker's); not thread-safe."""

    def __init__(self, policy: GroupingPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.joins: list[Join] = []  # memberships for the job table, oldest first
        self._open: dict[tuple[str, str, str], Group] = {}
        self._closing: dict[str, Group] = {}
        self._held: set[str] = set()  # job names in open or closing groups

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def closing_count(self) -> int:
        return len(self._closing)

    def holds(self, name: str) -> bool:
        """The job is in an open or closing group (a second submit of it is a no-op)."""
        return name in self._held

    def add(self, member: Member, acked: float) -> Group | None:
        """An arrival acknowledged at clock time ``acked``. At level ``instance``: its own group,
        returned to be closed now. Else it joins (or opens) the group of its series (study),
        whose timer it pushes to ``acked + timeout_s``; None."""
        level, name = self.policy.level, member.name
        study_h = hashed(member.uid("StudyInstanceUID"))
        series_h = hashed(member.uid("SeriesInstanceUID")) if level != "study" else ""
        self._held.add(name)
        if level == "instance":
            return Group(group_key(level, study_h, series_h, name), level, study_h, series_h,
                         persisted=False, members=[member])
        ident = (level, study_h, series_h)
        opened = self._open.get(ident)
        if opened is None:
            opened = self._open[ident] = Group(group_key(level, study_h, series_h, name),
                                               level, study_h, series_h, persisted=True)
            LOG.info("group %s opened (%s)", opened.key, level)
        self.joins.append((opened.key, level, study_h, series_h, name))
        opened.members.append(member)
        opened.due = max(opened.due, acked + self.policy.timeout_s)
        return None

    def rejoin(self, member: Member, row: GroupRow) -> None:
        """A member of a group that was open at the last stop (already recorded): the group
        reopens with its timer re-armed from now."""
        ident = (row.level, row.study_hash, row.series_hash)
        group = self._open.get(ident)
        if group is None:
            group = self._open[ident] = Group(row.key, row.level, row.study_hash,
                                              row.series_hash, persisted=True)
        group.members.append(member)
        self._held.add(member.name)
        group.due = self.clock() + self.policy.timeout_s

    def rehand(self, member: Member, row: JobRow) -> None:
        """A finished instance-level job whose hand-off a stop interrupted: due at once."""
        group = Group(group_key("instance", row.study_hash, row.series_hash, row.name),
                      "instance", row.study_hash, row.series_hash, persisted=False,
                      members=[member], due=self.clock())
        self._closing[group.key] = group
        self._held.add(member.name)

    def due(self) -> Iterator[Group]:
        """Groups due now, open ones first, each taken out as it is yielded (a consumer that
        stops early leaves the rest in place). Nothing while a membership is unrecorded."""
        if self.joins:
            return
        now = self.clock()
        for ident, group in list(self._open.items()):
            if group.due <= now:
                del self._open[ident]
                yield group
        for key, group in list(self._closing.items()):
            if group.due <= now:
                del self._closing[key]
                yield group

    def closing(self) -> list[Group]:
        """The groups waiting to finish closing (a snapshot)."""
        return list(self._closing.values())

    def keep(self, group: Group) -> None:
        """A group that could not finish closing (stopping): tried again when next due."""
        self._closing[group.key] = group

    def defer(self, group: Group, base_s: float, max_s: float) -> float:
        """A group whose sink refused it: due again after a backoff that doubles from
        ``base_s`` up to ``max_s``; the backoff."""
        group.sink_backoff = min(max(group.sink_backoff * 2, base_s), max_s)
        group.due = self.clock() + group.sink_backoff
        self._closing[group.key] = group
        return group.sink_backoff

    def release(self, group: Group) -> None:
        """The group is done: its job names are free again."""
        self._held.difference_update(m.name for m in group.members)

    def discard(self, name: str) -> None:
        self._held.discard(name)

    def joins_recorded(self, keys: Mapping[str, str] | None = None) -> None:
        """The pending memberships are in the table; ``keys`` (job name -> the key of the group
        it joined, from ``JobTable.join_groups``) re-keys a group another worker opened first.
        When the group this worker had recorded earlier members under was closed meanwhile,
        the new members form a group of their own under the table's key, and the old one is
        tried (and found gone, or claimed) at once."""
        batch: dict[str, list[str]] = {}  # local key -> names joined in this batch
        actual: dict[str, str] = {}
        for key, _level, _study, _series, name in self.joins:
            batch.setdefault(key, []).append(name)
            if keys and name in keys:
                actual[key] = keys[name]
        self.joins = []
        for ident, group in list(self._open.items()):
            new = actual.get(group.key)
            if new is None or new == group.key:
                continue
            joined = set(batch[group.key])
            if all(m.name in joined for m in group.members):
                group.key = new  # all its members joined the table's group: the same group
                continue
            moved = [m for m in group.members if m.name in joined]
            self._open[ident] = Group(new, group.level, group.study_hash, group.series_hash,
                                      persisted=True, members=moved, due=group.due)
            group.members = [m for m in group.members if m.name not in joined]
            group.due = self.clock()  # tried at once: the table says who holds it
            self._closing[group.key] = group

    def dues(self) -> dict[str, float]:
        """Due time of each open group by key (what the table's ``due_at`` must reach)."""
        return {g.key: g.due for g in self._open.values()}

    def take(self, key: str) -> Group | None:
        """The group with this key, taken out (another path claimed it), or None."""
        for ident, group in list(self._open.items()):
            if group.key == key:
                del self._open[ident]
                return group
        return self._closing.pop(key, None)

    def rearm(self, group: Group, due: float) -> None:
        """An open group whose closing time a later arrival (maybe elsewhere) pushed."""
        group.due = due
        ident = (group.level, group.study_hash, group.series_hash)
        current = self._open.get(ident)
        if current is None:
            self._open[ident] = group
        elif current.key == group.key:
            current.members.extend(group.members)
            current.due = max(current.due, due)
        else:
            self._closing[group.key] = group

    def wait_s(self, until: float) -> float:
        """Seconds until the next group is due, or until ``until`` if that is sooner; >= 0."""
        dues = [g.due for g in self._open.values()] + [g.due for g in self._closing.values()]
        return max(0.0, min([*dues, until]) - self.clock())
