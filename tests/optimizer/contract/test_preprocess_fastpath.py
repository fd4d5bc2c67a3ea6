"""The serving fast paths of preprocessing are the reference, bit for bit: the per-pixel table
(``native_grey_unit``) against pydicom's decoding + the float64 modality/VOI chain, and the
strided block sums of ``resize`` against the numpy reductions they replace. Random raw words
include set unused high bits and negative signed values, so decoding corner cases count."""

from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from optimizer.contract.manifest import Normalize, Window
from optimizer.contract.preprocess import (
    decode_frames,
    frame_indices,
    grey_to_unit,
    native_grey_unit,
    preprocess_frames,
    resize,
)
from tests.conftest import TINY_MANIFEST
from tests.optimizer.pixel_data import make_dataset

SPEC = dataclasses.replace(TINY_MANIFEST.input, height=16, width=12,
                           modalities=("CR", "CT", "OT"),
                           normalize=Normalize(mean=0.3, std=0.7))


def _instance(rng: np.random.Generator, bits: int, stored: int, signed: bool,
              frames: int = 1, rows: int = 40, cols: int = 36) -> Dataset:
    """Raw words drawn over the whole allocated range (unused high bits set too)."""
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    ds = make_dataset(np.zeros(shape, np.int64), bits_allocated=bits, bits_stored=stored,
                      signed=signed, frames=frames)
    words = rng.integers(0, 2**bits, size=frames * rows * cols)
    ds.PixelData = words.astype("<u2" if bits == 16 else np.uint8).tobytes()
    return ds


HEADERS = [  # (bits allocated, bits stored, signed, slope, intercept, window c/w, function)
    (16, 12, False, 1, 0, (2048, 4096), None),
    (16, 12, False, 1, 0, (1000, 300), "LINEAR_EXACT"),
    (16, 16, True, 1, -1024, (40, 400), "LINEAR"),
    (16, 10, True, 2.5, 7, (-50.5, 123.25), None),
    (16, 14, False, 0.37, -3.2, ([300, 500], [900, 1200]), None),
    (8, 8, False, 1, 0, (128, 255), None),
    (8, 6, True, 3, 1, (0, 50), None),
]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("manifest_window", [None, Window(center=700.0, width=2500.0)])
def test_table_lookup_equals_the_reference_bit_for_bit(
        header: tuple, photometric: str, manifest_window: Window | None) -> None:
    bits, stored, signed, slope, intercept, (center, width), function = header
    rng = np.random.default_rng(bits * 100 + stored)
    ds = _instance(rng, bits, stored, signed)
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center, width
    if function is not None:
        ds.VOILUTFunction = function
    spec = dataclasses.replace(SPEC, window=manifest_window)
    fast = native_grey_unit(ds, spec, [0])
    reference = grey_to_unit(ds, spec, decode_frames(ds, [0]), [0])
    assert fast is not None and fast.dtype == reference.dtype == np.float32
    assert np.array_equal(fast, reference)
    assert np.array_equal(preprocess_frames(ds, spec),
                          preprocess_frames(ds, spec, reference=True))


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                                    uid.DeflatedExplicitVRLittleEndian])
def test_headers_as_read_from_bytes_unconverted(header: tuple, syntax: str) -> None:
    """A data set read from bytes holds its elements unconverted until used: the table is keyed
    by those bytes then, and must still equal the reference (here: on a separate read)."""
    bits, stored, signed, slope, intercept, (center, width), function = header
    ds = _instance(np.random.default_rng(bits + stored), bits, stored, signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center, width
    if function is not None:
        ds.VOILUTFunction = function
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    fresh, other = (pydicom.dcmread(io.BytesIO(buffer.getvalue())) for _ in range(2))
    assert isinstance(fresh.get_item("WindowCenter"), RawDataElement)  # not converted yet
    fast = native_grey_unit(fresh, SPEC, [0])
    assert fast is not None
    assert np.array_equal(fast, grey_to_unit(other, SPEC, decode_frames(other, [0]), [0]))
    assert np.array_equal(native_grey_unit(other, SPEC, [0]), fast)  # converted, other key


@pytest.mark.parametrize("choice", ["middle", "all"])
@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
def test_multi_frame_and_both_native_syntaxes(choice: str, syntax: str) -> None:
    ds = _instance(np.random.default_rng(7), 16, 12, False, frames=5)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.WindowCenter, ds.WindowWidth = 1500, 2000
    spec = dataclasses.replace(SPEC, frames=choice)
    indices = frame_indices(ds, spec)
    fast = native_grey_unit(ds, spec, indices)
    assert fast is not None and fast.shape == (len(indices), 40, 36)
    assert np.array_equal(fast, grey_to_unit(ds, spec, decode_frames(ds, indices), indices))
    assert np.array_equal(preprocess_frames(ds, spec),
                          preprocess_frames(ds, spec, reference=True))


def test_headers_that_differ_only_in_window_get_their_own_table() -> None:
    rng = np.random.default_rng(3)
    outputs = []
    for center in (1000, 1001, 1000):
        ds = _instance(rng, 16, 12, False)
        ds.PixelData = _instance(np.random.default_rng(3), 16, 12, False).PixelData
        ds.WindowCenter, ds.WindowWidth = center, 500
        fast = native_grey_unit(ds, SPEC, [0])
        assert np.array_equal(fast, grey_to_unit(ds, SPEC, decode_frames(ds, [0]), [0]))
        outputs.append(fast)
    assert not np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], outputs[2])


