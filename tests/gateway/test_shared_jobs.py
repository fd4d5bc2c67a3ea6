"""Several workers sharing one spool and one job table (gateway processes in one pod on SQLite,
replicas on PostgreSQL), against both backends: versioned migrations, groups keyed in the table,
one claim per group, leases and take-over, a study split across workers, a worker that dies.

Triton is faked (names say so). "Dies" in-process means the worker's threads stop with nothing
cleaned up: no lease given up, claims left as they were, as after kill -9; the last test kills a
real gateway process with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.errors import ConfigError
from services.gateway.config import PASSWORD_ENV, DbTarget, GatewayConfig
from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.grouping import CompletedGroup, GroupingPolicy
from services.gateway.processing.groups import Group, Member, hashed, read_header
from services.gateway.processing.worker import Job, SpoolWorker
from services.gateway.store.jobdb import (
    LATEST,
    JobDbError,
    JobDbUnavailable,
    migrate,
    open_database,
)
from services.gateway.store.jobs import (
    CLAIMED,
    CLOSED,
    CLOSING,
    GONE,
    INFERRED,
    LATER,
    OPEN,
    RECEIVED,
    JobTable,
    group_key,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from services.net import free_port
from tests.conftest import ROOT, TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import fake_gateway, model_repository, wait_for
from tests.gateway.util import dicom_bytes, make_study
from tests.postgres import Postgres

LEASE_S = 1.0


class SharedSink:
    """One sink for every worker of a test (thread-safe): the groups handed on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: list[CompletedGroup] = []

    def accept(self, group: CompletedGroup) -> None:
        assert all(p.exists() for p in group.sources)  # valid until accept returned
        with self._lock:
            self.accepted.append(group)


def _study(per_series: int = 2) -> tuple[list[Dataset], list[Dataset]]:
    """One study of two series, ``per_series`` instances each."""
    study = generate_uid()
    first, second = make_study(per_series, seed=10), make_study(per_series, seed=20)
    for ds in first + second:
        ds.StudyInstanceUID = study
    return first, second


def _worker(tmp: Path, db: DbTarget, fake: FakeInferer, sink: SharedSink | None,
            timeout_s: float = 0.5) -> SpoolWorker:
    return SpoolWorker(InferenceCore(TINY_MANIFEST, fake), Spool(tmp), ResultStore(tmp),
                       GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp, db), sink=sink,
                       policy=GroupingPolicy(level="study", timeout_s=timeout_s),
                       lease_s=LEASE_S)


def _spooled(worker: SpoolWorker, tmp: Path, ds: Dataset) -> Job:
    """Spooled and recorded under the worker's lease, as its ingest path does; to submit."""
    path = Spool(tmp).put(dicom_bytes(ds))
    worker.jobs.insert(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                       "dimse", "MOD1", owner=worker.owner)
    return Job(path=path, protocol="dimse", acked=time.perf_counter())


def _acked(worker: SpoolWorker, tmp: Path, datasets: list[Dataset]) -> None:
    """Spooled and recorded first, then queued together: the arrivals come closer together
    than the group timeout even on a loaded machine (fsyncs are slow there)."""
    for job in [_spooled(worker, tmp, ds) for ds in datasets]:
        worker.submit(job)


def _die(worker: SpoolWorker) -> None:
    """Threads stop, nothing else: the lease is not given up, claims stay (as after kill -9)."""
    worker._stop.set()
    worker._queue.put(None)
    worker._thread.join(timeout=10)
    worker._beat.join(timeout=10)


def _stop_all(*workers: SpoolWorker) -> None:
    for w in workers:
        w.stop()
        w.jobs.close()


# -- the table ------------------------------------------------------------------------------


