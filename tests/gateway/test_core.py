from __future__ import annotations

import numpy as np
import pytest

from services.gateway.dicom.parsing import parse
from services.gateway.errors import (
    InvalidInstance,
    MissingPixelData,
    UnsupportedInstance,
    UnsupportedSOPClass,
)
from services.gateway.inference.core import InferenceCore
from services.gateway.phi import uid_hash
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.util import dicom_bytes, make_instance


def test_findings_with_fake_inferer() -> None:
    core = InferenceCore(TINY_MANIFEST, FakeInferer())
    ds = make_instance()
    result = core.analyze(ds)
    assert result.sop_instance_uid == ds.SOPInstanceUID
    [finding] = result.findings
    assert finding["label"] == "lesion" and finding["threshold"] == 0.5
    assert finding["positive"] == (finding["score"] >= 0.5)
    assert 0.0 < finding["score"] < 1.0
    assert {"preprocess", "inference", "postprocess"} <= set(result.timings_ms)


def test_check_maps_each_problem_to_its_error() -> None:
    core = InferenceCore(TINY_MANIFEST, FakeInferer())
    sr = make_instance()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    with pytest.raises(UnsupportedSOPClass, match="not an image storage class"):
        core.check(sr)
    no_pixels = make_instance()
    del no_pixels.PixelData
    with pytest.raises(MissingPixelData, match="no Pixel Data"):
        core.check(no_pixels)
    mr = make_instance()
    mr.Modality = "MR"
    with pytest.raises(UnsupportedInstance, match="modality MR"):
        core.check(mr)


def test_parse_rejects_non_dicom_and_truncated() -> None:
    with pytest.raises(InvalidInstance, match="not a DICOM Part-10 file"):
        parse(b"hello, this is not DICOM" * 10)
    data = dicom_bytes(make_instance())
    truncated = data[: len(data) // 2]
    with pytest.raises(InvalidInstance):
        InferenceCore(TINY_MANIFEST, FakeInferer()).analyze(parse(truncated))


def test_uid_hash_is_stable_and_distinguishes_uids() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert uid_hash(uid) == uid_hash(uid) and len(uid_hash(uid)) == 12
    assert uid_hash(uid) != uid_hash(uid + "6")
    assert all(c in "0123456789abcdef" for c in uid_hash(uid))


def test_result_is_json_ready() -> None:
    result = InferenceCore(TINY_MANIFEST, FakeInferer()).analyze(make_instance())
    d = result.to_dict()
    assert isinstance(d["findings"][0]["score"], float)
    assert np.isfinite(d["timings_ms"]["inference"])
