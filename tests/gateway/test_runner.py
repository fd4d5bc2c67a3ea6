"""Closing a group (processing/runner.py): a due group -> stored results with retry -> the sink,
driven directly with a fake Triton and a fake stop flag whose waits return at once (names say
so); the spool, result store and job table are real, in a tmp folder. No thread, no sleep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from starlette.testclient import TestClient

from optimizer.contract.manifest import Selection
from services.gateway.edges.rest import create_app
from services.gateway.errors import InvalidInstance
from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import CompletedGroup, GroupingPolicy
from services.gateway.processing.groups import Group, Groups, Job, Member, read_header
from services.gateway.processing.runner import MAX_BACKOFF_S, Refused, Runner
from services.gateway.store.jobdb import JobDbUnavailable
from services.gateway.store.jobs import FAILED, INFERRED, RECEIVED, SKIPPED, JobTable
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.util import dicom_bytes, make_instance, make_study

INSTANCE = GroupingPolicy(level="instance")


class FakeStop:
    """The worker's stop flag, minus the waiting: each wait is recorded and returns at once;
    ``after`` waits it becomes set (the worker stopping during an outage)."""

    def __init__(self, after: int | None = None) -> None:
        self.waits: list[float] = []
        self.after = after

    def is_set(self) -> bool:
        return self.after is not None and len(self.waits) >= self.after

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return self.is_set()


class Sink:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.accepted: list[CompletedGroup] = []

    def accept(self, group: CompletedGroup) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("outbox full (simulated)")
        assert all(p.exists() for p in group.sources)  # valid until accept returned
        self.accepted.append(group)


class Bench:
    """A runner over a tmp folder, and the instances it is given to close."""

    def __init__(self, tmp: Path, fake: FakeInferer, policy: GroupingPolicy = INSTANCE,
                 sink: Sink | None = None, stop: FakeStop | None = None,
                 backoff_s: float = 0.5) -> None:
        self.tmp, self.fake, self.policy = tmp, fake, policy
        self.spool, self.results, self.jobs = Spool(tmp), ResultStore(tmp), JobTable(tmp)
        self.metrics, self.stop = GatewayMetrics(), stop or FakeStop()
        self.runner = Runner(InferenceCore(TINY_MANIFEST, fake), self.spool, self.results,
                             self.jobs, self.metrics, policy, sink, backoff_s, self.stop)
        self.clock = 0.0
        self.groups = Groups(policy, lambda: self.clock)

    def acked(self, ds: Dataset, protocol: str = "dimse") -> Member:
        """Spooled and recorded as the ingest path does; the header, as grouping reads it."""
        path = self.spool.put(dicom_bytes(ds))
        self.jobs.insert(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                         ds.SOPInstanceUID, protocol, "MOD1")
        header = read_header(path)
        assert header is not None
        return Member(Job(path=path, protocol=protocol), header, full=False)

    def group(self, *datasets: Dataset) -> Group:
        """The group these instances form once it is due (one group)."""
        for ds in datasets:
            ready = self.groups.add(self.acked(ds), acked=self.clock)
            if ready is not None:
                return ready
        self.groups.joins_recorded()
        self.clock += self.policy.timeout_s
        [group] = list(self.groups.due())
        return group

    def state(self, name: str) -> tuple[str, int, str | None]:
        row = self.jobs.get(name)
        assert row is not None
        return row.state, row.attempts, row.error

    def counter(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def test_unavailable_triton_is_retried_with_doubling_backoff_then_stored_with_fake_triton(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path, FakeInferer(unavailable_calls=2))
    ds = make_instance(0)
    group = bench.group(ds)
    [member] = group.members
    assert bench.runner.close(group) == "closed"
    assert bench.stop.waits == [0.5, 1.0]  # doubling from backoff_s, no real sleep
    assert bench.state(member.name) == (INFERRED, 3, None)  # every attempt counted
    doc = bench.results.stored(uid_hash(ds.StudyInstanceUID), uid_hash(ds.SOPInstanceUID))
    assert doc is not None and doc[ResultStore.JOB_KEY] == member.name
    assert "error" not in doc and doc["sop_instance_uid"] == ds.SOPInstanceUID
    assert bench.spool.pending() == []  # released after the result and the row


def test_backoff_is_capped_with_fake_triton(tmp_path: Path) -> None:
    bench = Bench(tmp_path, FakeInferer(unavailable_calls=6), backoff_s=1.0)
    assert bench.runner.close(bench.group(make_instance(0))) == "closed"
    assert bench.stop.waits == [1.0, 2.0, 4.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_stopping_during_an_outage_leaves_the_item_for_recovery_with_fake_triton(
    tmp_path: Path,
) -> None:
    sink = Sink()
    bench = Bench(tmp_path, FakeInferer(unavailable_calls=100), sink=sink,
                  stop=FakeStop(after=2))
    ds = make_instance(0)
    group = bench.group(ds)
    assert bench.runner.close(group) == "stopping"
    name = group.members[0].name
    assert bench.state(name)[0] == RECEIVED and bench.state(name)[2] == "triton_unavailable"
    assert bench.spool.pending() == [group.members[0].job.path]  # nothing released
    assert bench.results.stored(uid_hash(ds.StudyInstanceUID),
                                uid_hash(ds.SOPInstanceUID)) is None
    assert sink.accepted == []


def test_a_permanent_failure_stores_an_error_result_and_hands_it_on_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(), Sink()
    fake.fail_permanently = True
    bench = Bench(tmp_path, fake, sink=sink)
    ds = make_instance(0)
    group = bench.group(ds)
    assert bench.runner.close(group) == "closed"
    assert bench.state(group.members[0].name) == (FAILED, 1, "triton_error")
    [handed] = sink.accepted
    [result] = handed.results
    assert result["error"]["reason"] == "triton_error" and ResultStore.JOB_KEY not in result
    assert bench.counter("bedside_gateway_requests_total",
                         {"protocol": "dimse", "outcome": "failed", "reason": "triton_error"}) == 1
    assert bench.spool.pending() == []


def test_a_result_stored_before_a_restart_finishes_the_job_without_inferring_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake = FakeInferer()
    bench = Bench(tmp_path, fake)
    ds = make_instance(0)
    group = bench.group(ds)
    name = group.members[0].name
    bench.results.save(ds.StudyInstanceUID, ds.SOPInstanceUID, {"predictions": []}, job=name)
    assert bench.runner.close(group) == "closed"
    assert fake.calls == 0 and bench.state(name)[0] == INFERRED


def test_a_direct_rest_result_between_save_and_hand_off_keeps_the_jobs_delivery_with_fake_triton(
    tmp_path: Path,
) -> None:
    """The same instance inferred directly over REST (the real edge, in-process, over the same
    result store) just after the worker saved its job's result: the group still hands on the
    job's result, and the study reads back one result for the instance."""
    fake, sink = FakeInferer(), Sink()
    bench = Bench(tmp_path, fake, sink=sink)
    ds = make_instance(0)
    group = bench.group(ds)
    name = group.members[0].name
    app = create_app(InferenceCore(TINY_MANIFEST, FakeInferer()), bench.results,
                     GatewayMetrics(), lambda: True, max_request_bytes=512 * 1024)
    direct: list[int] = []
    save = bench.results.save

    def save_then_direct_infer(study: str, sop: str, result: dict[str, Any],
                               job: str | None = None) -> None:
        save(study, sop, result, job)
        if job is not None and not direct:  # the worker's save; now the REST caller's
            with TestClient(app) as client:
                direct.append(client.post("/v1/infer", content=dicom_bytes(ds), headers={
                    "Content-Type": "application/dicom"}).status_code)

    bench.results.save = save_then_direct_infer  # type: ignore[method-assign]
    assert bench.runner.close(group) == "closed"
    assert direct == [200]
    [handed] = sink.accepted
    [result] = handed.results
    assert result["sop_instance_uid"] == ds.SOPInstanceUID and "error" not in result
    assert handed.job_names == (name,) and bench.state(name)[0] == INFERRED
    doc = bench.results.stored(uid_hash(ds.StudyInstanceUID), uid_hash(ds.SOPInstanceUID))
    assert doc is not None and doc[ResultStore.JOB_KEY] == name
    [read_back] = bench.results.for_study(ds.StudyInstanceUID)
    assert read_back["sop_instance_uid"] == ds.SOPInstanceUID