def test_schema_of_version_1_is_migrated_with_its_rows(tmp_path: Path, job_db: DbTarget) -> None:
    db = open_database(job_db, tmp_path, JobTable.FILE)
    assert migrate(db, upto=1) == 0
    with db.tx() as tx:
        tx.execute("INSERT INTO jobs VALUES ('a.dcm', 's', 'se', 'i1', 'dimse', 'received', 0,"
                   " 1.0, 1.0, NULL)")
    with pytest.raises(Exception), db.tx() as tx:  # noqa: B017 - v1's CHECK refuses it
        tx.execute("UPDATE jobs SET state = 'skipped'")
    db.close()
    table = JobTable(tmp_path, job_db)
    with table.db.tx() as tx:
        assert tx.execute("SELECT version FROM schema_version")[0] == [(LATEST,)]
    row = table.get("a.dcm")
    assert row is not None and (row.state, row.group_key, row.owner) == (RECEIVED, None, None)
    assert table.finish("a.dcm", "skipped", "rule")  # the migrated CHECK takes the new states
    table.close()
    again = JobTable(tmp_path, job_db)  # opening it again changes nothing
    assert [(r.name, r.state) for r in again.all()] == [("a.dcm", "skipped")]
    again.close()


def test_a_schema_newer_than_the_gateway_is_refused(tmp_path: Path, job_db: DbTarget) -> None:
    JobTable(tmp_path, job_db).close()
    db = open_database(job_db, tmp_path, JobTable.FILE)
    with db.tx() as tx:
        tx.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    db.close()
    with pytest.raises(JobDbError, match="newer than this gateway"):
        JobTable(tmp_path, job_db)


