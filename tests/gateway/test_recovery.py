"""Crash recovery as a plan (processing/recovery.py): spool files in a tmp folder and job rows
written out by hand, as a process killed between two durable steps would leave them; no
worker, no thread, no job table. The plan is only read back, never applied here (test_jobs.py
and test_grouping.py apply it through the worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread

from services.gateway.phi import uid_hash
from services.gateway.processing.recovery import RECOVERED, Finish, NewRow, plan_recovery
from services.gateway.store.jobs import (
    DELIVERED,
    FAILED,
    INFERRED,
    OPEN,
    RECEIVED,
    SKIPPED,
    GroupRow,
    JobRow,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.gateway.util import dicom_bytes, make_instance

Docs = dict[tuple[str, str], dict[str, Any]]


def _row(name: str, state: str = RECEIVED, group: str | None = None, aet: str | None = None,
         study: str = "s", sop: str | None = None) -> JobRow:
    return JobRow(name, study, "se", sop or f"sop-{name}", "dimse", state, 0, 0.0, 0.0, None,
                  group, aet)


def _group(key: str) -> GroupRow:
    return GroupRow(key, "series", "s", "se", OPEN, 0.0, 0.0)


def _lookup(docs: Docs):  # type: ignore[no-untyped-def]
    return lambda study_hash, sop_hash: docs.get((study_hash, sop_hash))


def _spool(tmp: Path, n: int) -> list[Path]:
    spool = Spool(tmp)
    return [spool.put(dicom_bytes(make_instance(k))) for k in range(n)]


def test_nothing_left_plans_nothing(tmp_path: Path) -> None:
    plan = plan_recovery([], {}, [], [], _lookup({}), hand_on=True)
    assert (plan.finish, plan.insert, plan.remove, plan.close, plan.rejoin, plan.rehand,
            plan.requeue) == ([], [], [], [], [], [], [])


def test_a_file_without_a_row_gets_one_from_its_header_and_is_queued(tmp_path: Path) -> None:
    ds = make_instance(3)
    path = Spool(tmp_path).put(dicom_bytes(ds))
    plan = plan_recovery([path], {}, [], [], _lookup({}), hand_on=True)
    assert plan.insert == [NewRow(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                  ds.SOPInstanceUID)]
    [job] = plan.requeue
    assert (job.path, job.protocol, job.calling_aet) == (path, RECOVERED, None)


def test_an_unreadable_file_without_a_row_gets_an_empty_row_and_is_queued(
    tmp_path: Path,
) -> None:
    path = Spool(tmp_path).put(b"not DICOM at all")
    plan = plan_recovery([path], {}, [], [], _lookup({}), hand_on=True)
    assert plan.insert == [NewRow(path.name, "", "", "")]
    assert [j.path for j in plan.requeue] == [path]  # quarantined there, as an arrival


def test_a_received_row_with_its_file_is_queued_with_its_calling_ae(tmp_path: Path) -> None:
    [path] = _spool(tmp_path, 1)
    row = _row(path.name, aet="MOD1")
    plan = plan_recovery([path], {path.name: row}, [row], [], _lookup({}), hand_on=True)
    [job] = plan.requeue
    assert (job.path, job.calling_aet) == (path, "MOD1")
    assert plan.insert == [] and plan.finish == [] and plan.remove == []


def test_a_received_row_whose_file_is_gone_is_finished_from_its_own_result_only() -> None:
    rows = [_row("ok.dcm"), _row("err.dcm"), _row("other.dcm"), _row("none.dcm")]
    docs: Docs = {
        ("s", "sop-ok.dcm"): {"predictions": [], ResultStore.JOB_KEY: "ok.dcm"},
        ("s", "sop-err.dcm"): {"error": {"reason": "bad_pixels"},
                               ResultStore.JOB_KEY: "err.dcm"},
        # an earlier copy of the same instance wrote this one: not this job's result
        ("s", "sop-other.dcm"): {"predictions": [], ResultStore.JOB_KEY: "earlier.dcm"},
    }
    plan = plan_recovery([], {}, rows, [], _lookup(docs), hand_on=True)
    assert plan.finish == [
        Finish("ok.dcm", INFERRED, None, lost=False),
        Finish("err.dcm", FAILED, "bad_pixels", lost=False),
        Finish("other.dcm", FAILED, "spool_missing", lost=True),
        Finish("none.dcm", FAILED, "spool_missing", lost=True),
    ]
    assert plan.requeue == []


def test_members_of_an_open_group_rejoin_it_and_only_empty_groups_close(tmp_path: Path) -> None:
    a, b, c = _spool(tmp_path, 3)
    rows = {a.name: _row(a.name, group="g1"), b.name: _row(b.name, group="g1"),
            c.name: _row(c.name, state=INFERRED, group="g1")}  # finished before the stop
    plan = plan_recovery([a, b, c], rows, [rows[a.name], rows[b.name]],
                         [_group("g1"), _group("g2")], _lookup({}), hand_on=True)
    assert [(r.member.name, r.group.key) for r in plan.rejoin] == [
        (a.name, "g1"), (b.name, "g1"), (c.name, "g1")]
    member = plan.rejoin[0].member
    assert not member.full and member.uid("SOPInstanceUID") == dcmread(a).SOPInstanceUID
    assert "PixelData" not in member.ds  # the header only: pixels are read at close
    assert plan.open_groups == 1
    assert plan.close == ["g2"]  # no member left on disk
    assert plan.requeue == [] and plan.remove == []


def test_an_unreadable_member_of_an_open_group_is_queued_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    plain = spool.put(dicom_bytes(make_instance(0)))
    damaged = spool.put(b"\x00" * 10)
    rows = {plain.name: _row(plain.name), damaged.name: _row(damaged.name, group="g1")}
    plan = plan_recovery([plain, damaged], rows, list(rows.values()), [_group("g1")],
                         _lookup({}), hand_on=True)
    assert [j.path for j in plan.requeue] == [damaged, plain]  # as the worker did before
    assert plan.rejoin == [] and plan.close == ["g1"]


def test_finished_members_of_a_closed_group_had_only_their_removal_left(tmp_path: Path) -> None:
    files = _spool(tmp_path, 3)
    rows = {p.name: _row(p.name, state=state, group="gone")
            for p, state in zip(files, (INFERRED, SKIPPED, DELIVERED), strict=True)}
    plan = plan_recovery(files, rows, [], [], _lookup({}), hand_on=True)
    assert plan.remove == files
    assert plan.rejoin == [] and plan.rehand == [] and plan.requeue == []


def test_a_finished_instance_not_handed_on_is_handed_on_again_or_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    good = spool.put(dicom_bytes(make_instance(0)))
    damaged = spool.put(b"\x00" * 10)
    rows = {good.name: _row(good.name, state=INFERRED, aet="MOD1"),
            damaged.name: _row(damaged.name, state=FAILED)}
    plan = plan_recovery([good, damaged], rows, [], [], _lookup({}), hand_on=True)
    [again] = plan.rehand
    assert (again.member.name, again.row, again.member.job.calling_aet) == (
        good.name, rows[good.name], "MOD1")
    assert plan.remove == [damaged]  # nothing a sink could use

    no_sink = plan_recovery([good, damaged], rows, [], [], _lookup({}), hand_on=False)
    assert no_sink.rehand == [] and no_sink.remove == [good, damaged]


def test_every_file_gets_exactly_one_fate_and_planning_changes_nothing(tmp_path: Path) -> None:
    files = _spool(tmp_path, 6)
    f = [p.name for p in files]
    rows = {f[0]: _row(f[0]), f[1]: _row(f[1], group="g1"),
            f[2]: _row(f[2], state=INFERRED, group="old"), f[3]: _row(f[3], state=INFERRED),
            f[4]: _row(f[4], state=FAILED, group="g1")}  # f[5]: no row
    received = [rows[f[0]], rows[f[1]], _row("vanished.dcm")]
    before = {p: p.read_bytes() for p in files}
    plan = plan_recovery(files, rows, received, [_group("g1")], _lookup({}), hand_on=True)
    fates = ([j.path for j in plan.requeue] + [r.member.job.path for r in plan.rejoin]
             + [r.member.job.path for r in plan.rehand] + plan.remove)
    assert sorted(fates) == sorted(files)
    assert [j.path for j in plan.requeue] == [files[0], files[5]]
    assert [r.member.job.path for r in plan.rejoin] == [files[1], files[4]]
    assert [r.member.job.path for r in plan.rehand] == [files[3]]
    assert plan.remove == [files[2]]
    assert [x.name for x in plan.finish] == ["vanished.dcm"]
    assert [x.name for x in plan.insert] == [f[5]]
    assert Spool(tmp_path).pending() == files  # a plan, not an action
    assert all(p.read_bytes() == data for p, data in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed", "incoming"]  # no table
    assert list((tmp_path / "failed").iterdir()) == []  # nothing quarantined


def test_rows_are_matched_by_hashed_uids_only(tmp_path: Path) -> None:
    """The result lookup gets the row's hashes, never raw UIDs (the table holds none)."""
    asked: list[tuple[str, str]] = []
    row = _row("gone.dcm", study=uid_hash("1.2.3"), sop=uid_hash("1.2.3.4.5"))

    def stored(study_hash: str, sop_hash: str) -> dict[str, Any] | None:
        asked.append((study_hash, sop_hash))
        return None

    plan_recovery([], {}, [row], [], stored, hand_on=True)
    assert asked == [(uid_hash("1.2.3"), uid_hash("1.2.3.4.5"))]