def test_a_refused_hand_off_keeps_results_and_files_and_is_not_inferred_again_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(), Sink(failures=1)
    bench = Bench(tmp_path, fake, sink=sink)
    group = bench.group(make_instance(0))
    name, path = group.members[0].name, group.members[0].job.path
    assert bench.runner.close(group) == Refused("OSError")
    assert bench.state(name)[0] == INFERRED and path.exists() and sink.accepted == []
    assert bench.counter("bedside_gateway_group_sink_errors_total", {"level": "instance"}) == 1
    assert bench.runner.close(group) == "closed"  # the worker's retry
    assert fake.calls == 1 and len(sink.accepted) == 1 and not path.exists()
    assert sink.accepted[0].job_names == (name,) and sink.accepted[0].calling_aets == ("MOD1",)


def test_a_series_left_out_by_the_rules_is_skipped_not_inferred_nor_handed_on_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(), Sink()
    policy = GroupingPolicy(level="series", timeout_s=30.0,
                            selection=Selection(min_instances=3))
    bench = Bench(tmp_path, fake, policy, sink)
    study = make_study(2)
    group = bench.group(*study)
    assert bench.runner.close(group) == "closed"
    assert fake.calls == 0 and sink.accepted == []  # a skipped series is not a result
    assert {bench.state(m.name)[::2] for m in group.members} == {
        (SKIPPED, "not_selected_min_instances")}
    doc = bench.results.stored(uid_hash(study[0].StudyInstanceUID),
                               uid_hash(study[0].SeriesInstanceUID))
    assert doc is not None and doc["skipped"]["reason"] == "not_selected_min_instances"
    assert doc[ResultStore.JOB_KEY] == group.key
    assert bench.counter("bedside_gateway_groups_closed_total",
                         {"level": "series", "outcome": "skipped"}) == 1


