"""Results delivery: the outbox (durable, idempotent), the retry / backoff / dead-letter state
machine, per-route de-identification and the sender threads, with fake destinations (tests
whose name says so). The real C-STORE and STOW-RS peers are in
tests/integration/test_delivery_peers.py."""

from __future__ import annotations

import io
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from services.gateway.delivery.destinations import (
    dimse_status_class,
    failed_reasons,
    http_status_class,
)
from services.gateway.delivery.outbox import CLAIM_S, DEAD, DELIVERED, PENDING, NewRow, Outbox
from services.gateway.delivery.routing import (
    DimseDestination,
    Retry,
    Route,
    RoutesConfig,
    StowDestination,
)
from services.gateway.delivery.service import DeliveryService
from services.gateway.errors import DeliveryFailed, DeliveryRejected
from services.gateway.metrics import GatewayMetrics
from services.gateway.security.deid import Deidentifier, UidMap
from services.gateway.store.durable import SHARED_VOLUME, WAL
from tests.gateway.groups import (
    CLASSIFIER,
    PHI,
    SEGMENTER,
    RecordingSender,
    make_group,
    study_with_phi,
)
from tests.gateway.util import make_study

SECRET = b"delivery-test-secret-0123456789"
RETRY = Retry(base_s=2.0, cap_s=10.0, max_attempts=5, max_age_s=0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def routes(retry: Retry = RETRY, deidentify_research: bool = True) -> RoutesConfig:
    return RoutesConfig(
        destinations={
            "pacs": DimseDestination(name="pacs", host="127.0.0.1", port=104,
                                     called_aet="PACS", retry=retry),
            "research": StowDestination(name="research", url="http://127.0.0.1:1/studies",
                                        retry=retry),
        },
        routes=(Route(name="ct", calling_aets=("CT1",), destinations=("pacs",)),
                Route(name="web", protocols=("stow",), destinations=("research",),
                      deidentify=deidentify_research),
                Route(name="fallback", default=True, destinations=("pacs", "research"))),
        deid_secret=SECRET)


class Harness:
    def __init__(self, spool: Path, config: RoutesConfig, manifest=CLASSIFIER) -> None:  # type: ignore[no-untyped-def]
        self.spool = spool
        self.config = config
        self.manifest = manifest
        self.clock = Clock()
        self.marked: list[tuple[str, ...]] = []
        self.senders = {name: RecordingSender(name) for name in config.destinations}
        self.metrics = GatewayMetrics()
        self.service = self.make()

    def make(self) -> DeliveryService:
        return DeliveryService(self.config, self.spool, self.manifest, self.metrics,
                               mark_delivered=lambda names: self.marked.append(tuple(names)),
                               senders=self.senders, clock=self.clock, poll_s=0.05)

    def attempt_due(self, destination: str) -> None:
        row = self.service.outbox.due(destination, self.clock.now)
        assert row is not None, f"nothing due for {destination}"
        self.service.attempt(row)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture()
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "spool", routes())
    yield h
    h.service.stop()


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_accept_writes_sr_rows_and_fake_destination_receives_it(harness: Harness,
                                                                 tmp_path: Path) -> None:
    sources = make_study(2)
    group = make_group(tmp_path / "g", sources)
    harness.service.accept(group)
    (row,) = harness.service.outbox.rows()
    assert (row.destination, row.route, row.state, row.attempts) == ("pacs", "ct", PENDING, 0)
    assert len(row.files) == 2  # one SR per instance result
    for name in row.files:  # durable files, not temporaries
        assert (harness.service.outbox.folder / row.folder / name).is_file()
    assert harness.metric("bedside_gateway_outbox_depth", destination="pacs") == 1

    harness.attempt_due("pacs")
    assert harness.service.outbox.get(row.id).state == DELIVERED  # type: ignore[union-attr]
    assert harness.marked == [group.job_names]
    srs = [_read(b) for b in harness.senders["pacs"].received]
    assert [sr.SOPClassUID for sr in srs] == ["1.2.840.10008.5.1.4.1.1.88.33"] * 2
    assert {sr.StudyInstanceUID for sr in srs} == {sources[0].StudyInstanceUID}
    assert len({sr.SeriesInstanceUID for sr in srs}) == 1  # results of a group share a series
    refs = {sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for sr in srs}
    assert refs == {ds.SOPInstanceUID for ds in sources}  # each SR names its own instance
    assert harness.metric("bedside_gateway_deliveries_total", destination="pacs",
                          outcome="delivered") == 1
    assert harness.metric("bedside_gateway_outbox_depth", destination="pacs") == 0
    assert harness.metric("bedside_gateway_stage_seconds_count", model="tiny-cxr",
                          protocol="dimse", stage="deliver") == 1


