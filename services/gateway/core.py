"""The protocol-free core: DICOM bytes -> checked dataset -> model input -> Triton -> result.

Edges (DIMSE, REST) call into this and map its errors to their own codes. Nothing here logs
patient data: UIDs appear in logs only as ``uid_hash``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from optimizer.errors import PreprocessError
from optimizer.manifest import Manifest
from optimizer.preprocess import (
    DEFAULT_LIMITS,
    PixelLimits,
    check_image_header,
    preprocess_frames,
)
from optimizer.verify import activate
from services.gateway import audit
from services.gateway.errors import (
    GatewayError,
    InferenceFailed,
    InvalidInstance,
    MissingPixelData,
    PayloadTooLarge,
    UnsupportedInstance,
    UnsupportedSOPClass,
)

LOG = logging.getLogger(__name__)

# Image storage SOP classes the gateway takes; the manifest's modalities narrow them further and
# optimizer.preprocess decides, from the header, whether the pixels can become model input.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}


def read_leniently() -> None:
    """Malformed values must not be echoed into warnings or logs (they may be patient data):
    pydicom reads without validating, and the checks here reject what cannot be used."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID in logs (UIDs can identify patients)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


class Inferer(Protocol):
    @property
    def model(self) -> str: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class Result:
    """Findings for one instance, with the latency split the SRE and the demo read."""

    model: str
    model_version: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    findings: list[dict[str, Any]]
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Segmentation only, not serialised: the activated class maps (frames, classes, ...) at the
    # model's resolution, for services.gateway.dicom_results.build_seg.
    maps: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "findings": self.findings,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


def complete_timings(timings_ms: dict[str, float], origin: float, end: float) -> None:
    """Add ``total`` (origin -> end) and ``gateway_overhead`` (total minus inference)."""
    timings_ms["total"] = (end - origin) * 1000.0
    timings_ms["gateway_overhead"] = timings_ms["total"] - timings_ms.get("inference", 0.0)


# A deflated data set is inflated whole by pydicom: without a bound, a few hundred kilobytes of
# zeros inflate to gigabytes (found by tests/fuzz). 256 MiB is 4x the default request limit.
MAX_INFLATED_BYTES = 256 * 1024 * 1024


def check_inflated(deflated: bytes, limit: int = MAX_INFLATED_BYTES) -> None:
    """PayloadTooLarge if the raw deflate stream ``deflated`` inflates to more than ``limit``
    bytes; inflation stops at the limit, so memory stays bound. pydicom and pynetdicom inflate
    a Deflated Explicit VR Little Endian data set whole: call this first."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated, pending = 0, deflated
    while inflated <= limit:  # 1 MiB at a time: only the count is kept
        try:
            chunk = inflater.decompress(pending, 1 << 20)
        except zlib.error:
            return  # not a deflate stream: the reader says what is wrong with it
        inflated += len(chunk)
        pending = inflater.unconsumed_tail
        if not chunk and not pending:  # all input used and all output returned
            break
    if inflated > limit:
        raise PayloadTooLarge(f"the deflated data set inflates to more than {limit} bytes",
                              "inflated_too_large")


def _check_inflated_size(data: bytes, limit: int) -> None:
    """``check_inflated`` on a Part-10 file's data set, if its transfer syntax is deflated."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        check_inflated(data[fp.tell():], limit)


