"""Modality LUT, VOI LUT, windowing, MONOCHROME1, enhanced functional groups, header refusals
and the manifest's VOI/frame options, against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from optimizer.contract.errors import ManifestError, PreprocessError
from optimizer.contract.manifest import Manifest, Normalize, Window
from optimizer.contract.preprocess import (
    PixelLimits,
    check_image_header,
    preprocess,
    preprocess_frames,
)
from tests.conftest import TINY_MANIFEST
from tests.optimizer.pixel_data import make_dataset

SPEC = dataclasses.replace(TINY_MANIFEST.input, height=1, width=5, modalities=("CR", "CT", "OT"),
                           normalize=Normalize(mean=0.0, std=1.0))


def _row(values: list[int], **kwargs: object) -> Dataset:
    return make_dataset(np.array([values]), **kwargs)  # type: ignore[arg-type]


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def test_rescale_on_signed_ct_then_window() -> None:
    # CT: stored int16, HU = stored - 1024; window 40/400 -> [-160, 240]
    ds = _row([0, 864, 1064, 1264, 2000], bits_stored=12, signed=True, modality="CT")
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    out = preprocess(ds, dataclasses.replace(SPEC, window=Window(center=40, width=400)))[0]
    # HU: -1024, -160, 40, 240, 976
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_negative_stored_values_keep_their_sign() -> None:
    ds = _row([-2048, -1000, 0, 1000, 2047], bits_stored=12, signed=True, modality="CT")
    out = preprocess(ds, dataclasses.replace(SPEC, window=Window(center=0, width=4000)))[0]
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)


def test_modality_lut_sequence() -> None:
    ds = _row([9, 10, 11, 13, 20])
    ds.ModalityLUTSequence = [_lut_item([4, 10, 16], [100, 200, 300, 400])]
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    # values: 100 (below first: first entry), 100, 200, 400, 400 (above: last entry)
    out = preprocess(ds, dataclasses.replace(SPEC, window=Window(center=250, width=300)))[0]
    np.testing.assert_allclose(out[0], [0.0, 0.0, 1 / 3, 1.0, 1.0], atol=1e-6)


def test_voi_lut_sequence_used_without_a_window() -> None:
    ds = _row([0, 1, 2, 3, 5], bits_allocated=8)
    ds.VOILUTSequence = [_lut_item([4, 0, 8], [0, 51, 102, 255])]
    out = preprocess(ds, SPEC)[0]
    np.testing.assert_allclose(out[0], [0.0, 0.2, 0.4, 1.0, 1.0], atol=1e-6)


def test_voi_preference_between_window_and_lut() -> None:
    ds = _row([0, 1, 2, 3, 4], bits_allocated=8)
    ds.VOILUTSequence = [_lut_item([4, 0, 8], [0, 51, 102, 255])]
    ds.WindowCenter, ds.WindowWidth = 2, 4  # [0, 4]
    window = preprocess(ds, dataclasses.replace(SPEC, voi="window"))[0]
    np.testing.assert_allclose(window[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    lut = preprocess(ds, dataclasses.replace(SPEC, voi="lut"))[0]
    np.testing.assert_allclose(lut[0], [0.0, 0.2, 0.4, 1.0, 1.0], atol=1e-6)
    minmax = preprocess(ds, dataclasses.replace(SPEC, voi="minmax"))[0]
    np.testing.assert_allclose(minmax[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    fixed = preprocess(ds, dataclasses.replace(SPEC, voi="lut", window=Window(1, 2)))[0]
    np.testing.assert_allclose(fixed[0], [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-6)


def test_voi_lut_with_16_bit_entries_and_signed_first_value() -> None:
    ds = _row([-3, -2, -1, 0, 7], bits_stored=12, signed=True, modality="CT")
    ds.VOILUTSequence = [_lut_item([3, 65534, 16], [0, 65535, 13107])]  # first = -2
    out = preprocess(ds, SPEC)[0]
    np.testing.assert_allclose(out[0], [0.0, 0.0, 1.0, 0.2, 0.2], atol=1e-6)


def test_sigmoid_voi_function() -> None:
    ds = _row([100, 150, 200, 250, 300])
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 200, 100, "SIGMOID"
    out = preprocess(ds, SPEC)[0]
    expected = 1.0 / (1.0 + np.exp(-4.0 * (np.array([100, 150, 200, 250, 300]) - 200) / 100))
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert out[0, 2] == pytest.approx(0.5)


def test_monochrome1_inverted_after_windowing() -> None:
    ds = _row([0, 100, 200, 300, 400], photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 200, 400
    out = preprocess(ds, SPEC)[0]
    np.testing.assert_allclose(out[0], [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)


def test_normalisation_after_windowing() -> None:
    ds = _row([0, 100, 200, 300, 400])
    spec = dataclasses.replace(SPEC, window=Window(200, 400), normalize=Normalize(0.5, 0.25))
    np.testing.assert_allclose(preprocess(ds, spec)[0, 0], [-2.0, -1.0, 0.0, 1.0, 2.0],
                               atol=1e-6)


def _functional_group(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_enhanced_functional_groups_per_frame_rescale_and_window() -> None:
    frames = np.stack([np.array([[0, 10, 20, 30, 40]])] * 2)
    ds = make_dataset(frames, bits_stored=12, frames=2, modality="CT")
    shared, frame0, frame1 = Dataset(), Dataset(), Dataset()
    shared.FrameVOILUTSequence = [_functional_group(WindowCenter=20, WindowWidth=40)]
    frame0.PixelValueTransformationSequence = [_functional_group(
        RescaleSlope=1, RescaleIntercept=0, RescaleType="US")]
    frame1.PixelValueTransformationSequence = [_functional_group(
        RescaleSlope=2, RescaleIntercept=-20, RescaleType="US")]
    frame1.FrameVOILUTSequence = [_functional_group(WindowCenter=30, WindowWidth=20)]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [frame0, frame1]
    out = preprocess_frames(ds, dataclasses.replace(SPEC, frames="all"))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    # frame 1: values -20, 0, 20, 40, 60; its own window [20, 40]
    np.testing.assert_allclose(out[1, 0, 0], [0.0, 0.0, 0.0, 1.0, 1.0], atol=1e-6)


# ----- refusals, from the header alone -----


def _header_only(**changes: object) -> Dataset:
    ds = make_dataset(np.zeros((8, 8)), bits_stored=12)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("changes", "message"), [
    ({"Rows": 0}, "Rows and Columns must be positive"),
    ({"Columns": -1}, "Rows and Columns must be positive"),
    ({"BitsStored": 17}, r"BitsStored 17 must lie in \[1, BitsAllocated=16\]"),
    ({"BitsAllocated": 32}, "BitsAllocated 32 is not supported"),
    ({"BitsAllocated": 1}, "BitsAllocated 1 is not supported"),
    ({"PixelRepresentation": 2}, "PixelRepresentation must be 0"),
    ({"NumberOfFrames": 0}, "NumberOfFrames must be >= 1"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "PALETTE COLOR is not supported"),
    ({"PhotometricInterpretation": "RGB"}, "RGB with 1 samples per pixel"),
    ({"SamplesPerPixel": 3}, "MONOCHROME2 with 3 samples per pixel"),
])
def test_bad_headers_are_refused_with_a_clear_message(changes: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(PreprocessError, match=message):
        preprocess(_header_only(**changes), SPEC)


def test_size_limit_is_checked_before_decoding() -> None:
    ds = _header_only(Rows=4000, Columns=4000, NumberOfFrames=100)
    ds.PixelData = b""  # decoding would fail differently: the limit must come first
    with pytest.raises(PreprocessError, match=r"3200000000 bytes .* exceeds the limit of"):
        check_image_header(ds, SPEC)
    small = make_dataset(np.zeros((64, 64)), bits_stored=12)  # 8192 bytes decoded
    check_image_header(small, SPEC, PixelLimits(max_decoded_bytes=8192))
    with pytest.raises(PreprocessError, match=r"8192 bytes .* limit of 8191 bytes"):
        preprocess(small, SPEC, limits=PixelLimits(max_decoded_bytes=8191))


# Syntaxes nothing installed decodes (JPEG 2000 Part 2 multi-component, MPEG-2, HEVC) or the
# contract does not take (HTJ2K), and a UID that names no transfer syntax.
@pytest.mark.parametrize("syntax", [uid.JPEG2000MCLossless, uid.HTJ2KLossless, uid.MPEG2MPML,
                                    uid.HEVCMP51, "1.2.3.4.5"])
def test_unsupported_transfer_syntax_is_named(syntax: str) -> None:
    ds = _header_only()
    ds.file_meta.TransferSyntaxUID = syntax
    name = uid.UID(syntax).name if uid.UID(syntax).is_transfer_syntax else "unknown"
    pattern = f"transfer syntax {re.escape(syntax)} \\({re.escape(name)}\\) is not supported; "
    with pytest.raises(PreprocessError, match=pattern + "supported: Implicit VR"):
        preprocess(ds, SPEC)


def test_missing_transfer_syntax() -> None:
    ds = _header_only()
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PreprocessError, match=r"no Transfer Syntax UID \(0002,0010\)"):
        preprocess(ds, SPEC)


def test_jpeg_baseline_with_16_bit_samples_is_refused() -> None:
    ds = _header_only()
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    with pytest.raises(PreprocessError, match="JPEG Baseline holds 8-bit samples"):
        preprocess(ds, SPEC)


def test_3d_model_needs_frames() -> None:
    spec = dataclasses.replace(SPEC, depth=8)
    with pytest.raises(PreprocessError, match="3-D model needs a multi-frame instance"):
        preprocess(_header_only(), spec)


def test_short_native_pixel_data_is_a_decode_error() -> None:
    ds = make_dataset(np.zeros((8, 8), np.uint16), bits_stored=12, frames=1)
    ds.NumberOfFrames = 3  # header promises 3 frames, data holds 1
    with pytest.raises(PreprocessError, match="cannot decode pixel data"):
        preprocess(ds, dataclasses.replace(SPEC, frames="all"))


# ----- manifest options -----


def _manifest_dict() -> dict[str, object]:
    return json.loads(json.dumps(TINY_MANIFEST.to_dict()))  # type: ignore[no-any-return]


def test_manifest_voi_and_frames_round_trip_and_default() -> None:
    m = dataclasses.replace(TINY_MANIFEST, input=dataclasses.replace(
        TINY_MANIFEST.input, voi="lut", frames="all"))
    assert Manifest.from_dict(m.to_dict()) == m
    old = _manifest_dict()
    del old["input"]["voi"], old["input"]["frames"]  # type: ignore[attr-defined]
    loaded = Manifest.from_dict(old)
    assert loaded.input.voi == "window" and loaded.input.frames == "middle"


@pytest.mark.parametrize(("key", "value"), [("voi", "auto"), ("frames", "first"),
                                             ("voi", 3)])
def test_manifest_rejects_unknown_options(key: str, value: object) -> None:
    data = _manifest_dict()
    data["input"][key] = value  # type: ignore[index]
    with pytest.raises(ManifestError, match=f"manifest.input.{key}"):
        Manifest.from_dict(data)