def _lut_sequence(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = list(range(0, 65536, 16))
    ds.VOILUTSequence = [item]


@pytest.mark.parametrize("why", ["minmax", "no window", "sigmoid", "voi lut sequence",
                                 "big endian", "truncated", "colour"])
def test_what_the_table_cannot_serve_takes_the_reference_path(why: str) -> None:
    ds = _instance(np.random.default_rng(5), 16, 12, False)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    spec = SPEC
    if why == "minmax":
        spec = dataclasses.replace(SPEC, voi="minmax")
    elif why == "no window":
        del ds.WindowCenter, ds.WindowWidth
    elif why == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    elif why == "voi lut sequence":
        _lut_sequence(ds)
    elif why == "big endian":
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
    elif why == "truncated":
        ds.PixelData = ds.PixelData[:-2]
    else:
        ds = make_dataset(np.zeros((4, 4, 3), np.uint8), photometric="RGB", bits_allocated=8)
    assert native_grey_unit(ds, spec, [0]) is None


def _resize_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The block sums as numpy reductions (``resize`` before its strided sums)."""
    img = image.astype(np.float32, copy=False)
    fy, fx = max(img.shape[0] // height, 1), max(img.shape[1] // width, 1)
    h2, w2 = (img.shape[0] // fy) * fy, (img.shape[1] // fx) * fx
    rows = img[:h2, :w2].reshape(h2 // fy, fy, w2).sum(axis=1)
    img = rows.reshape(h2 // fy, w2 // fx, fx).sum(axis=2) / np.float32(fy * fx)
    return resize(img, height, width)  # the bilinear step (no block sum left to do)


@pytest.mark.parametrize("shape,size", [
    ((512, 512), (128, 128)), ((512, 512), (224, 224)), ((1024, 1024), (128, 128)),
    ((2048, 2500), (224, 224)), ((300, 500), (100, 100)), ((512, 64), (128, 64)),
    ((64, 512), (64, 128)), ((900, 700), (64, 48)), ((37, 81), (5, 9)),
])
def test_strided_block_sums_equal_numpy_reductions(shape: tuple[int, int],
                                                   size: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] + shape[1])
    # magnitudes spread over ten decades: any change in the order of additions shows
    image = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 7, shape)).astype(np.float32)
    fast, reference = resize(image, *size), _resize_reference(image, *size)
    assert fast.shape == size and np.array_equal(fast, reference)


def test_fast_paths_cover_the_load_tests_radiograph() -> None:
    """The 512x512 12-bit CR the benchmarks send takes the table path at every model size."""
    from loadtests.payloads import Payloads

    ds = Payloads(count=1).dataset()
    for side, channels in itertools.product((128, 224, 256), (1, 3)):
        spec = dataclasses.replace(SPEC, height=side, width=side, channels=channels)
        assert native_grey_unit(ds, spec, [0]) is not None
        assert np.array_equal(preprocess_frames(ds, spec),
                              preprocess_frames(ds, spec, reference=True))
