"""The protocol-free inference core: a checked data set -> model input -> Triton -> result.

Edges (DIMSE, REST) and the worker call into this and map its errors to their own codes (through
``services.gateway.status``). Reading bytes into a data set is ``services.gateway.dicom``.
Nothing here logs patient data: UIDs appear in logs only as ``uid_hash``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset

from optimizer.contract.errors import (
    PixelLimitExceeded,
    PreprocessError,
    UnsupportedTransferSyntax,
)
from optimizer.contract.findings import activate, findings
from optimizer.contract.manifest import Manifest
from optimizer.contract.preprocess import (
    DEFAULT_LIMITS,
    PixelLimits,
    check_image_header,
    preprocess_frames,
)
from optimizer.contract.series import slice_spec
from services.gateway.dicom.parsing import check_native_length, client_text, shown_uid
from services.gateway.dicom.sop_classes import image_sop_classes
from services.gateway.errors import (
    GatewayError,
    InferenceFailed,
    InvalidInstance,
    MissingPixelData,
    NotForModel,
    UnsupportedInstance,
    UnsupportedSOPClass,
)
from services.gateway.phi import uid_hash

LOG = logging.getLogger(__name__)


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


class InferenceCore:
    """Checks, preprocesses and infers one instance per the model manifest."""

    def __init__(self, manifest: Manifest, inferer: Inferer,
                 limits: PixelLimits = DEFAULT_LIMITS) -> None:
        self.manifest = manifest
        self._inferer = inferer
        self._limits = limits
        image_sop_classes()  # read the PS3.3 tables now: a broken install fails at start

    @property
    def inferer(self) -> Inferer:
        return self._inferer

    def check(self, ds: Dataset) -> None:
        """Header-only checks, cheap enough to run before a DIMSE acknowledgement."""
        try:
            self._check(ds)
        except GatewayError:
            raise
        except Exception as exc:  # pydicom converts raw elements lazily; bad values raise here
            raise InvalidInstance(f"malformed data element: {client_text(exc)}",
                                  "malformed") from exc

    def _check(self, ds: Dataset) -> None:
        spec = self.manifest.input
        if self.manifest.infer == "series" and spec.depth is not None:
            spec = slice_spec(spec)  # a slice of the series volume, not a volume
        sop_class = str(ds.get("SOPClassUID", ""))
        image_classes = image_sop_classes()
        if sop_class not in image_classes:
            raise UnsupportedSOPClass(
                f"SOP class {shown_uid(sop_class)} is not an image storage class this gateway "
                "takes", "unsupported_sop_class")
        if "PixelData" not in ds:
            raise MissingPixelData(
                f"{image_classes[sop_class]} instance has no Pixel Data (7FE0,0010)",
                "no_pixel_data")
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not str(ds.get(uid, "")):
                raise InvalidInstance(f"missing {uid}", "missing_uid")
        try:
            check_image_header(ds, spec, self._limits)
        except UnsupportedTransferSyntax as exc:
            raise UnsupportedInstance(str(exc), "unsupported_transfer_syntax") from exc
        except PixelLimitExceeded as exc:
            raise UnsupportedInstance(str(exc), "pixel_limit") from exc
        except PreprocessError as exc:  # modality, photometric, bit depth: not for this model
            raise NotForModel(str(exc), "not_for_model") from exc
        check_native_length(ds)

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
        found = findings(self.manifest, scores)
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
            sop_instance_uid=str(ds.SOPInstanceUID), findings=found, timings_ms=timings,
            maps=scores if self.manifest.task == "segmentation" else None,
        )
