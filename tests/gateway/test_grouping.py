"""Study/series grouping, series selection, per-series inference and the group sink, at unit
level with a fake Triton (names say so); the gateway-level test runs real sockets."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Grouping, Manifest, Selection
from optimizer.contract.series import not_selected, orientation, slice_order
from services.cli import _parser
from services.commands.gateway import config_from_args
from services.errors import ConfigError
from services.gateway.config import DbTarget
from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import CompletedGroup, GroupingPolicy
from services.gateway.processing.worker import Job, SpoolWorker
from services.gateway.store.jobs import CLOSED, INFERRED, OPEN, RECEIVED, SKIPPED, JobTable
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway, model_repository, wait_for
from tests.gateway.util import dicom_bytes, make_instance, make_study

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


class RecordingFake(FakeInferer):
    """The fake Triton, also keeping each batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[np.ndarray] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        return super().infer(batch)


class FlakySink:
    """A sink that raises ``failures`` times, then records every group it accepts."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.accepted: list[CompletedGroup] = []

    def accept(self, group: CompletedGroup) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise OSError("outbox not writable (simulated)")
        assert all(p.exists() for p in group.sources)  # valid until accept returned
        self.accepted.append(group)


def _worker(tmp: Path, fake: FakeInferer, policy: GroupingPolicy,
            sink: FlakySink | None = None, manifest: Manifest = TINY_MANIFEST,
            retention_s: float = 7 * 86400.0, db: DbTarget | None = None) -> SpoolWorker:
    """``db``: the job table's backend (tests taking ``job_db`` run on SQLite and PostgreSQL)."""
    return SpoolWorker(InferenceCore(manifest, fake), Spool(tmp), ResultStore(tmp),
                       GatewayMetrics(), backoff_s=0.01, sink=sink, policy=policy,
                       retention_s=retention_s, jobs=JobTable(tmp, db))


def _acked(tmp: Path, ds: Dataset, protocol: str = "dimse", aet: str | None = "MOD1",
           db: DbTarget | None = None) -> Job:
    """Spooled and recorded as the ingest path does."""
    path = Spool(tmp).put(dicom_bytes(ds))
    table = JobTable(tmp, db)
    table.insert(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                 protocol, aet)
    table.close()
    return Job(path=path, protocol=protocol, calling_aet=aet)


def _series(n: int, seed: int = 0, study: str | None = None) -> list[Dataset]:
    out = make_study(n, seed)
    for k, ds in enumerate(out):
        ds.StudyInstanceUID = study or ds.StudyInstanceUID
        ds.ImageOrientationPatient = AXIAL
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 * k]
        ds.InstanceNumber = k + 1
    return out


SERIES = GroupingPolicy(level="series", timeout_s=0.2)


def test_series_group_closes_after_inactivity_and_hands_on_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    fake, sink = FakeInferer(), FlakySink()
    worker = _worker(tmp_path, fake, SERIES, sink, db=job_db)
    instances = _series(3)
    worker.start()
    jobs = [_acked(tmp_path, ds, db=job_db) for ds in instances]
    try:
        for job in jobs:
            worker.submit(job)
        assert wait_for(lambda: len(worker.jobs.groups(OPEN)) == 1 and len(
            worker.jobs.members(worker.jobs.groups(OPEN)[0].key)) == 3)
        assert fake.calls == 0 and worker.jobs.count(RECEIVED) == 3  # open: not inferred yet
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    assert fake.calls == 3 and worker.jobs.count(INFERRED) == 3
    [group] = sink.accepted
    assert (group.level, group.study_uid) == ("series", instances[0].StudyInstanceUID)
    assert group.series_uids == (instances[0].SeriesInstanceUID,)
    assert sorted(group.job_names) == sorted(j.path.name for j in jobs)
    assert [r["sop_instance_uid"] for r in group.results] == [
        ds.SOPInstanceUID for ds in instances]  # slice order
    assert group.protocols == ("dimse",) and group.calling_aets == ("MOD1",)
    assert len(group.sources) == 3 and group.maps == ()
    assert instances[0].StudyInstanceUID not in group.key  # no raw UID in the key
    assert [g.state for g in worker.jobs.groups(CLOSED)] == [CLOSED]
    assert Spool(tmp_path).pending() == []


