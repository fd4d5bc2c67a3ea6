"""The worker's groups in memory (processing/groups.py) on a clock the tests move: no thread, no
sleep, no disk (the members' datasets are bare headers, their paths never opened); last, the
same clock injected into the worker thread, with a fake Triton."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import GroupingPolicy, group_key
from services.gateway.processing.groups import Group, Groups, Job, Member
from services.gateway.processing.worker import SpoolWorker
from services.gateway.store.jobs import INFERRED, OPEN, GroupRow, JobRow
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import wait_for
from tests.gateway.util import dicom_bytes, make_study


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _member(name: str, study: str = "1.2.3", series: str = "1.2.3.4") -> Member:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = f"{series}.{sum(map(ord, name))}"
    return Member(Job(path=Path("/nowhere") / name, protocol="dimse"), ds, full=False)


def _groups(level: str = "series", timeout_s: float = 30.0) -> tuple[Groups, Clock]:
    clock = Clock()
    policy = GroupingPolicy(level=level, timeout_s=timeout_s)  # type: ignore[arg-type]
    return Groups(policy, clock), clock


def _due(groups: Groups) -> list[Group]:
    return list(groups.due())


def test_series_group_is_due_after_the_inactivity_timeout_restarted_by_each_arrival() -> None:
    groups, clock = _groups(timeout_s=30.0)
    assert groups.add(_member("a.dcm"), acked=clock.now) is None  # joins, not closed at once
    groups.joins_recorded()
    clock.now += 20.0
    assert groups.add(_member("b.dcm"), acked=clock.now) is None  # timer restarts: due 150
    groups.joins_recorded()
    clock.now += 29.0  # 49 s after the first, 29 s after the second
    assert _due(groups) == [] and groups.open_count == 1
    assert groups.wait_s(until=10_000.0) == pytest.approx(1.0)
    clock.now += 1.0
    [group] = _due(groups)
    assert [m.name for m in group.members] == ["a.dcm", "b.dcm"]
    assert group.persisted and group.level == "series"
    assert groups.open_count == 0 and _due(groups) == []  # taken out once


def test_the_timer_runs_from_the_ack_not_from_when_the_worker_takes_the_arrival() -> None:
    groups, clock = _groups(timeout_s=30.0)
    groups.add(_member("a.dcm"), acked=clock.now - 25.0)  # queued 25 s before it was taken
    groups.joins_recorded()
    clock.now += 5.0
    assert [m.name for g in _due(groups) for m in g.members] == ["a.dcm"]


def test_no_group_is_due_while_a_membership_is_unrecorded() -> None:
    groups, clock = _groups(timeout_s=1.0)
    groups.add(_member("a.dcm"), acked=clock.now)
    clock.now += 5.0
    assert _due(groups) == []  # the join is not on disk yet: a restart would not find it
    [(key, level, study_h, series_h, name)] = groups.joins
    assert (level, study_h, series_h, name) == ("series", uid_hash("1.2.3"),
                                                uid_hash("1.2.3.4"), "a.dcm")
    groups.joins_recorded()
    [group] = _due(groups)
    assert group.key == key


def test_series_and_study_levels_group_by_hashed_uids_and_keys_carry_no_uid() -> None:
    series, _ = _groups("series")
    for name, ser in (("a.dcm", "1.2.3.4"), ("b.dcm", "1.2.3.5"), ("c.dcm", "1.2.3.4")):
        series.add(_member(name, series=ser), acked=0.0)
    assert series.open_count == 2
    keys = {j[0] for j in series.joins}
    assert len(keys) == 2
    assert group_key("series", uid_hash("1.2.3"), uid_hash("1.2.3.4"), "a.dcm") in keys

    study, _ = _groups("study")
    for name, ser in (("a.dcm", "1.2.3.4"), ("b.dcm", "1.2.3.5")):
        study.add(_member(name, series=ser), acked=0.0)
    study.add(_member("x.dcm", study="9.8.7"), acked=0.0)
    assert study.open_count == 2
    assert {(j[1], j[3]) for j in study.joins} == {("study", "")}  # no series hash
    assert {j[0] for j in study.joins[:2]} == {group_key("study", uid_hash("1.2.3"), "",
                                                         "a.dcm")}
    for key in keys | {j[0] for j in study.joins}:
        assert "1.2.3" not in key and "9.8.7" not in key


def test_instance_level_returns_each_arrival_as_its_own_group_at_once() -> None:
    groups, _ = _groups("instance")
    group = groups.add(_member("a.dcm"), acked=0.0)
    assert group is not None and [m.name for m in group.members] == ["a.dcm"]
    assert not group.persisted and group.key == group_key(
        "instance", uid_hash("1.2.3"), uid_hash("1.2.3.4"), "a.dcm")
    assert groups.joins == [] and groups.open_count == 0  # nothing to record, nothing open
    assert groups.holds("a.dcm")
    groups.release(group)
    assert not groups.holds("a.dcm")


def test_a_refused_group_backs_off_doubling_up_to_the_cap() -> None:
    groups, clock = _groups("instance")
    group = groups.add(_member("a.dcm"), acked=0.0)
    assert group is not None
    delays = []
    for _ in range(5):
        delays.append(groups.defer(group, base_s=0.5, max_s=3.0))
        assert _due(groups) == []  # not before its backoff
        clock.now += delays[-1]
        assert _due(groups) == [group]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert groups.holds("a.dcm")  # still held while it waits


def test_a_group_kept_while_stopping_stays_due_and_held() -> None:
    groups, _ = _groups("instance")
    group = groups.add(_member("a.dcm"), acked=0.0)
    assert group is not None
    groups.keep(group)
    assert groups.closing_count == 1 and groups.holds("a.dcm")
    assert _due(groups) == [group]


def test_a_consumer_that_stops_early_leaves_the_other_due_groups_in_place() -> None:
    groups, clock = _groups(timeout_s=1.0)
    groups.add(_member("a.dcm", series="1.2.3.4"), acked=clock.now)
    groups.add(_member("b.dcm", series="1.2.3.5"), acked=clock.now)
    groups.joins_recorded()
    clock.now += 1.0
    for _first in groups.due():
        break
    assert groups.open_count == 1
    assert len(_due(groups)) == 1


def test_a_group_another_worker_opened_first_takes_the_tables_key() -> None:
    groups, _ = _groups()
    groups.add(_member("a.dcm"), acked=100.0)
    [(mine, *_)] = groups.joins
    groups.joins_recorded({"a.dcm": "theirs"})  # the table: another worker's open group
    assert groups.open_count == 1 and groups.dues() == {"theirs": 130.0}
    assert mine != "theirs"


def test_arrivals_after_the_old_group_closed_elsewhere_form_a_new_group() -> None:
    """Another worker claimed the group this worker recorded a.dcm in; b.dcm then joined a
    newer group in the table: b.dcm moves there, and the old group is tried at once (the
    table will say it is gone)."""
    groups, clock = _groups(timeout_s=30.0)
    groups.add(_member("a.dcm"), acked=clock.now)
    groups.joins_recorded()
    [old] = groups.dues()
    clock.now += 5.0
    groups.add(_member("b.dcm"), acked=clock.now)
    groups.joins_recorded({"b.dcm": "newer"})
    assert groups.dues() == {"newer": 135.0} and groups.closing_count == 1
    [gone] = _due(groups)  # due now, to be found gone
    assert gone.key == old and [m.name for m in gone.members] == ["a.dcm"]
    assert groups.holds("a.dcm") and groups.holds("b.dcm")
    clock.now += 30.0
    [new] = _due(groups)
    assert new.key == "newer" and [m.name for m in new.members] == ["b.dcm"]


def test_a_group_claimed_elsewhere_can_be_taken_out_and_a_pushed_one_rearmed() -> None:
    groups, clock = _groups(timeout_s=30.0)
    groups.add(_member("a.dcm"), acked=clock.now)
    groups.joins_recorded()
    [key] = groups.dues()
    clock.now += 30.0
    [group] = _due(groups)
    groups.rearm(group, due=clock.now + 10.0)  # a later arrival at another worker
    assert _due(groups) == [] and groups.dues() == {key: clock.now + 10.0}
    taken = groups.take(key)
    assert taken is group and groups.open_count == 0 and groups.take(key) is None


def _group_row(key: str, level: str = "series") -> GroupRow:
    return GroupRow(key, level, uid_hash("1.2.3"), uid_hash("1.2.3.4"), OPEN, 0.0, 0.0)


def test_rejoined_members_reopen_their_group_with_the_timer_from_now() -> None:
    groups, clock = _groups(timeout_s=30.0)
    row = _group_row("k1")
    groups.rejoin(_member("a.dcm"), row)
    clock.now += 10.0
    groups.rejoin(_member("b.dcm"), row)
    assert groups.open_count == 1 and groups.joins == []  # already recorded before the stop
    clock.now += 29.0
    assert _due(groups) == []
    clock.now += 1.0
    [group] = _due(groups)
    assert group.key == "k1" and [m.name for m in group.members] == ["a.dcm", "b.dcm"]


def test_a_finished_instance_to_hand_on_again_is_due_at_once() -> None:
    groups, clock = _groups("instance")
    row = JobRow("a.dcm", uid_hash("1.2.3"), uid_hash("1.2.3.4"), uid_hash("1.2.3.4.5"),
                 "dimse", INFERRED, 1, 0.0, 0.0, None)
    groups.rehand(_member("a.dcm"), row)
    assert groups.holds("a.dcm") and groups.wait_s(until=clock.now + 60.0) == 0.0
    [group] = _due(groups)
    assert group.key == group_key("instance", row.study_hash, row.series_hash, "a.dcm")


def test_wait_is_until_the_earliest_due_or_the_given_time_never_negative() -> None:
    groups, clock = _groups(timeout_s=30.0)
    assert groups.wait_s(until=clock.now + 7.0) == pytest.approx(7.0)  # nothing open
    groups.add(_member("a.dcm"), acked=clock.now)
    assert groups.wait_s(until=clock.now + 3600.0) == pytest.approx(30.0)
    assert groups.wait_s(until=clock.now + 7.0) == pytest.approx(7.0)
    clock.now += 45.0
    assert groups.wait_s(until=clock.now + 7.0) == 0.0


def test_the_worker_closes_groups_by_its_injected_clock_not_wall_time_with_fake_triton(
    tmp_path: Path,
) -> None:
    """The thread's timers come from ``clock``: a frozen clock keeps a group open however long
    the test takes, and moving it closes the group at the next turn of the loop (an arrival
    wakes it). Arrivals are spooled and recorded as the ingest path does."""
    fake, clock = FakeInferer(), Clock()
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, fake), Spool(tmp_path),
                         ResultStore(tmp_path), GatewayMetrics(), backoff_s=0.01,
                         policy=GroupingPolicy(level="series", timeout_s=30.0), clock=clock)

    def submit(ds: Dataset) -> str:
        path = Spool(tmp_path).put(dicom_bytes(ds))
        worker.jobs.insert(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                           ds.SOPInstanceUID, "dimse")
        worker.submit(Job(path=path, protocol="dimse"))
        return path.name

    def grouped(name: str) -> bool:
        row = worker.jobs.get(name)
        return row is not None and row.group_key is not None

    first, second = make_study(2, 0), make_study(2, 2)
    worker.start()
    try:
        names = [submit(ds) for ds in first]  # acknowledged at 100: due at 130
        assert wait_for(lambda: all(grouped(n) for n in names))
        clock.now = 129.9
        third = submit(second[0])  # wakes the loop: nothing is due yet
        assert wait_for(lambda: grouped(third))
        assert fake.calls == 0 and worker.open_groups == 2
        clock.now = 130.0
        submit(second[1])
        assert wait_for(lambda: worker.depth == 2)  # the first series released
        assert fake.calls == 2 and worker.open_groups == 1  # the second waits for 159.9
        assert {worker.jobs.get(n).state for n in names} == {INFERRED}  # type: ignore[union-attr]
    finally:
        worker.stop()
