"""Completed groups (what the worker hands to a GroupSink) built from test instances, and
recording senders for delivery tests."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from optimizer.contract.manifest import Manifest
from services.gateway.processing.grouping import CompletedGroup
from tests.conftest import TINY_MANIFEST
from tests.gateway.util import make_study

CLASSIFIER = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
    TINY_MANIFEST.output, labels=("lesion", "pleural effusion"), thresholds=(0.5, 0.3)))
SEGMENTER = dataclasses.replace(CLASSIFIER, task="segmentation")
# Distinctive identifying values: any survivor in a de-identified object is found by search.
PHI = {"PatientName": "Zyxwvut^Quirinus", "PatientID": "PID-77713",
       "PatientBirthDate": "19411225", "AccessionNumber": "ACC-31337",
       "ReferringPhysicianName": "Referrer^Hieronymus", "InstitutionName": "Saint Distinctive"}


def study_with_phi(n: int, seed: int = 0) -> list[Dataset]:
    study = make_study(n, seed)
    for ds in study:
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
    return study


def findings(manifest: Manifest, scores: Sequence[float]) -> list[dict[str, object]]:
    return [{"label": label, "score": s, "threshold": t, "positive": s >= t}
            for label, t, s in zip(manifest.output.labels, manifest.output.thresholds, scores,
                                   strict=True)]


def make_group(folder: Path, sources: Sequence[Dataset], manifest: Manifest = CLASSIFIER,
               protocols: tuple[str, ...] = ("dimse",), calling_aets: tuple[str, ...] = ("CT1",),
               errors: Sequence[int] = (), level: str = "series") -> CompletedGroup:
    """A group of ``sources`` (written as Part-10 files under ``folder``) with one result per
    instance; indices in ``errors`` get an error result instead."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, results, maps = [], [], []
    for k, ds in enumerate(sources):
        path = folder / f"src{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        doc: dict[str, object] = {"model": manifest.name, "model_version": manifest.version,
                                  "study_instance_uid": ds.StudyInstanceUID,
                                  "series_instance_uid": ds.SeriesInstanceUID,
                                  "sop_instance_uid": ds.SOPInstanceUID}
        if k in errors:
            doc["error"] = "inference failed"
        else:
            doc["findings"] = findings(manifest, [0.1 + 0.2 * k, 0.9][:len(
                manifest.output.labels)])
        results.append(doc)
        if manifest.task == "segmentation":
            rng = np.random.default_rng(k)
            m = folder / f"map{k}.npy"
            np.save(m, rng.random((1, len(manifest.output.labels), 32, 32)).astype(np.float32))
            maps.append(m)
    study = str(sources[0].StudyInstanceUID)
    key = hashlib.sha256(f"{level}|{study}|{folder}".encode()).hexdigest()[:24]
    return CompletedGroup(
        key=key, level=level, study_uid=study,
        series_uids=tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in sources)),
        job_names=tuple(f"job-{key[:6]}-{k}" for k in range(len(sources))),
        sources=tuple(paths), results=tuple(results), maps=tuple(maps), protocols=protocols,
        calling_aets=calling_aets)


@dataclasses.dataclass
class RecordingSender:
    """A fake destination: records what it was sent; ``script`` decides each call's fate
    (an exception to raise, or None to store everything)."""

    name: str
    script: list[Exception | None] = dataclasses.field(default_factory=list)
    store_first_then: Exception | None = None  # store one file, then raise this
    received: list[bytes] = dataclasses.field(default_factory=list)
    calls: int = 0

    def send(self, files: Sequence[Path], on_stored: Callable[[Path], None]) -> None:
        self.calls += 1
        if self.store_first_then is not None and files:
            self.received.append(files[0].read_bytes())
            on_stored(files[0])
            error, self.store_first_then = self.store_first_then, None
            raise error
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        for path in files:
            self.received.append(path.read_bytes())
            on_stored(path)