def test_inactivity_timer_restarts_with_each_arrival_with_fake_triton(tmp_path: Path) -> None:
    fake = FakeInferer()
    worker = _worker(tmp_path, fake, GroupingPolicy(level="series", timeout_s=1.0))
    first, second = _series(2)
    worker.start()
    try:
        worker.submit(_acked(tmp_path, first))
        time.sleep(0.6)
        worker.submit(_acked(tmp_path, second))
        time.sleep(0.6)  # 1.2 s after the first: would have closed without the second
        assert fake.calls == 0 and worker.open_groups == 1
        assert wait_for(lambda: fake.calls == 2)
    finally:
        worker.stop()


def test_study_level_groups_every_series_of_the_study_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    sink = FlakySink()
    worker = _worker(tmp_path, FakeInferer(), GroupingPolicy(level="study", timeout_s=0.2),
                     sink, db=job_db)
    study = generate_uid()
    a, b = _series(2, 0, study), _series(1, 5, study)
    other = _series(1, 9)  # another study: its own group
    jobs = [_acked(tmp_path, ds, "stow", None, db=job_db) for ds in (*a, *b, *other)]
    worker.start()  # spooled first: arrivals closer together than the timeout, even under load
    try:
        for job in jobs:
            worker.submit(job)
        assert wait_for(lambda: len(sink.accepted) == 2 and worker.depth == 0)
    finally:
        worker.stop()
    groups = {g.study_uid: g for g in sink.accepted}
    assert groups[study].level == "study" and len(groups[study].results) == 3
    assert groups[study].series_uids == (a[0].SeriesInstanceUID, b[0].SeriesInstanceUID)
    assert groups[study].protocols == ("stow",) and groups[study].calling_aets == ()
    assert len(groups[other[0].StudyInstanceUID].job_names) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # "head": lower case on purpose
@pytest.mark.parametrize(("selection", "change", "reason"), [
    (Selection(modalities=("DX",)), {}, "not_selected_modality"),
    (Selection(body_parts=("HEAD",)), {}, "not_selected_body_part"),
    (Selection(body_parts=("CHEST",)), {"BodyPartExamined": "head"}, "not_selected_body_part"),
    (Selection(orientations=("axial",)), {"ImageOrientationPatient": CORONAL},
     "not_selected_orientation"),
    (Selection(orientations=("sagittal",)), {}, "not_selected_orientation"),
    (Selection(max_slice_thickness=2.0), {"SliceThickness": 5.0},
     "not_selected_slice_thickness"),
    (Selection(max_slice_thickness=2.0), {}, "not_selected_slice_thickness"),  # unknown
    (Selection(min_instances=4), {}, "not_selected_min_instances"),
    (Selection(modalities=("CR",), body_parts=("CHEST",), orientations=("axial",),
               min_instances=3, max_slice_thickness=2.0), {"SliceThickness": 1.0}, None),
])
def test_selection_rules(selection: Selection, change: dict[str, object],
                         reason: str | None) -> None:
    series = _series(3)
    for ds in series:
        for keyword, value in change.items():
            setattr(ds, keyword, value)
    assert not_selected(selection, series) == reason


def test_orientation_from_image_orientation_patient() -> None:
    ds = make_instance()
    assert orientation(ds) is None  # a radiograph without one
    for iop, plane in ((AXIAL, "axial"), (CORONAL, "coronal"), (SAGITTAL, "sagittal")):
        ds.ImageOrientationPatient = iop
        assert orientation(ds) == plane
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # degenerate
    assert orientation(ds) is None


def test_slice_order_by_position_along_the_normal_then_instance_number() -> None:
    series = _series(4)
    positions = [30.0, -10.0, 20.0, 0.0]
    for ds, z in zip(series, positions, strict=True):
        ds.ImagePositionPatient = [5.0, 5.0, z]
    assert slice_order(series) == [1, 3, 2, 0]
    for ds, number in zip(series, (3, 1, 4, 2), strict=True):
        ds.InstanceNumber = number
        del ds.ImagePositionPatient  # no positions: instance numbers decide
    assert slice_order(series) == [1, 3, 0, 2]
    del series[0].InstanceNumber
    assert slice_order(series) == [0, 1, 2, 3]  # neither: arrival order


