"""Crash recovery as a plan: what a stop, clean or not, left in the spool and the job table, and
what to do with each piece before any new work. ``plan_recovery`` reads only the spooled files'
headers and what it is given; the worker applies the plan.

The worker's durable steps run in this order (runner.py): result file (naming the job, or the
group for a series result) -> rows finished (one transaction, once) -> ``sink.accept`` -> group
closed -> spool files removed. So, after a crash at any point:

- a spool file without a row (crash between spooling and the insert) gets a row and is queued;
- a row still ``received`` whose spool file is gone (which the order rules out) is finished from
  its stored result if this job wrote one, else failed as ``spool_missing``, never left pending;
- a member of a group still open rejoins it (the timer re-armed from the restart); one whose
  header cannot be read is queued as a new arrival (and quarantined there);
- a finished member of a closed group had only its removal left: the file is removed;
- a finished instance-level job was not handed on yet: it is handed on again (or its file
  removed when there is no sink or the file is unreadable);
- anything else still ``received`` is queued; open groups with no member left are closed.

Nothing is inferred twice: the stored result that names the job (or group) is the proof that
inference ran. PHI: raw UIDs read from headers stay in memory (``NewRow``, ``Member``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from services.gateway.processing.groups import UIDS, Job, Member, read_header
from services.gateway.store.jobs import FAILED, FINAL, INFERRED, GroupRow, JobRow
from services.gateway.store.results import ResultStore

RECOVERED = "recovered"  # the protocol of a job found at restart without a row
Stored = Callable[[str, str], dict[str, Any] | None]  # (study hash, sop hash) -> result doc


@dataclass(frozen=True)
class Finish:
    """A ``received`` row whose spool file is gone, and the state it ends in."""

    name: str
    state: str
    reason: str | None
    lost: bool  # no result of its own either: acknowledged but lost (logged as an error)


@dataclass(frozen=True)
class NewRow:
    """A spool file without a row: its raw UIDs ("" when unreadable), in memory only."""

    name: str
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Rejoin:
    member: Member
    group: GroupRow


@dataclass(frozen=True)
class Rehand:
    member: Member
    row: JobRow


@dataclass
class RecoveryPlan:
    """Apply in field order: finish, insert, remove, close, then rejoin, rehand, requeue."""

    finish: list[Finish] = field(default_factory=list)
    insert: list[NewRow] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)
    close: list[str] = field(default_factory=list)  # keys of open groups with no member left
    rejoin: list[Rejoin] = field(default_factory=list)
    rehand: list[Rehand] = field(default_factory=list)
    requeue: list[Job] = field(default_factory=list)  # to submit as new arrivals, in order

    @property
    def open_groups(self) -> int:
        """Groups that reopen."""
        return len({r.group.key for r in self.rejoin})


def plan_recovery(files: Sequence[Path], rows: Mapping[str, JobRow], received: Iterable[JobRow],
                  open_groups: Iterable[GroupRow], stored: Stored,
                  hand_on: bool) -> RecoveryPlan:
    """The plan for the spool's ``files`` (oldest first), their ``rows`` by job name (a file
    may have none), every ``received`` row, the table's open groups and the result store's
    ``stored`` lookup. ``hand_on``: a sink receives completed groups."""
    plan = RecoveryPlan()
    names = {p.name for p in files}
    for row in received:
        if row.name in names:
            continue
        doc = stored(row.study_hash, row.sop_hash)
        if doc is not None and doc.get(ResultStore.JOB_KEY) == row.name:
            error = doc.get("error")
            plan.finish.append(Finish(row.name, FAILED if "error" in doc else INFERRED,
                                      error.get("reason") if isinstance(error, dict) else None,
                                      lost=False))
        else:
            plan.finish.append(Finish(row.name, FAILED, "spool_missing", lost=True))
    opened = {g.key: g for g in open_groups}
    rejoined: set[str] = set()
    unreadable: list[Job] = []  # members of open groups: queued first, as before the split
    for path in files:
        found = rows.get(path.name)
        if found is None:
            plan.insert.append(NewRow(path.name, *header_uids(path)))
            plan.requeue.append(Job(path=path, protocol=RECOVERED))
            continue
        job = Job(path=path, protocol=RECOVERED, calling_aet=found.calling_aet)
        if found.group_key is not None and found.group_key in opened:
            header = read_header(path)
            if header is None:
                unreadable.append(job)
                continue
            plan.rejoin.append(Rejoin(Member(job, header, full=False), opened[found.group_key]))
            rejoined.add(found.group_key)
        elif found.state in FINAL and found.group_key is not None:
            plan.remove.append(path)  # its group was closed: only the removal was left
        elif found.state in FINAL:  # instance level, finished, not handed on yet
            header = read_header(path) if hand_on else None
            if header is None:
                plan.remove.append(path)
            else:
                plan.rehand.append(Rehand(Member(job, header, full=False), found))
        else:
            plan.requeue.append(job)
    plan.requeue[:0] = unreadable
    plan.close = [key for key in opened if key not in rejoined]
    return plan


def header_uids(path: Path) -> tuple[str, str, str]:
    """Study, series and SOP Instance UIDs from a spooled file's header; empty when unreadable
    (the worker then quarantines the file)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(UIDS))
        return (str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                str(header.get("SOPInstanceUID", "")))
    except Exception:  # damaged file: any pydicom error
        return "", "", ""