def test_accept_is_idempotent_per_group_and_destination_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    group = make_group(tmp_path / "g", make_study(1))
    harness.service.accept(group)
    harness.service.accept(group)  # the worker offers it again after a crash
    assert len(harness.service.outbox.rows()) == 1
    harness.attempt_due("pacs")
    harness.service.accept(group)
    assert len(harness.service.outbox.rows()) == 1
    assert harness.senders["pacs"].calls == 1


def test_routes_pick_destinations_by_calling_aet_protocol_and_default_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    study = make_study(1)
    by_aet = make_group(tmp_path / "a", study, protocols=("dimse",), calling_aets=("CT1",))
    by_protocol = make_group(tmp_path / "b", study, protocols=("stow",), calling_aets=())
    other = make_group(tmp_path / "c", study, protocols=("dimse",), calling_aets=("MR9",))
    for group in (by_aet, by_protocol, other):
        harness.service.accept(group)
    found = {(r.group_key, r.destination, r.route) for r in harness.service.outbox.rows()}
    assert found == {(by_aet.key, "pacs", "ct"), (by_protocol.key, "research", "web"),
                     (other.key, "pacs", "fallback"), (other.key, "research", "fallback")}


def test_transient_failures_back_off_exponentially_then_deliver_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    sender = harness.senders["pacs"]
    sender.script = [DeliveryFailed("down", "connection_failed")] * 4
    group = make_group(tmp_path / "g", make_study(1))
    harness.service.accept(group)
    waits = []
    for attempt in range(1, 5):
        before = harness.clock.now
        harness.attempt_due("pacs")
        (row,) = harness.service.outbox.rows()
        assert (row.state, row.attempts, row.reason) == (PENDING, attempt, "connection_failed")
        waits.append(row.next_at - before)
        assert harness.service.outbox.due("pacs", harness.clock.now) is None  # not yet due
        harness.clock.now = row.next_at
    assert waits == [2.0, 4.0, 8.0, 10.0]  # base 2 s doubling, capped at 10 s
    assert harness.marked == []
    harness.attempt_due("pacs")
    (row,) = harness.service.outbox.rows()
    assert (row.state, row.attempts) == (DELIVERED, 5)
    assert harness.marked == [group.job_names]
    assert harness.metric("bedside_gateway_deliveries_total", destination="pacs",
                          outcome="retry") == 4


def test_retry_after_from_the_destination_is_honoured_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    busy = DeliveryFailed("busy", "http_503")
    busy.retry_after_s = 7.0  # type: ignore[attr-defined]
    harness.senders["research"].script = [busy]
    harness.service.accept(make_group(tmp_path / "g", make_study(1), protocols=("stow",),
                                      calling_aets=()))
    start = harness.clock.now
    harness.attempt_due("research")
    (row,) = harness.service.outbox.rows()
    assert row.next_at - start == 7.0  # more than the 2 s backoff, less than the cap


def test_permanent_refusal_goes_straight_to_dead_letter_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    harness.senders["pacs"].script = [DeliveryRejected("refused 0xA900", "status_a900")]
    group = make_group(tmp_path / "g", make_study(1))
    harness.service.accept(group)
    harness.attempt_due("pacs")
    (row,) = harness.service.outbox.rows()
    assert (row.state, row.attempts, row.reason) == (DEAD, 1, "status_a900")
    assert "0xA900" in (row.message or "")
    assert all((harness.service.outbox.folder / row.folder / f).is_file() for f in row.files)
    assert harness.marked == []  # never marked delivered
    assert harness.metric("bedside_gateway_dead_letters", destination="pacs") == 1
    harness.clock.now += 1e6
    assert harness.service.outbox.due("pacs", harness.clock.now) is None  # never retried