def test_series_not_selected_is_skipped_not_inferred_nor_an_error_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(), FlakySink()
    policy = GroupingPolicy(level="study", timeout_s=0.2,
                            selection=Selection(orientations=("axial",), min_instances=2))
    worker = _worker(tmp_path, fake, policy, sink)
    study = generate_uid()
    axial, coronal, short = _series(2, 0, study), _series(2, 3, study), _series(1, 6, study)
    for ds in coronal:
        ds.ImageOrientationPatient = CORONAL
    jobs = [_acked(tmp_path, ds) for ds in (*axial, *coronal, *short)]  # spooled first: the
    worker.start()  # arrivals then come closer together than the 0.2 s timeout, even under load
    try:
        for job in jobs:
            worker.submit(job)
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    assert fake.calls == 2
    rows = {r.sop_hash: r for r in worker.jobs.all()}
    for ds in coronal:
        assert (rows[uid_hash(ds.SOPInstanceUID)].state,
                rows[uid_hash(ds.SOPInstanceUID)].error) == (SKIPPED, "not_selected_orientation")
    assert rows[uid_hash(short[0].SOPInstanceUID)].error == "not_selected_min_instances"
    docs = ResultStore(tmp_path).for_study(study)
    skipped = sorted(d["skipped"]["reason"] for d in docs if "skipped" in d)
    assert skipped == ["not_selected_min_instances", "not_selected_orientation"]
    assert not any("error" in d for d in docs)
    [group] = sink.accepted
    assert len(group.results) == 2 and len(group.sources) == 2  # the axial series only
    assert len(group.job_names) == 5


def _per_series(depth: int | None = None) -> Manifest:
    spec = dataclasses.replace(TINY_MANIFEST.input, depth=depth)
    return dataclasses.replace(TINY_MANIFEST, input=spec, infer="series",
                               grouping=Grouping(level="series", timeout_s=0.2))


def test_per_series_2d_infers_the_middle_slice_once_with_fake_triton(tmp_path: Path) -> None:
    fake, sink = RecordingFake(), FlakySink()
    manifest = _per_series()
    worker = _worker(tmp_path, fake, GroupingPolicy.resolve(manifest), sink, manifest)
    series = _series(5)
    for ds, z in zip(series, (40.0, 0.0, 30.0, 10.0, 20.0), strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, z]  # arrival order is not slice order
    worker.start()
    try:
        for ds in series:
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    assert fake.calls == 1 and worker.jobs.count(INFERRED) == 5
    [doc] = ResultStore(tmp_path).for_study(series[0].StudyInstanceUID)
    ordered = [series[i].SOPInstanceUID for i in (1, 3, 4, 2, 0)]
    assert doc["sop_instance_uid"] == ordered[2]  # the middle slice by position (z = 20)
    assert doc["source_sop_instance_uids"] == ordered
    assert (doc["inferred_on"], doc["instances"]) == ("series", 5)
    [group] = sink.accepted
    assert len(group.results) == 1 and len(group.sources) == 5


def test_per_series_3d_stacks_the_sorted_slices_into_one_volume_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake = RecordingFake()
    manifest = _per_series(depth=8)
    core = InferenceCore(manifest, fake)
    core.check(make_instance())  # single-frame slices are taken for a per-series 3-D model
    worker = _worker(tmp_path, fake, GroupingPolicy.resolve(manifest), manifest=manifest)
    series = _series(4)
    brightness = (300, 100, 400, 200)
    for ds, level in zip(series, brightness, strict=True):
        pixels = np.full((ds.Rows, ds.Columns), level, dtype=np.uint16)
        ds.PixelData = pixels.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, float(level)]  # brighter = further along
        ds.WindowCenter, ds.WindowWidth = 256, 512
    worker.start()
    try:
        for ds in series:
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    [batch] = fake.batches
    assert batch.shape == (1, 1, 8, 64, 64)
    means = batch[0, 0].mean(axis=(1, 2))
    assert np.all(np.diff(means) >= 0) and means[-1] > means[0]  # sorted by position
    assert worker.jobs.count(INFERRED) == 4


