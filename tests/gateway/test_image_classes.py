"""Which storage SOP classes the gateway takes: image classes derived from PS3.3 (IODs with a
mandatory Image Pixel module), the manifest deciding what is for the model (0xC001), non-image
classes refused (0x0122). The gateway ones run a whole gateway with its Triton edge faked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE

from optimizer.contract.manifest import Manifest
from services.gateway.app import Gateway
from services.gateway.dicom.sop_classes import image_sop_classes, storage_sop_classes
from services.gateway.errors import NotForModel, UnsupportedSOPClass
from services.gateway.inference.core import InferenceCore
from services.gateway.status import dimse_status, stow_failure_reason
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway, wait_for
from tests.gateway.util import dicom_bytes
from tests.optimizer.pixel_data import make_dataset, smooth_image

XA = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage (multi-frame)
US = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
# What the hand-written list held before the classes were derived: none may be lost.
FORMER_LIST = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
               "1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2",
               "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7",
               "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
               "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.7.2",
               "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4")
IMAGES = {XA: "X-Ray Angiographic Image Storage", US: "Ultrasound Image Storage",
          US_MULTIFRAME: "Ultrasound Multi-frame Image Storage",
          "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA Image Storage",
          "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
          "1.2.840.10008.5.1.4.1.1.20": "Nuclear Medicine Image Storage",
          "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image Storage",
          "1.2.840.10008.5.1.4.1.1.77.1.6": "VL Whole Slide Microscopy Image Storage"}
NON_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR", "1.2.840.10008.5.1.4.1.1.88.22":
    "Enhanced SR", "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG Waveform",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose (Image Pixel module conditional)",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map (Image Pixel module conditional)",
}
ROWS, COLS, FRAMES = 48, 40, 4


def test_image_classes_are_derived_from_the_standard() -> None:
    derived = image_sop_classes()
    for sop_class, name in IMAGES.items():
        assert derived.get(sop_class) == name, sop_class
    assert set(FORMER_LIST) <= set(derived)
    assert not set(NON_IMAGES) & set(derived)
    # every one of them is a storage class the DIMSE edge negotiates
    assert set(derived) <= set(storage_sop_classes())
    assert 60 <= len(derived) < len(storage_sop_classes())


def _instance(sop_class: str, modality: str, *, frames: int = 1,
              colour: bool = False) -> Dataset:
    if colour:
        pixels = np.stack([smooth_image(ROWS, COLS, 0, 255, seed=s) for s in range(3)], -1)
        ds = make_dataset(pixels, photometric="RGB", bits_allocated=8, modality=modality)
    else:
        pixels = smooth_image(ROWS, COLS, 0, 255, frames=frames if frames > 1 else None)
        ds = make_dataset(pixels, bits_allocated=8, frames=frames, modality=modality)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def _xa() -> Dataset:
    return _instance(XA, "XA", frames=FRAMES)


def _us() -> Dataset:
    return _instance(US, "US", colour=True)


def _us_multiframe() -> Dataset:
    return _instance(US_MULTIFRAME, "US", frames=FRAMES)


def _sr() -> Dataset:
    ds = _instance("1.2.840.10008.5.1.4.1.1.88.22", "SR")
    del ds.PixelData
    return ds


def _manifest(*modalities: str) -> Manifest:
    return dataclasses.replace(
        TINY_MANIFEST, input=dataclasses.replace(TINY_MANIFEST.input, modalities=modalities))


def test_the_manifest_decides_what_is_for_the_model_with_its_own_status() -> None:
    for_xa_us = InferenceCore(_manifest("XA", "US"), FakeInferer())
    for ds in (_xa(), _us(), _us_multiframe()):
        for_xa_us.check(ds)  # taken
    cr_only = InferenceCore(TINY_MANIFEST, FakeInferer())
    with pytest.raises(NotForModel, match="modality XA is not one of CR, DX") as refused:
        cr_only.check(_xa())
    assert refused.value.reason == "not_for_model"
    assert dimse_status(refused.value) == stow_failure_reason(refused.value) == 0xC001
    with pytest.raises(UnsupportedSOPClass) as sr:
        for_xa_us.check(_sr())
    assert sr.value.reason == "unsupported_sop_class" and dimse_status(sr.value) == 0x0122


def _repository(tmp: Path, manifest: Manifest) -> Path:
    repo = tmp / "xa-us-repo"  # not "repo": fake_gateway writes the CR/DX manifest there
    (repo / manifest.name).mkdir(parents=True)
    manifest.save(repo / manifest.name / "manifest.json")
    return repo


@pytest.fixture()
def xa_us_gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = fake_gateway(tmp_path, model_repository=_repository(tmp_path, _manifest("XA", "US")))
    yield gw
    gw.stop()


def _c_store(gw: Gateway, *datasets: Dataset) -> list[int]:
    ae = AE(ae_title="UNITSCU")
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title=gw.config.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _results(gw: Gateway, ds: Dataset) -> list[dict[str, object]]:
    url = f"{base_url(gw)}/v1/studies/{ds.StudyInstanceUID}/results"
    assert wait_for(lambda: httpx.get(url).json().get("status") == "done")
    return list(httpx.get(url).json()["instances"])


def test_xa_multiframe_and_us_are_taken_over_dimse_and_inferred_with_fake_triton(
        xa_us_gateway: Gateway) -> None:
    xa, us, us_mf, sr = _xa(), _us(), _us_multiframe(), _sr()
    assert _c_store(xa_us_gateway, xa, us, us_mf, sr) == [0x0000, 0x0000, 0x0000, 0x0122]
    for ds in (xa, us, us_mf):
        [result] = _results(xa_us_gateway, ds)
        assert result["sop_instance_uid"] == ds.SOPInstanceUID and "findings" in result


def test_xa_and_us_over_rest_and_stow_with_fake_triton(xa_us_gateway: Gateway) -> None:
    dicom = {"Content-Type": "application/dicom"}
    r = httpx.post(f"{base_url(xa_us_gateway)}/v1/infer", content=dicom_bytes(_xa()),
                   headers=dicom, timeout=30)
    assert r.status_code == 200 and r.json()["findings"], r.text
    r = httpx.post(f"{base_url(xa_us_gateway)}/v1/infer", content=dicom_bytes(_sr()),
                   headers=dicom, timeout=30)
    assert (r.status_code, r.json()["error"]["reason"]) == (400, "unsupported_sop_class")
    from dicomweb_client.api import DICOMwebClient

    us = _us()
    stow = DICOMwebClient(url=f"{base_url(xa_us_gateway)}/dicomweb").store_instances([us])
    assert [ref[0x00081155].value for ref in stow[0x00081199].value] == [us.SOPInstanceUID]
    assert _results(xa_us_gateway, us)


def test_an_image_the_model_does_not_take_gets_0xc001_not_0x0122(tmp_path: Path) -> None:
    gw = fake_gateway(tmp_path)  # the CR/DX model
    try:
        assert _c_store(gw, _xa(), _us(), _sr()) == [0xC001, 0xC001, 0x0122]
        metrics = httpx.get(f"{base_url(gw)}/metrics").text
        line = 'bedside_gateway_requests_total{outcome="refused",protocol="dimse",' \
            'reason="not_for_model"} 2.0'
        assert line in metrics.splitlines(), metrics
    finally:
        gw.stop()