def test_max_attempts_ends_in_dead_letter_with_fake_destination(harness: Harness,
                                                                tmp_path: Path) -> None:
    harness.senders["pacs"].script = [DeliveryFailed("down", "association_rejected")] * 10
    harness.service.accept(make_group(tmp_path / "g", make_study(1)))
    for _ in range(5):
        harness.attempt_due("pacs")
        harness.clock.now += 60
    (row,) = harness.service.outbox.rows()
    assert (row.state, row.attempts, row.reason) == (DEAD, 5, "association_rejected")
    assert "gave up after 5 attempt(s)" in (row.message or "")
    assert harness.senders["pacs"].calls == 5


def test_max_age_ends_in_dead_letter_with_fake_destination(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes(Retry(base_s=1, cap_s=1, max_attempts=0,
                                                 max_age_s=30)))
    try:
        h.senders["pacs"].script = [DeliveryFailed("down", "no_response")] * 100
        h.service.accept(make_group(tmp_path / "g", make_study(1)))
        h.attempt_due("pacs")
        h.clock.now += 29
        h.attempt_due("pacs")
        assert h.service.outbox.rows()[0].state == PENDING
        h.clock.now += 1
        h.attempt_due("pacs")
        assert (h.service.outbox.rows()[0].state, h.service.outbox.rows()[0].attempts) == (DEAD,
                                                                                           3)
    finally:
        h.service.stop()


def test_files_already_stored_are_not_sent_again_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    sender = harness.senders["pacs"]
    sender.store_first_then = DeliveryFailed("aborted", "no_response")
    harness.service.accept(make_group(tmp_path / "g", make_study(3)))
    harness.attempt_due("pacs")
    (row,) = harness.service.outbox.rows()
    assert row.stored == (row.files[0],) and row.state == PENDING
    harness.clock.now = row.next_at
    harness.attempt_due("pacs")
    assert len(sender.received) == 3  # 1 + the 2 left, not 1 + 3
    assert len({_read(b).SOPInstanceUID for b in sender.received}) == 3


def test_result_build_failure_is_dead_lettered_not_dropped(harness: Harness,
                                                            tmp_path: Path) -> None:
    group = make_group(tmp_path / "g", make_study(1))
    group.results[0]["findings"] = []  # lacks the manifest's labels
    harness.service.accept(group)
    (row,) = harness.service.outbox.rows()
    assert (row.state, row.reason, row.files) == (DEAD, "result_findings", ())


def test_group_where_every_item_failed_records_nothing(harness: Harness,
                                                       tmp_path: Path) -> None:
    harness.service.accept(make_group(tmp_path / "g", make_study(2), errors=(0, 1)))
    assert harness.service.outbox.rows() == []


def test_segmentation_group_becomes_a_seg_per_map_with_fake_destination(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes(), manifest=SEGMENTER)
    try:
        sources = make_study(2)
        h.service.accept(make_group(tmp_path / "g", sources, manifest=SEGMENTER,
                                    errors=(0,)))
        h.attempt_due("pacs")
        (seg,) = [_read(b) for b in h.senders["pacs"].received]
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
            .ReferencedSOPInstanceUID == sources[1].SOPInstanceUID
        assert (seg.Rows, seg.Columns) == (sources[1].Rows, sources[1].Columns)
    finally:
        h.service.stop()