def test_open_group_survives_a_restart_and_is_inferred_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    fake = FakeInferer()
    first = _worker(tmp_path, fake, GroupingPolicy(level="series", timeout_s=60.0), db=job_db)
    series = _series(2)
    first.start()
    try:
        for ds in series:
            first.submit(_acked(tmp_path, ds, db=job_db))
        assert wait_for(lambda: len(first.jobs.groups(OPEN)) == 1 and len(
            first.jobs.members(first.jobs.groups(OPEN)[0].key)) == 2)
    finally:
        first.stop()  # the group is still open: a restart must take it up
    first.jobs.close()
    assert fake.calls == 0
    sink = FlakySink()
    second = _worker(tmp_path, fake, GroupingPolicy(level="series", timeout_s=1.0), sink, db=job_db)
    second.start()
    try:
        assert second.open_groups == 1 and second.depth == 2  # re-armed, not closed at once
        assert wait_for(lambda: second.depth == 0)
    finally:
        second.stop()
    assert fake.calls == 2 and second.jobs.count(INFERRED) == 2
    [group] = sink.accepted
    assert group.key == second.jobs.groups(CLOSED)[0].key
    assert sorted(group.job_names) == sorted(r.name for r in second.jobs.all())


def test_restart_after_a_series_result_was_stored_does_not_infer_again_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    """Crash between the series result write and finishing its rows."""
    fake = FakeInferer()
    manifest = _per_series()
    first = _worker(tmp_path, fake, GroupingPolicy(level="series", timeout_s=60.0),
                    manifest=manifest, db=job_db)
    series = _series(3)
    first.start()
    try:
        for ds in series:
            first.submit(_acked(tmp_path, ds, db=job_db))
        assert wait_for(lambda: len(first.jobs.groups(OPEN)) == 1 and len(
            first.jobs.members(first.jobs.groups(OPEN)[0].key)) == 3)
    finally:
        first.stop()
    key = first.jobs.groups(OPEN)[0].key
    first.jobs.close()
    ResultStore(tmp_path).save(series[0].StudyInstanceUID, series[0].SeriesInstanceUID, {
        "study_instance_uid": series[0].StudyInstanceUID, "findings": []}, job=key)
    second = _worker(tmp_path, fake, GroupingPolicy.resolve(manifest), manifest=manifest, db=job_db)
    second.start()
    try:
        assert wait_for(lambda: second.depth == 0)
    finally:
        second.stop()
    assert fake.calls == 0 and second.jobs.count(INFERRED) == 3


def test_sink_that_raises_is_retried_and_nothing_is_released_before_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    sink = FlakySink(failures=2)
    worker = _worker(tmp_path, FakeInferer(), GroupingPolicy(), sink, db=job_db)  # instance level
    ds = make_instance(1)
    worker.start()
    job = _acked(tmp_path, ds, db=job_db)
    try:
        worker.submit(job)
        assert wait_for(lambda: sink.calls >= 1)
        assert job.path.exists() or sink.accepted  # refused: the source is kept
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    assert sink.calls == 3 and len(sink.accepted) == 1  # accepted once, on the third try
    [group] = sink.accepted
    assert group.level == "instance" and group.job_names == (job.path.name,)
    assert group.results[0]["sop_instance_uid"] == ds.SOPInstanceUID
    assert not job.path.exists()


def test_group_refused_by_the_sink_before_a_restart_is_handed_on_after_it_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    fake = FakeInferer()
    refusing = FlakySink(failures=10**6)
    first = _worker(tmp_path, fake, GroupingPolicy(), refusing, db=job_db)
    first.start()
    job = _acked(tmp_path, make_instance(2), db=job_db)
    try:
        first.submit(job)
        assert wait_for(lambda: refusing.calls >= 2)
    finally:
        first.stop()
    first.jobs.close()
    assert job.path.exists() and fake.calls == 1
    sink = FlakySink()
    second = _worker(tmp_path, fake, GroupingPolicy(), sink, db=job_db)
    second.start()
    try:
        assert wait_for(lambda: second.depth == 0)
    finally:
        second.stop()
    assert fake.calls == 1 and sink.calls == 1 and len(sink.accepted[0].results) == 1
    assert not job.path.exists()