def parse(data: bytes, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """DICOM Part-10 bytes -> dataset, fully read, or InvalidInstance saying why
    (PayloadTooLarge for a deflated data set that inflates beyond ``max_inflated_bytes``)."""
    try:
        _check_inflated_size(data, max_inflated_bytes)
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except GatewayError:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstance(f"not a DICOM Part-10 file: {exc}", "not_dicom") from exc
    except Exception as exc:  # truncated elements raise EOFError, OSError, ValueError...
        raise InvalidInstance(f"unreadable DICOM file: {exc}", "unreadable") from exc
    audit.note_dataset(ds)  # hashed UIDs into the current request's audit record, if any
    return ds


def _check_native_length(ds: Dataset) -> None:
    """Uncompressed Pixel Data shorter than its header describes is a truncated instance:
    refused before the acknowledgement rather than failing in the worker afterwards."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if ts.is_compressed:
        return
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1)) * (int(ds.BitsAllocated) // 8))
    held = len(ds.PixelData)
    if held < expected:
        raise InvalidInstance(f"Pixel Data holds {held} bytes where the header describes "
                              f"{expected}: the instance is truncated", "truncated_pixel_data")


class InferenceCore:
    """Checks, preprocesses and infers one instance per the model manifest."""

    def __init__(self, manifest: Manifest, inferer: Inferer,
                 limits: PixelLimits = DEFAULT_LIMITS) -> None:
        self.manifest = manifest
        self._inferer = inferer
        self._limits = limits

    def check(self, ds: Dataset) -> None:
        """Header-only checks, cheap enough to run before a DIMSE acknowledgement."""
        try:
            self._check(ds)
        except GatewayError:
            raise
        except Exception as exc:  # pydicom converts raw elements lazily; bad values raise here
            raise InvalidInstance(f"malformed data element: {exc}", "malformed") from exc

    def _check(self, ds: Dataset) -> None:
        spec = self.manifest.input
        if self.manifest.infer == "series" and spec.depth is not None:
            spec = replace(spec, depth=None)  # a slice of the series volume, not a volume
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in IMAGE_SOP_CLASSES:
            raise UnsupportedSOPClass(
                f"SOP class {sop_class or '(none)'} is not an image storage class this gateway "
                "takes", "unsupported_sop_class")
        if "PixelData" not in ds:
            raise MissingPixelData(
                f"{IMAGE_SOP_CLASSES[sop_class]} instance has no Pixel Data (7FE0,0010)",
                "no_pixel_data")
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not str(ds.get(uid, "")):
                raise InvalidInstance(f"missing {uid}", "missing_uid")
        try:
            check_image_header(ds, spec, self._limits)
        except PreprocessError as exc:
            raise UnsupportedInstance(str(exc), "not_for_model") from exc
        _check_native_length(ds)

    def _findings(self, scores: np.ndarray) -> list[dict[str, Any]]:
        """``scores``: (frames, ...) activated outputs; one frame unless the manifest infers
        every frame of a multi-frame instance, where a label's score is its highest."""
        out = self.manifest.output
        pairs = zip(out.labels, out.thresholds, strict=True)
        if self.manifest.task == "classification":
            best = scores.max(axis=0)
            findings = [{"label": label, "score": round(float(best[k]), 6), "threshold": thr,
                         "positive": bool(best[k] >= thr)}
                        for k, (label, thr) in enumerate(pairs)]
            if scores.shape[0] > 1:
                for k, finding in enumerate(findings):
                    finding["frame"] = int(scores[:, k].argmax()) + 1  # 1-based, as in DICOM
            return findings
        findings = []
        for k, (label, thr) in enumerate(pairs):  # segmentation: a summary per class map
            mask = scores[:, k] >= thr
            findings.append({"label": label, "threshold": thr, "pixels": int(mask.sum()),
                             "fraction": round(float(mask.mean()), 6),
                             "max_score": round(float(scores[:, k].max()), 6),
                             "positive": bool(mask.any())})
        return findings

    def analyze(self, ds: Dataset, timings_ms: dict[str, float] | None = None) -> Result:
        """Check, preprocess, infer, postprocess; adds its stages to ``timings_ms``."""
        self.check(ds)
        t0 = time.perf_counter()
        try:
            x = preprocess_frames(ds, self.manifest.input, header_checked=True,
                                  limits=self._limits)
        except PreprocessError as exc:
            raise InvalidInstance(str(exc), "bad_pixels") from exc
        return self.analyze_input(ds, x, timings_ms, t0)

    def analyze_input(self, ds: Dataset, x: np.ndarray, timings_ms: dict[str, float] | None,
                      t0: float) -> Result:
        """Infer and postprocess model inputs ``x`` (n, *input shape) already made from ``ds``
        (or, for a series, from the series ``ds`` stands for) since ``t0`` (perf_counter)."""
        timings = dict(timings_ms or {})
        t1 = time.perf_counter()
        # One call per frame: any Triton max_batch_size takes it; the dynamic batcher merges.
        raws = [self._inferer.infer(x[i : i + 1]) for i in range(x.shape[0])]
        t2 = time.perf_counter()
        expected = (1, *self.manifest.output_shape)
        for raw in raws:
            if raw.shape != expected:
                raise InferenceFailed(
                    f"model returned shape {raw.shape}, manifest expects {expected}",
                    "output_shape")
        scores = activate(np.concatenate(raws), self.manifest.output.activation)
        findings = self._findings(scores)
        t3 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1000.0
        timings["inference"] = (t2 - t1) * 1000.0
        timings["postprocess"] = (t3 - t2) * 1000.0
        LOG.info("inferred instance %s in %.1f ms", uid_hash(str(ds.SOPInstanceUID)),
                 (t3 - t0) * 1000.0)
        return Result(
            model=self._inferer.model, model_version=self.manifest.version,
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID), findings=findings, timings_ms=timings,
            maps=scores if self.manifest.task == "segmentation" else None,
        )