def test_deidentifying_route_sends_no_phi_and_results_reidentify_with_fake_destination(
        harness: Harness, tmp_path: Path) -> None:
    sources = study_with_phi(2)
    harness.service.accept(make_group(tmp_path / "g", sources, protocols=("stow",),
                                      calling_aets=()))
    harness.attempt_due("research")
    received = harness.senders["research"].received
    assert len(received) == 2
    for data in received:
        for value in [*PHI.values(), sources[0].StudyInstanceUID,
                      sources[0].SeriesInstanceUID, *(ds.SOPInstanceUID for ds in sources)]:
            assert value.encode() not in data, "identifying value or original UID sent"
        sr = _read(data)
        assert sr.PatientIdentityRemoved == "YES"
        assert sr.StudyInstanceUID.startswith("2.25.")

    # The same study through the same secret maps to the same replacement (consistent), and
    # the result re-identifies to the original study, series and instances.
    deid = Deidentifier(UidMap(tmp_path / "spool" / "deid_uids.sqlite3", SECRET))
    by_sop = {ds.SOPInstanceUID: ds for ds in sources}
    back_refs = set()
    for data in received:
        back = deid.reidentify(_read(data), sources[0])
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        assert back.PatientName == PHI["PatientName"]
        assert "PatientIdentityRemoved" not in back
        evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
        series = evidence.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
        back_refs.add(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert back_refs == set(by_sop)


def test_route_without_deidentification_keeps_identity_with_fake_destination(
        tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes(deidentify_research=False))
    try:
        sources = study_with_phi(1)
        h.service.accept(make_group(tmp_path / "g", sources, protocols=("stow",),
                                    calling_aets=()))
        h.attempt_due("research")
        sr = _read(h.senders["research"].received[0])
        assert sr.PatientName == PHI["PatientName"]
        assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
        assert "PatientIdentityRemoved" not in sr
    finally:
        h.service.stop()


def test_sender_threads_deliver_and_a_restart_resumes_pending_rows_with_fake_destination(
        tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes(Retry(base_s=0.05, cap_s=0.05, max_attempts=100,
                                                 max_age_s=0)))
    h.clock = time.time  # type: ignore[assignment]  # real time: the threads run
    h.service.stop()
    h.senders["pacs"].script = [DeliveryFailed("down", "connection_failed")] * 1000
    h.service = h.make()
    group = make_group(tmp_path / "g", make_study(1))
    h.service.start()
    h.service.accept(group)
    deadline = time.monotonic() + 10
    while h.service.outbox.rows()[0].attempts < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    h.service.stop()  # the gateway stops while the destination is down
    row = Outbox(tmp_path / "spool").rows()[0]
    assert row.state == PENDING and row.attempts >= 2

    h.senders["pacs"].script = []  # the destination is back
    h.service = h.make()
    h.service.start()
    deadline = time.monotonic() + 10
    while h.marked == [] and time.monotonic() < deadline:
        time.sleep(0.02)
    h.service.stop()
    assert h.marked == [group.job_names]
    assert Outbox(tmp_path / "spool").rows()[0].state == DELIVERED
    assert len(h.senders["pacs"].received) == 1


def test_jobs_are_marked_at_restart_when_the_mark_was_lost(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes())
    group = make_group(tmp_path / "g", make_study(1))
    h.service.accept(group)

    def lost(names: object) -> None:
        raise RuntimeError("job table closed")

    h.service._mark = lost  # the mark fails (crash between the two)
    h.attempt_due("pacs")
    h.service.stop()
    h.service = h.make()
    h.service.start()
    h.service.stop()
    assert h.marked == [group.job_names]


def test_dimse_statuses_and_http_codes_classify_as_the_standard_says() -> None:
    assert [dimse_status_class(s) for s in (0x0000, 0xB000, 0xB007, 0x0111)] == ["stored"] * 4
    assert [dimse_status_class(s) for s in (0xA700, 0xA7FF, 0x0110, 0x0213)] == ["retry"] * 4
    assert [dimse_status_class(s) for s in (0xA900, 0xC000, 0x0122, 0x0117)] == ["refused"] * 4
    assert [http_status_class(c) for c in (200, 202)] == ["stored"] * 2
    assert [http_status_class(c) for c in (500, 503, 429, 408)] == ["retry"] * 4
    assert [http_status_class(c) for c in (400, 409, 415, 404)] == ["refused"] * 4
    body = (b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [43264]}}'
            b']}}')
    assert failed_reasons(body) == [0xA900]
    assert failed_reasons(b'{"00081199": {"vr": "SQ", "Value": []}}') == []
    assert failed_reasons(b"not json") == []