def test_a_series_group_hands_on_its_results_in_slice_order_with_fake_triton(
    tmp_path: Path,
) -> None:
    sink = Sink()
    policy = GroupingPolicy(level="series", timeout_s=30.0)
    bench = Bench(tmp_path, FakeInferer(), policy, sink)
    study = make_study(3)
    for k, ds in enumerate(study):
        ds.InstanceNumber = 3 - k  # arrival order is the reverse of slice order
    assert bench.runner.close(bench.group(*study)) == "closed"
    [handed] = sink.accepted
    assert [r["sop_instance_uid"] for r in handed.results] == [
        ds.SOPInstanceUID for ds in reversed(study)]
    assert bench.spool.pending() == []


def test_an_unidentifiable_file_is_quarantined_and_an_identified_one_gets_an_error_result(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path, FakeInferer())
    damaged = bench.spool.put(b"not DICOM")
    bench.runner.give_up(Job(path=damaged, protocol="stow"), None,
                         InvalidInstance("unreadable DICOM file", "unreadable"))
    assert not damaged.exists() and (tmp_path / "failed" / damaged.name).exists()
    assert bench.state(damaged.name)[::2] == (FAILED, "unreadable")

    ds = make_instance(1)
    member = bench.acked(ds)
    bench.runner.give_up(member.job, ds, InvalidInstance("bad pixels", "bad_pixels"))
    assert not member.job.path.exists()
    doc = bench.results.stored(uid_hash(ds.StudyInstanceUID), uid_hash(ds.SOPInstanceUID))
    assert doc is not None and doc["error"]["reason"] == "bad_pixels"


@pytest.mark.parametrize("sink", [None, Sink()])
def test_a_bug_while_closing_quarantines_and_closes_the_group_with_fake_triton(
    tmp_path: Path, sink: Sink | None,
) -> None:
    fake = FakeInferer()
    fake.crash_next = True  # a RuntimeError from inside inference: no GatewayError
    bench = Bench(tmp_path, fake, sink=sink)
    ds = make_instance(0)
    group = bench.group(ds)
    assert bench.runner.close(group) == "closed"  # nothing escapes
    name = group.members[0].name
    assert bench.state(name)[::2] == (FAILED, "internal")
    assert bench.spool.pending() == [] and (tmp_path / "failed" / name).exists()  # kept
    assert bench.results.stored(uid_hash(ds.StudyInstanceUID),
                                uid_hash(ds.SOPInstanceUID)) is None
    assert sink is None or sink.accepted == []


def test_a_job_table_that_does_not_answer_keeps_the_group_for_later_with_fake_triton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table fails "unavailable" as the inferred instance is finished (a database restart,
    faked here): the group is kept (Refused), not quarantined; closed again, the stored result
    finishes the job without a second inference."""
    bench = Bench(tmp_path, FakeInferer(), sink=Sink())
    member = bench.acked(make_instance(5))
    group = bench.groups.add(member, acked=0.0)
    assert group is not None
    real = bench.jobs.finish_many

    def unavailable(*args: object, **kwargs: object) -> int:
        raise JobDbUnavailable("job table: SQLITE_BUSY")

    monkeypatch.setattr(bench.jobs, "finish_many", unavailable)
    assert bench.runner.close(group) == Refused("job_table_unavailable")
    assert member.job.path.exists() and bench.state(member.name)[0] == RECEIVED
    monkeypatch.setattr(bench.jobs, "finish_many", real)
    assert bench.runner.close(group) == "closed"
    assert bench.fake.calls == 1 and bench.state(member.name)[0] == INFERRED
    assert not member.job.path.exists()