def test_worker_prunes_old_finished_rows_at_start_with_fake_triton(tmp_path: Path) -> None:
    table = JobTable(tmp_path)
    table.insert("old.dcm", "1.2", "1.2.3", "1.2.3.4", "rest")
    table.finish("old.dcm", INFERRED)
    table.close()
    time.sleep(0.05)
    worker = _worker(tmp_path, FakeInferer(), GroupingPolicy(), retention_s=0.01)
    worker.start()
    try:
        assert worker.jobs.get("old.dcm") is None
    finally:
        worker.stop()


def test_manifest_grouping_fields_validate_and_default_to_instance() -> None:
    data = TINY_MANIFEST.to_dict()
    for key in ("grouping", "infer", "selection"):
        del data[key]
    old = Manifest.from_dict(data)  # a manifest from before grouping existed
    assert (old.grouping.level, old.infer, old.selection) == ("instance", "instance",
                                                               Selection())
    data = {**TINY_MANIFEST.to_dict(), "grouping": {"level": "series", "timeout_s": 5},
            "infer": "series", "selection": {"body_parts": ["chest"], "min_instances": 3,
                                             "orientations": ["axial"]}}
    m = Manifest.from_dict(data)
    assert m.selection.body_parts == ("CHEST",) and m.grouping.timeout_s == 5.0
    assert Manifest.from_dict(m.to_dict()) == m
    for bad, field in (({"infer": "series", "grouping": None}, "manifest.infer"),
                       ({"selection": {"orientations": ["oblique"]}}, "orientations"),
                       ({"selection": {"min_instances": 0}}, "min_instances"),
                       ({"grouping": {"level": "patient"}}, "grouping.level"),
                       ({"grouping": {"timeout_s": 0}}, "timeout_s")):
        with pytest.raises(ManifestError, match=field):
            Manifest.from_dict({**data, **bad})


def test_policy_takes_config_overrides_but_not_against_the_model() -> None:
    assert GroupingPolicy.resolve(TINY_MANIFEST) == GroupingPolicy()
    policy = GroupingPolicy.resolve(TINY_MANIFEST, "study", 2.5)
    assert (policy.level, policy.timeout_s) == ("study", 2.5)
    with pytest.raises(ConfigError, match="series or study"):
        GroupingPolicy.resolve(_per_series(), "instance")
    with pytest.raises(ConfigError, match="timeout"):
        GroupingPolicy.resolve(TINY_MANIFEST, "series", 0)


def test_results_api_shows_pending_while_the_group_is_open_with_fake_triton(
    tmp_path: Path,
) -> None:
    gw = fake_gateway(tmp_path, group_level="series", group_timeout_s=1.0)
    series = _series(2)
    try:
        for ds in series:
            gw.ingestor.accept(dicom_bytes(ds), ds, "rest", 0.0, 0.0)
        url = f"{base_url(gw)}/v1/studies/{series[0].StudyInstanceUID}/results"
        body = httpx.get(url).json()
        assert (body["status"], body["pending"]) == ("pending", 2)
        assert "bedside_gateway_groups_open 1.0" in httpx.get(f"{base_url(gw)}/metrics").text
        assert wait_for(lambda: httpx.get(url).json()["status"] == "done")
        assert len(httpx.get(url).json()["instances"]) == 2
        metrics = httpx.get(f"{base_url(gw)}/metrics").text
        assert ('bedside_gateway_groups_closed_total{level="series",outcome="inferred"} 1.0'
                in metrics)
    finally:
        gw.stop()


def test_dimse_calling_ae_title_is_kept_with_the_job_with_fake_triton(tmp_path: Path) -> None:
    gw = fake_gateway(tmp_path)
    ds = make_instance(7)
    try:
        ae = AE(ae_title="CT_SCANNER_2")
        ae.requested_contexts = StoragePresentationContexts[:20]
        assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        gw.ingestor.accept(dicom_bytes(make_instance(8)), make_instance(8), "rest", 0.0, 0.0)
        assert wait_for(lambda: gw.worker.depth == 0)
        rows = {r.protocol: r.calling_aet for r in gw.worker.jobs.all()}
        assert rows == {"dimse": "CT_SCANNER_2", "rest": None}
    finally:
        gw.stop()