def test_bedside_outbox_lists_and_requeues_dead_letters_with_fake_destination(
        harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    harness.senders["pacs"].script = [DeliveryRejected("refused 0xA900", "status_a900")]
    harness.service.accept(make_group(tmp_path / "g", make_study(1)))
    unbuildable = make_group(tmp_path / "h", make_study(1))
    unbuildable.results[0]["findings"] = []
    harness.service.accept(unbuildable)
    harness.attempt_due("pacs")
    spool = str(tmp_path / "spool")
    assert main(["outbox", "--spool", spool, "list", "--state", "dead"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and "status_a900" in listed[1] and "result_findings" in listed[2]

    assert main(["outbox", "--spool", spool, "requeue", "--destination", "pacs"]) == 0
    assert "requeued 1 row(s)" in capsys.readouterr().out  # the unbuildable one stays dead
    first, second = harness.service.outbox.rows()
    assert (first.state, first.attempts, second.state) == (PENDING, 0, DEAD)
    harness.clock.now = time.time()  # the command stamps rows with the real time
    harness.attempt_due("pacs")  # the destination was fixed
    assert harness.service.outbox.rows()[0].state == DELIVERED
    assert main(["outbox", "--spool", str(tmp_path / "nowhere"), "list"]) == 2


def test_a_failing_destination_is_held_off_not_tried_row_after_row_with_fake_destination(
        tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", routes(Retry(base_s=0.4, cap_s=0.4, max_attempts=100,
                                                 max_age_s=0)))
    h.clock = time.time  # type: ignore[assignment]  # real time: the threads run
    h.service.stop()
    h.service = h.make()
    h.senders["pacs"].script = [DeliveryFailed("down", "association_failed")]
    for k in range(3):
        h.service.accept(make_group(tmp_path / f"g{k}", make_study(1, seed=k)))
    h.service.start()
    try:
        time.sleep(0.25)  # well inside the hold after the first failure
        assert h.senders["pacs"].calls == 1  # not one connection attempt per row
        deadline = time.monotonic() + 10
        while h.service.outbox.count(DELIVERED) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h.service.outbox.count(DELIVERED) == 3
        assert h.senders["pacs"].calls == 4  # 1 failure, then each row once
    finally:
        h.service.stop()


def test_processes_sharing_an_outbox_never_claim_one_row_together(tmp_path: Path) -> None:
    """Two connections to one outbox, as two gateway processes (or replicas) have: a row one
    claimed for sending is not due for the other until the claim runs out."""
    first, second = Outbox(tmp_path), Outbox(tmp_path)
    first.add("g1", "default", "dimse", ["j1"], [NewRow("pacs", ())])
    now = time.time()
    row = first.claim("pacs", now)
    assert row is not None and row.group_key == "g1"
    assert second.claim("pacs", now) is None and first.claim("pacs", now + 1) is None
    again = second.claim("pacs", now + CLAIM_S + 1)  # the claimer died: due again
    assert again is not None and again.id == row.id
    second.delivered(again.id, 1)
    assert first.claim("pacs", now + 10 * CLAIM_S) is None


def test_a_claim_of_a_killed_process_of_this_host_is_released_at_start(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.add("g1", "default", "dimse", ["j1"], [NewRow("pacs", ())])
    assert outbox.claim("pacs", time.time()) is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer runs
    with outbox._tx() as db:  # the claim made by that process, as if it were killed mid-send
        db.execute("UPDATE outbox SET claimed_by = ?", (f"{socket.gethostname()}-{gone.pid}",))
    outbox.close()
    assert Outbox(tmp_path).claim("pacs", time.time()) is not None  # due again at once
    still = Outbox(tmp_path)  # a claim of a live process (this one) is kept
    assert still.claim("pacs", time.time()) is None


@pytest.mark.parametrize("journal", [WAL, SHARED_VOLUME])
def test_outbox_and_reverse_map_journal_follow_the_spool_sharing(tmp_path: Path,
                                                                   journal: str) -> None:
    """Replicas on several hosts share the spool: the outbox and the reverse UID map then use
    SQLite's rollback journal (WAL's shared memory exists only within one host)."""
    service = DeliveryService(routes(), tmp_path, CLASSIFIER, GatewayMetrics(),
                              senders={"pacs": RecordingSender("pacs"),
                                       "research": RecordingSender("research")},
                              journal=journal)
    try:
        for path in (tmp_path / Outbox.FILE, tmp_path / "deid_uids.sqlite3"):
            db = sqlite3.connect(path)
            try:
                assert db.execute("PRAGMA journal_mode").fetchone()[0] == journal
            finally:
                db.close()
    finally:
        service.outbox.close()