def test_two_workers_join_one_open_group_and_only_one_claims_it(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    a, b = JobTable(tmp_path, job_db), JobTable(tmp_path, job_db)
    for table, name in ((a, "a1"), (b, "b1")):
        table.insert(name, "1.2", "1.2.3", f"1.2.3.{name}", "dimse", owner=name[0])
    joined_a = a.join_groups([("ka", "study", "h", "", "a1")], {"ka": 10.0})
    joined_b = b.join_groups([("kb", "study", "h", "", "b1")], {"kb": 20.0})
    assert joined_a == {"a1": "ka"} and joined_b == {"b1": "ka"}  # b joined a's group
    assert [m.name for m in a.members("ka")] == ["a1", "b1"] and b.group("kb") is None
    assert a.claim_group("ka", "a", now=15.0) == (LATER, 20.0)  # b's arrival pushed it
    assert a.claim_group("ka", "a", now=20.0) == (CLAIMED, 20.0)
    assert b.claim_group("ka", "b", now=20.0) == (GONE, 0.0)  # a holds it
    assert b.claim_due("b", now=99.0) == []
    group = a.group("ka")
    assert group is not None and group.state == CLOSING
    a.close_group("ka")
    # a later arrival opens a new group: the closed one is never joined again
    b.insert("b2", "1.2", "1.2.3", "1.2.3.b2", "dimse", owner="b")
    assert b.join_groups([("kc", "study", "h", "", "b2")], {"kc": 30.0}) == {"b2": "kc"}
    assert [g.key for g in a.groups(CLOSED)] == ["ka"]
    a.close()
    b.close()


def test_take_over_takes_a_dead_workers_rows_and_claims_never_a_live_ones(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    table = JobTable(tmp_path, job_db)
    table.heartbeat("live", lease_until=100.0)
    table.heartbeat("dead", lease_until=50.0)
    for owner in ("live", "dead"):
        table.insert(f"{owner}.dcm", "1.2", "1.2.3", f"1.2.3.{owner}", "rest", owner=owner)
        table.insert(f"{owner}-g.dcm", "1.2", "1.2.4", f"1.2.4.{owner}", "rest", owner=owner)
        table.join_groups([(f"g-{owner}", "series", owner, "s", f"{owner}-g.dcm")],
                          {f"g-{owner}": 10.0})
        assert table.claim_group(f"g-{owner}", owner, now=10.0)[0] == CLAIMED
    assert table.take_over("me", now=60.0) == [r for r in table.all() if r.name == "dead.dcm"]
    assert {r.name: r.owner for r in table.all()} == {
        "dead.dcm": "me", "dead-g.dcm": "dead", "live.dcm": "live", "live-g.dcm": "live"}
    states = {g.key: g.state for g in table.groups(OPEN) + table.groups(CLOSING)}
    assert states == {"g-dead": OPEN, "g-live": CLOSING}  # the dead claim reopened, due now
    assert [g.key for g in table.claim_due("me", now=60.0)] == ["g-dead"]
    assert table.live_owners(60.0) == {"live"}
    assert table.take_over("me", now=60.0) == []  # nothing twice
    table.close()


def test_a_join_under_a_key_another_worker_claimed_opens_a_group_of_its_own(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """Worker A still holds group K in its timers when B claims K; an arrival at A proposes
    K: it opens a new group named after itself (was: "exists but is not open", retried
    forever), which is claimed and closed in turn."""
    a, b = JobTable(tmp_path, job_db), JobTable(tmp_path, job_db)
    for name in ("a1", "a2"):
        a.insert(name, "1.2", "1.2.3", f"1.2.3.{name}", "dimse", owner="A")
    assert a.join_groups([("K", "study", "h", "", "a1")], {"K": 10.0}) == {"a1": "K"}
    assert [g.key for g in b.claim_due("B", now=10.0)] == ["K"]
    joined = a.join_groups([("K", "study", "h", "", "a2")], {"K": 20.0})
    own = group_key("study", "h", "", "a2")
    assert joined == {"a2": own} and own != "K"
    assert [m.name for m in a.members("K")] == ["a1"]
    assert [m.name for m in a.members(own)] == ["a2"]
    assert b.close_group("K", "B")
    assert a.claim_group(own, "A", now=15.0) == (LATER, 20.0)  # its due time was kept
    assert a.claim_group(own, "A", now=20.0) == (CLAIMED, 20.0)
    assert a.close_group(own, "A")
    # the job joining again (a restart) while its own key is closed too: yet another key
    again = a.join_groups([("K", "study", "h", "", "a2")])["a2"]
    assert again not in ("K", own) and a.group(again) is not None
    assert {g.key for g in a.groups(CLOSED)} == {"K", own}
    a.close()
    b.close()


def test_a_worker_whose_claim_was_taken_over_can_neither_finish_nor_close_it(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """A claims a group and stalls past its lease; B takes over and claims the group (and
    A's ungrouped row): A's finish and close no longer apply, its heartbeat says the lease
    was gone; B's do, once."""
    a, b = JobTable(tmp_path, job_db), JobTable(tmp_path, job_db)
    assert not a.heartbeat("A", lease_until=10.0)  # no lease before the first beat
    assert a.heartbeat("A", lease_until=10.0)
    for name in ("g1", "g2", "solo"):
        a.insert(name, "1.2", "1.2.3", f"1.2.3.{name}", "dimse", owner="A")
    a.join_groups([("K", "series", "h", "s", "g1"), ("K", "series", "h", "s", "g2")],
                  {"K": 5.0})
    assert a.claim_group("K", "A", now=5.0) == (CLAIMED, 5.0) and a.holds("K", "A")
    assert [r.name for r in b.take_over("B", now=20.0)] == ["solo"]  # A's lease ended at 10
    assert [g.key for g in b.claim_due("B", now=20.0)] == ["K"]
    assert not a.heartbeat("A", lease_until=30.0)  # A wakes up: its lease was gone
    assert not a.holds("K", "A") and b.holds("K", "B")
    assert a.finish_many(["g1", "g2"], INFERRED, owner="A") == 0
    assert not a.finish("solo", INFERRED, owner="A")
    assert not a.close_group("K", "A")
    assert {r.state for r in a.all()} == {RECEIVED}
    group = a.group("K")
    assert group is not None and group.state == CLOSING
    assert b.finish_many(["g1", "g2"], INFERRED, owner="B") == 2
    assert b.finish("solo", INFERRED, owner="B")
    assert b.close_group("K", "B") and not b.close_group("K", "B")
    assert {r.state for r in a.all()} == {INFERRED} and [g.key for g in a.groups(CLOSED)] == ["K"]
    a.close()
    b.close()


def test_a_dropped_postgresql_connection_is_retryable_and_replaced(
    tmp_path: Path, postgres: Postgres,
) -> None:
    """The server ends the gateway's session (restart, failover): that transaction fails as
    "unavailable, try later" (the worker and ingest retry or refuse, never drop), and the
    next one runs on a new connection."""
    import psycopg

    url = postgres.new_database()
    table = JobTable(tmp_path, DbTarget(url))
    table.insert("a.dcm", "1.2", "1.2.3", "1.2.3.4", "dimse")
    with psycopg.connect(url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                               " application_name = 'bedside-gateway' AND"
                               " datname = current_database()").fetchall()
    assert killed == [(True,)]
    with pytest.raises(JobDbUnavailable, match="AdminShutdown"):  # an OperationalError
        table.count(RECEIVED)
    assert table.count(RECEIVED) == 1  # reconnected
    table.close()


# -- workers --------------------------------------------------------------------------------


def test_a_study_split_across_two_workers_is_one_group_inferred_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    sink, fake_a, fake_b = SharedSink(), FakeInferer(), FakeInferer()
    a, b = _worker(tmp_path, job_db, fake_a, sink), _worker(tmp_path, job_db, fake_b, sink)
    a.start()
    b.start()
    try:
        first, second = _study()
        jobs = [(w, _spooled(w, tmp_path, ds)) for ds_a, ds_b in zip(first, second, strict=True)
                for w, ds in ((a, ds_a), (b, ds_b))]  # interleaved, as two associations
        for worker, job in jobs:
            worker.submit(job)
        assert wait_for(lambda: len(sink.accepted) == 1 and a.depth == b.depth == 0)
        time.sleep(LEASE_S)  # time for a second, wrong hand-off to show
        (group,) = sink.accepted
        assert len(group.job_names) == 4 and len(group.results) == 4
        assert len(group.series_uids) == 2
        assert fake_a.calls + fake_b.calls == 4  # each instance inferred once
        rows = a.jobs.all()
        assert [(r.state, r.attempts, r.group_key) for r in rows] == [
            (INFERRED, 1, group.key)] * 4
        assert a.jobs.groups(OPEN) == [] and Spool(tmp_path).pending() == []
    finally:
        _stop_all(a, b)


def test_a_dead_workers_open_group_is_finished_by_the_other_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    sink, fake_a, fake_b = SharedSink(), FakeInferer(), FakeInferer()
    a = _worker(tmp_path, job_db, fake_a, sink, timeout_s=2.0)  # a dies before it is due
    b = _worker(tmp_path, job_db, fake_b, sink, timeout_s=2.0)
    a.start()
    b.start()
    try:
        first, second = _study()
        _acked(a, tmp_path, first)
        at_b = [_spooled(b, tmp_path, ds) for ds in second]  # acknowledged by b meanwhile
        assert wait_for(lambda: len(a.jobs.groups(OPEN)) == 1
                        and len(a.jobs.members(a.jobs.groups(OPEN)[0].key)) == 2)
        _die(a)
        for job in at_b:
            b.submit(job)
        assert wait_for(lambda: len(sink.accepted) == 1 and b.depth == 0, timeout=30)
        (group,) = sink.accepted
        assert len(group.job_names) == 4 and len(group.results) == 4
        assert fake_a.calls == 0 and fake_b.calls == 4
        assert {(r.state, r.attempts) for r in b.jobs.all()} == {(INFERRED, 1)}
        assert Spool(tmp_path).pending() == []
    finally:
        _stop_all(a, b)


def test_a_group_whose_closer_died_mid_inference_is_taken_over_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    sink = SharedSink()
    down, up = FakeInferer(unavailable_calls=10**6), FakeInferer()  # a's Triton never answers
    a = _worker(tmp_path, job_db, down, sink, timeout_s=0.2)
    a.start()
    b = None
    try:
        first, second = _study()
        _acked(a, tmp_path, first + second)
        assert wait_for(lambda: down.calls > 0 and len(a.jobs.groups(CLOSING)) == 1)
        _die(a)  # claimed, inferring, gone
        b = _worker(tmp_path, job_db, up, sink)
        b.start()
        assert wait_for(lambda: len(sink.accepted) == 1 and not b.jobs.groups(CLOSING)
                        and not b.jobs.groups(OPEN), timeout=30)
        time.sleep(LEASE_S)
        assert len(sink.accepted) == 1 and len(sink.accepted[0].results) == 4
        assert up.calls == 4 and {r.state for r in b.jobs.all()} == {INFERRED}
        assert Spool(tmp_path).pending() == []
    finally:
        _stop_all(a, *([b] if b is not None else []))


def test_an_arrival_for_a_group_another_worker_claimed_is_inferred_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """B claims A's open study group (B's clock runs ahead: due for B, not yet for A) while A
    still holds it in its timers; more of the study then arrives at A. A's new arrivals form
    a group of their own (A no longer stops closing groups for good), and every instance is
    inferred once: two hand-offs, four results."""
    sink, fake_a, fake_b = SharedSink(), FakeInferer(), FakeInferer()
    a = SpoolWorker(InferenceCore(TINY_MANIFEST, fake_a), Spool(tmp_path), ResultStore(tmp_path),
                    GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp_path, job_db),
                    sink=sink, policy=GroupingPolicy(level="study", timeout_s=3.0),
                    lease_s=1000.0)  # alive for B, whose clock is 100 s ahead
    b = SpoolWorker(InferenceCore(TINY_MANIFEST, fake_b), Spool(tmp_path), ResultStore(tmp_path),
                    GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp_path, job_db),
                    sink=sink, policy=GroupingPolicy(level="study", timeout_s=3.0),
                    clock=lambda: time.time() + 100.0, lease_s=LEASE_S)
    a.start()
    try:
        first, second = _study()
        _acked(a, tmp_path, first)
        assert wait_for(lambda: len(a.jobs.groups(OPEN)) == 1
                        and len(a.jobs.members(a.jobs.groups(OPEN)[0].key)) == 2)
        key = a.jobs.groups(OPEN)[0].key
        b.start()  # its scan claims the group A holds open in memory
        assert wait_for(lambda: (g := a.jobs.group(key)) is not None and g.state != OPEN)
        _acked(a, tmp_path, second)
        assert wait_for(lambda: len(sink.accepted) == 2 and a.depth == b.depth == 0,
                        timeout=20)
        time.sleep(LEASE_S)  # time for a wrong third hand-off to show
        assert len(sink.accepted) == 2
        assert sorted(len(g.results) for g in sink.accepted) == [2, 2]
        assert sorted(n for g in sink.accepted for n in g.job_names) == sorted(
            r.name for r in a.jobs.all())
        assert fake_a.calls + fake_b.calls == 4
        assert [(r.state, r.attempts) for r in a.jobs.all()] == [(INFERRED, 1)] * 4
        assert a.jobs.groups(OPEN) == [] and a.jobs.groups(CLOSING) == []
        assert Spool(tmp_path).pending() == []
    finally:
        _stop_all(a, b)


def test_a_closer_whose_claim_was_taken_over_mid_inference_hands_on_nothing_with_fake_triton(
    tmp_path: Path, job_db: DbTarget, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claims a group and stalls while inferring, past its lease (faked: B's take-over runs
    at A's first inference attempt); B claims the group. A's runner finishes nothing, hands
    nothing on, removes no file ("lost"); B closes it: exactly one hand-off."""
    sink, fake_a, fake_b = SharedSink(), FakeInferer(), FakeInferer()
    a, b = _worker(tmp_path, job_db, fake_a, sink), _worker(tmp_path, job_db, fake_b, sink)
    try:
        a.jobs.heartbeat(a.owner, time.time() + LEASE_S)
        first, _ = _study()
        jobs = [_spooled(a, tmp_path, ds) for ds in first]
        study_h = hashed(str(first[0].StudyInstanceUID))
        key = a.jobs.open_group("K", "study", study_h, "", [j.path.name for j in jobs])

        def group() -> Group:
            members = []
            for j in jobs:
                header = read_header(j.path)
                assert header is not None
                members.append(Member(j, header, full=False))
            return Group(key, "study", study_h, "", persisted=True, members=members)

        assert a.jobs.claim_group(key, a.owner, time.time())[0] == CLAIMED
        later = time.time() + 10 * LEASE_S
        attempt = a.jobs.attempt

        def stalled_past_the_lease(name: str, error: str | None = None) -> None:
            if not b.jobs.holds(key, b.owner):
                b.jobs.take_over(b.owner, later)
                assert [g.key for g in b.jobs.claim_due(b.owner, later)] == [key]
            attempt(name, error)

        monkeypatch.setattr(a.jobs, "attempt", stalled_past_the_lease)
        assert a.runner.close(group()) == "lost"
        assert fake_a.calls >= 1 and sink.accepted == []
        assert {r.state for r in a.jobs.all()} == {RECEIVED}  # its finish did not apply
        assert all(j.path.exists() for j in jobs)
        assert b.runner.close(group()) == "closed"
        assert len(sink.accepted) == 1 and len(sink.accepted[0].results) == 2
        assert {r.state for r in a.jobs.all()} == {INFERRED}
        closed = a.jobs.group(key)
        assert closed is not None and closed.state == CLOSED
        assert not a.jobs.close_group(key, a.owner)
        assert Spool(tmp_path).pending() == []
    finally:
        a.jobs.close()
        b.jobs.close()


def test_a_worker_told_its_lease_was_gone_drops_what_another_took_over_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """An instance group A could not hand on yet (sink refused) waits in A's memory; A stalls,
    B takes its row over (faked: take_over at a later time). A's next heartbeat finds the
    lease gone; the worker thread then drops the group (not A's any more) instead of handing
    it on, and rescans at once. Only the lease thread runs; the worker thread's step is
    called by the test."""
    a = SpoolWorker(InferenceCore(TINY_MANIFEST, FakeInferer()), Spool(tmp_path),
                    ResultStore(tmp_path), GatewayMetrics(), backoff_s=0.01,
                    jobs=JobTable(tmp_path, job_db), policy=GroupingPolicy(level="instance"),
                    lease_s=LEASE_S)
    other = JobTable(tmp_path, job_db)
    try:
        a.jobs.heartbeat(a.owner, time.time() + LEASE_S)
        job = _spooled(a, tmp_path, make_study(1, seed=60)[0])
        a.submit(job)
        header = read_header(job.path)
        assert header is not None
        group = a.groups.add(Member(job, header, full=False), 0.0)
        assert group is not None
        a.groups.defer(group, 60.0, 60.0)  # its sink said "later"
        assert [r.name for r in other.take_over("B", time.time() + 10 * LEASE_S)] == [
            job.path.name]
        a._beat.start()  # the lease thread alone: its next beat finds the lease gone
        assert wait_for(a._lease_lost.is_set)
        a._stop.set()
        a._beat.join(timeout=10)
        assert a.jobs.live_owners(time.time()) >= {a.owner}  # registered again
        a._next_scan = time.time() + 60
        a._drop_taken()  # what the worker thread does next
        assert a.groups.closing() == [] and not a.groups.holds(job.path.name)
        assert a.depth == 0 and a._next_scan <= time.time() and job.path.exists()
    finally:
        a.jobs.close()
        other.close()


def test_start_up_recovery_leaves_a_live_workers_work_alone_with_fake_triton(
    tmp_path: Path,
) -> None:
    """B starts while A is alive: A's received row and a fresh spool file without a row (A
    may be between its spool write and its insert) stay A's; an old rowless file and the row
    of a worker whose lease ended are recovered by B. SQLite only: the rule is the worker's."""
    db = DbTarget()
    table = JobTable(tmp_path, db)
    table.heartbeat("A", lease_until=time.time() + 60)
    table.heartbeat("gone", lease_until=time.time() - 1)
    spool = Spool(tmp_path)
    ds_a, ds_gone, ds_fresh, ds_old = make_study(4, seed=30)
    held = spool.put(dicom_bytes(ds_a))
    table.insert(held.name, ds_a.StudyInstanceUID, ds_a.SeriesInstanceUID, ds_a.SOPInstanceUID,
                 "dimse", owner="A")
    orphan = spool.put(dicom_bytes(ds_gone))
    table.insert(orphan.name, ds_gone.StudyInstanceUID, ds_gone.SeriesInstanceUID,
                 ds_gone.SOPInstanceUID, "dimse", owner="gone")
    fresh = spool.put(dicom_bytes(ds_fresh))  # no row yet: A's ingest in progress
    old = spool.put(dicom_bytes(ds_old))
    os.utime(old, (time.time() - 10 * LEASE_S, time.time() - 10 * LEASE_S))
    fake = FakeInferer()
    b = SpoolWorker(InferenceCore(TINY_MANIFEST, fake), spool, ResultStore(tmp_path),
                    GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp_path, db),
                    lease_s=LEASE_S)
    try:
        requeued = {job.path.name for job in b.recover()}
        assert requeued == {orphan.name, old.name}
        rows = {r.name: r for r in table.all()}
        assert rows[held.name].owner == "A" and rows[orphan.name].owner == b.owner
        assert rows[old.name].owner == b.owner and fresh.name not in rows
    finally:
        b.jobs.close()
        table.close()


def test_a_running_worker_finishes_what_a_dead_one_left_beyond_its_rows_with_fake_triton(
    tmp_path: Path,
) -> None:
    """Without a restart: a dead worker's finished instance whose hand-off it never made is
    handed on (not inferred again), and a spool file it wrote but recorded no row for is
    inferred once, by a live worker's periodic reconciliation."""
    db, sink, fake = DbTarget(), SharedSink(), FakeInferer()
    b = SpoolWorker(InferenceCore(TINY_MANIFEST, fake), Spool(tmp_path), ResultStore(tmp_path),
                    GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp_path, db), sink=sink,
                    policy=GroupingPolicy(level="instance"), lease_s=LEASE_S)
    b.start()
    try:
        table = JobTable(tmp_path, db)
        table.heartbeat("gone", lease_until=time.time() + LEASE_S)  # alive, then killed
        finished, rowless = make_study(2, seed=40)
        spool = Spool(tmp_path)
        done = spool.put(dicom_bytes(finished))
        table.insert(done.name, finished.StudyInstanceUID, finished.SeriesInstanceUID,
                     finished.SOPInstanceUID, "dimse", owner="gone")
        ResultStore(tmp_path).save(str(finished.StudyInstanceUID),
                                   str(finished.SOPInstanceUID),
                                   {"study_instance_uid": str(finished.StudyInstanceUID),
                                    "sop_instance_uid": str(finished.SOPInstanceUID),
                                    "findings": []}, job=done.name)
        assert table.finish(done.name, INFERRED)  # killed before its hand-off
        orphan = spool.put(dicom_bytes(rowless))  # killed before its row
        assert wait_for(lambda: len(sink.accepted) == 2 and not spool.pending(), timeout=30)
        assert sorted(g.job_names[0] for g in sink.accepted) == sorted([done.name, orphan.name])
        assert fake.calls == 1  # the finished one was not inferred again
        table.close()
    finally:
        _stop_all(b)


def test_an_instance_another_worker_recovered_during_its_insert_is_not_queued_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ingest's row insert stalled past a lease and another worker took the rowless
    file up meanwhile (faked: its row appears right after the spool write): the instance is
    acknowledged (it is durable) but not queued here a second time."""
    gw = fake_gateway(tmp_path, FakeInferer(unavailable_calls=10**6))
    other = JobTable(gw.config.spool_dir)
    put = gw.spool.put

    def put_then_recovered_elsewhere(data: bytes | bytearray | memoryview) -> Path:
        path = put(data)
        assert other.insert(path.name, "", "", "", "recovered", owner="other")
        return path

    monkeypatch.setattr(gw.spool, "put", put_then_recovered_elsewhere)
    try:
        ds = make_study(1, seed=50)[0]
        path = gw.ingestor.accept(dicom_bytes(ds), ds, "rest", 0.0, 0.0)
        row = other.get(path.name)
        assert row is not None and (row.owner, row.protocol) == ("other", "recovered")
        assert gw.worker.depth == 0 and path.exists()
    finally:
        other.close()
        gw.stop()


# -- gateway replicas -----------------------------------------------------------------------

_REPLICA = """
import sys, time
from pathlib import Path
from tests.gateway.harness import fake_gateway
gw = fake_gateway(Path(sys.argv[1]), job_db=sys.argv[2], dicom_port=int(sys.argv[3]),
                  group_level="study", group_timeout_s=3.0, job_lease_s=1.0)
print("ready", flush=True)
time.sleep(600)
"""


def _c_store(port: int, instances: list[Dataset]) -> None:
    ae = AE(ae_title="MOD1")
    ae.requested_contexts = StoragePresentationContexts[:20]
    assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE")
    assert assoc.is_established
    try:
        for ds in instances:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_two_gateways_one_killed_mid_study_the_other_finishes_it_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """Two gateways (two processes, real DIMSE) on one spool and one job table (replicas on
    PostgreSQL; on SQLite, two processes of one pod): a study's first series reaches A, which
    is killed with SIGKILL; the second series reaches B, which closes the study as one group
    with A's instances in it."""
    url = job_db.url
    port_a = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _REPLICA, str(tmp_path), url, str(port_a)],
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    b = None
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        b = fake_gateway(tmp_path, job_db=url, group_level="study", group_timeout_s=3.0,
                         job_lease_s=1.0)
        first, second = _study()
        _c_store(port_a, first)  # acknowledged by A: durable in the shared spool and table
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _c_store(b.config.dicom_port, second)
        study = str(first[0].StudyInstanceUID)
        assert wait_for(lambda: b is not None and b.worker.jobs.pending(study) == 0
                        and not b.worker.jobs.groups(OPEN)
                        and not b.worker.jobs.groups(CLOSING)
                        and not Spool(tmp_path / "spool").pending(), timeout=30)
        rows = b.worker.jobs.all()
        assert len(rows) == 4 and {(r.state, r.attempts) for r in rows} == {(INFERRED, 1)}
        assert len({r.group_key for r in rows}) == 1  # one group across both replicas
        assert len(ResultStore(tmp_path / "spool").for_study(study)) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if b is not None:
            b.stop()


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://gw:s3cret@db:5432/jobs", "carries a password"),
    ("mysql://gw@db/jobs", "scheme 'mysql'"),
    ("postgresql://gw@db:5432/", "host and a database"),
    ("jobs.sqlite3", "scheme ''"),
])
def test_job_db_url_is_validated_at_start(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        GatewayConfig(model_repository=model_repository(tmp_path),
                      model_name=TINY_MANIFEST.name, triton_grpc_url="x:1",
                      spool_dir=tmp_path / "s", job_db=url)
    assert "s3cret" not in str(refused.value)


def test_password_comes_from_its_file_or_the_environment_never_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    target = DbTarget("postgresql://gw@db:5432/jobs", secret)
    target.check()
    assert target.password() == "from-file"
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert DbTarget("postgresql://gw@db:5432/jobs").password() == "from-env"
    assert target.redacted() == "postgresql://db:5432/jobs"  # no user, no password
    with pytest.raises(ValueError, match="not a file"):
        DbTarget("postgresql://gw@db:5432/jobs", tmp_path / "missing").check()


def test_an_unreachable_database_is_a_clear_error_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    url = f"postgresql://gw@127.0.0.1:{free_port()}/jobs"  # nothing listens there
    with pytest.raises(JobDbError, match="unreachable: OperationalError") as refused:
        JobTable(tmp_path, DbTarget(url))
    assert "s3cret" not in str(refused.value) and "gw@" not in str(refused.value)


def test_each_served_model_has_its_own_job_table_in_one_postgresql_database(
    tmp_path: Path, postgres: Postgres,
) -> None:
    """A gateway serving several models keeps one job table per model (one spool folder
    each): on PostgreSQL a schema each, so one model's worker never takes over another's."""
    target = DbTarget(postgres.new_database())
    default, other = JobTable(tmp_path, target), JobTable(tmp_path, target.for_model("ct-seg"))
    default.insert("a.dcm", "1.2", "1.2.3", "1.2.3.4", "dimse", owner="gone")
    assert other.take_over("me", now=time.time()) == [] and other.all() == []
    assert [r.name for r in default.take_over("me", now=time.time())] == ["a.dcm"]
    assert DbTarget().for_model("ct-seg") == DbTarget()  # SQLite: a file per model folder
    default.close()
    other.close()