def test_per_series_waits_out_triton_then_fails_for_good_as_one_item_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(unavailable_calls=2), FlakySink()
    manifest = _per_series()
    worker = _worker(tmp_path, fake, GroupingPolicy.resolve(manifest), sink, manifest)
    good, bad = _series(3), _series(2, 4)
    worker.start()
    try:
        for ds in good:
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
        assert fake.calls == 3  # two unavailable, then the one inference of the series
        fake.fail_permanently = True
        for ds in bad:
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
        assert worker.alive
    finally:
        worker.stop()
    rows = {r.sop_hash: r for r in worker.jobs.all()}
    middle = rows[uid_hash(good[1].SOPInstanceUID)]
    assert (middle.state, middle.attempts) == (INFERRED, 3)
    assert {rows[uid_hash(ds.SOPInstanceUID)].error for ds in bad} == {"triton_error"}
    [doc] = ResultStore(tmp_path).for_study(bad[0].StudyInstanceUID)
    assert doc["error"]["reason"] == "triton_error" and doc["inferred_on"] == "series"
    assert [len(g.results) for g in sink.accepted] == [1, 1]  # the error is handed on too


def test_instance_level_selection_skips_each_instance_with_its_own_note_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake, sink = FakeInferer(), FlakySink()
    policy = GroupingPolicy(selection=Selection(orientations=("axial",)))
    worker = _worker(tmp_path, fake, policy, sink)
    series = _series(3)
    series[1].ImageOrientationPatient = SAGITTAL  # a localizer in the series
    series[2].ImageOrientationPatient = SAGITTAL
    worker.start()
    try:
        for ds in series:
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    assert fake.calls == 1 and worker.jobs.count(SKIPPED) == 2
    docs = ResultStore(tmp_path).for_study(series[0].StudyInstanceUID)
    assert sorted(d.get("skipped", {}).get("reason", "inferred") for d in docs) == [
        "inferred", "not_selected_orientation", "not_selected_orientation"]
    assert [len(g.results) for g in sink.accepted] == [1]  # skipped ones are not handed on


def test_group_flags_build_the_config_and_bad_values_are_refused(tmp_path: Path) -> None:
    repo = model_repository(tmp_path)
    base = ["gateway", "--repository", str(repo), "--model", TINY_MANIFEST.name, "--no-auth",
            "--plaintext", "--spool", str(tmp_path / "spool")]
    args = _parser().parse_args([*base, "--group-level", "study", "--group-timeout", "45",
                                 "--job-retention", "3600"])
    config = config_from_args(args, "x:1")
    assert (config.group_level, config.group_timeout_s, config.job_retention_s) == (
        "study", 45.0, 3600.0)
    defaults = config_from_args(_parser().parse_args(base), "x:1")
    assert (defaults.group_level, defaults.group_timeout_s) == (None, None)  # the manifest's
    assert defaults.job_retention_s == 7 * 86400
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--group-level", "patient"])
    for bad in ({"group_timeout_s": 0.0}, {"job_retention_s": -1.0}, {"group_level": "x"}):
        with pytest.raises(ConfigError):
            dataclasses.replace(defaults, **bad)


class SegmentationFake(FakeInferer):
    """The fake Triton for a segmentation model: one map per class, each the input itself."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.repeat(batch[:, :1], 2, axis=1)


class MapCheckingSink(FlakySink):
    def accept(self, group: CompletedGroup) -> None:
        self.shapes = [np.load(p, allow_pickle=False).shape for p in group.maps]
        super().accept(group)


def test_segmentation_maps_reach_the_sink_and_are_removed_after_with_fake_triton(
    tmp_path: Path,
) -> None:
    output = dataclasses.replace(TINY_MANIFEST.output, labels=("bg", "lesion"),
                                 thresholds=(0.5, 0.5), activation="softmax")
    manifest = dataclasses.replace(TINY_MANIFEST, task="segmentation", output=output,
                                   infer="series", grouping=Grouping("series", 0.2))
    sink = MapCheckingSink()
    worker = _worker(tmp_path, SegmentationFake(), GroupingPolicy.resolve(manifest), sink,
                     manifest)
    worker.start()
    try:
        for ds in _series(3):
            worker.submit(_acked(tmp_path, ds))
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()
    [group] = sink.accepted
    assert len(group.maps) == len(group.results) == 1
    assert sink.shapes == [(1, 2, 64, 64)]  # (frames, classes, height, width)
    assert not any(p.exists() for p in group.maps)  # released once the sink took them
