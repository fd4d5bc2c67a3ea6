"""JPEG Lossless (process 14, and its selection value 1) and JPEG Extended (8 and 12 bit),
compressed by dcmtk's dcmcjpeg and decoded by GDCM in its helper process: lossless bit-exact to
the uncompressed pixels, extended equal to dcmtk's own decoder (dcmdjpeg) and within the
codec's bound of the original; a stream that makes GDCM abort its process ends in a
PreprocessError, and the next decode works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from optimizer.contract.errors import PreprocessError
from optimizer.contract.gdcm_decode import IsolatedDecoder, pixel_module
from optimizer.contract.preprocess import decode_frames, preprocess
from tests.optimizer.contract.test_preprocess_formats import (
    COLS,
    DEPTHS,
    ROWS,
    UNIT,
    _all_frames,
    _error,
    _rgb,
)
from tests.optimizer.pixel_data import dcmcjpeg, dcmdjpeg, make_dataset, smooth_image

ROOT = Path(__file__).resolve().parents[3]
ABORTS_GDCM = ROOT / "tests" / "fuzz_corpus" / "gdcm" / \
    "bad_pixels--jpeg-lossless-sv1-frame-that-aborts-gdcm.dcm"
LOSSLESS = ["+e1", "+el"]
CASES = [(process, depth) for process in LOSSLESS for depth in DEPTHS]


@pytest.mark.parametrize(("process", "depth"), CASES,
                         ids=[f"{p}-{d[0]}-{d[1]}-{'s' if d[2] else 'u'}" for p, d in CASES])
def test_jpeg_lossless_is_bit_exact(tmp_path: Path, process: str,
                                    depth: tuple[int, int, bool, tuple[int, int]]) -> None:
    allocated, stored, signed, (lo, hi) = depth
    original = smooth_image(ROWS, COLS, lo, hi)
    ds = dcmcjpeg(make_dataset(original, bits_allocated=allocated, bits_stored=stored,
                               signed=signed), tmp_path / "l.dcm", process)
    decoded = decode_frames(ds, [0])[0]
    assert decoded.dtype.kind == ("i" if signed else "u")
    np.testing.assert_array_equal(decoded, original)
    np.testing.assert_allclose(preprocess(ds, UNIT)[0], (original - lo) / (hi - lo), atol=1e-6)


def test_jpeg_lossless_multiframe_every_frame_and_one_alone(tmp_path: Path) -> None:
    frames = smooth_image(ROWS, COLS, 0, 4095, frames=5)
    ds = dcmcjpeg(make_dataset(frames, bits_stored=12, frames=5, modality="OT"),
                  tmp_path / "mf.dcm", "+e1")
    np.testing.assert_array_equal(_all_frames(ds), frames)
    np.testing.assert_array_equal(decode_frames(ds, [3])[0], frames[3])


@pytest.mark.parametrize("process", LOSSLESS)
def test_jpeg_lossless_rgb_is_exact(tmp_path: Path, process: str) -> None:
    original = _rgb()
    ds = dcmcjpeg(make_dataset(original, photometric="RGB", bits_allocated=8),
                  tmp_path / "c.dcm", process)
    np.testing.assert_array_equal(decode_frames(ds, [0])[0], original)


@pytest.mark.parametrize(("allocated", "stored", "hi", "bound", "mean_bound"),
                         [(16, 12, 4095, 40, 5.0), (8, 8, 255, 8, 2.0)], ids=["12-bit", "8-bit"])
def test_jpeg_extended_equals_dcmtk_and_stays_near_the_original(
        tmp_path: Path, allocated: int, stored: int, hi: int, bound: int,
        mean_bound: float) -> None:
    original = smooth_image(ROWS, COLS, 0, hi)
    ds = dcmcjpeg(make_dataset(original, bits_allocated=allocated, bits_stored=stored),
                  tmp_path / "e.dcm", "+ee")
    assert int(ds.BitsStored) == stored
    decoded = decode_frames(ds, [0])[0]
    np.testing.assert_array_equal(decoded, dcmdjpeg(tmp_path / "e.dcm").pixel_array)
    err = _error(decoded, original)
    assert 0 < err.max() <= bound and err.mean() < mean_bound  # lossy, and close


def test_the_helper_gets_the_pixel_module_alone(tmp_path: Path) -> None:
    ds = dcmcjpeg(make_dataset(smooth_image(ROWS, COLS, 0, 4095), bits_stored=12),
                  tmp_path / "p.dcm", "+e1")
    sent = pixel_module(ds)
    assert {e.keyword for e in sent} <= {"Rows", "Columns", "SamplesPerPixel",
                                         "PhotometricInterpretation", "BitsAllocated",
                                         "BitsStored", "HighBit", "PixelRepresentation",
                                         "PixelData"}
    assert "PatientName" in ds and "SOPInstanceUID" in ds  # what stays behind
    assert [e.keyword for e in sent.file_meta] == ["TransferSyntaxUID"]


def test_a_stream_that_aborts_gdcm_ends_in_an_error_and_the_next_decode_works(
        tmp_path: Path) -> None:
    # in-process, pydicom's GDCM plugin takes the whole process down with it (SIGABRT):
    # this is why GDCM runs in a helper
    crash = subprocess.run(
        [sys.executable, "-c", "import sys, pydicom; from pydicom.pixels import pixel_array; "
         "pixel_array(pydicom.dcmread(sys.argv[1]), decoding_plugin='gdcm')",
         str(ABORTS_GDCM)], capture_output=True, timeout=60)
    assert crash.returncode < 0, crash.stderr[-300:]
    decoder = IsolatedDecoder()
    try:
        bad = pydicom.dcmread(ABORTS_GDCM)
        assert bad.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
        with pytest.raises(Exception, match=r"JPEG decoder failed .*corrupt JPEG stream"):
            decoder.decode(bad, [0], all_frames=True)
        original = smooth_image(ROWS, COLS, 0, 4095)
        good = dcmcjpeg(make_dataset(original, bits_stored=12), tmp_path / "g.dcm", "+e1")
        np.testing.assert_array_equal(decoder.decode(good, [0], all_frames=True)[0], original)
    finally:
        decoder.close()
    with pytest.raises(PreprocessError, match=r"cannot decode pixel data \(JPEG Lossless SV1"):
        decode_frames(bad, [0])  # and through the contract, on the shared helper


def test_a_decoder_that_overruns_is_stopped(tmp_path: Path) -> None:
    ds = dcmcjpeg(make_dataset(smooth_image(ROWS, COLS, 0, 4095), bits_stored=12),
                  tmp_path / "t.dcm", "+e1")
    decoder = IsolatedDecoder(timeout_s=0.0)  # no time at all: the answer cannot be there
    try:
        with pytest.raises(Exception, match="took longer than 0 s"):
            decoder.decode(ds, [0], all_frames=True)
    finally:
        decoder.close()


@pytest.mark.parametrize("process", ["+e1", "+ee"])
def test_mutated_jpeg_frames_end_in_pixels_or_a_preprocess_error(tmp_path: Path,
                                                                 process: str) -> None:
    """Flipped, truncated and inserted bytes (a fixed seed): each decode returns the header's
    shape or raises PreprocessError; whatever GDCM does, this process carries on."""
    import random

    from pydicom.encaps import encapsulate, generate_frames

    ds = dcmcjpeg(make_dataset(smooth_image(ROWS, COLS, 0, 4095), bits_stored=12),
                  tmp_path / "m.dcm", process)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    rng = random.Random(20261126)
    outcomes = {"pixels": 0, "error": 0}
    for _ in range(150):
        data = bytearray(frame)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[:rng.randrange(len(data))]
        else:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        ds.PixelData = encapsulate([bytes(data)])
        try:
            assert decode_frames(ds, [0]).shape == (1, ROWS, COLS)
            outcomes["pixels"] += 1
        except PreprocessError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and sum(outcomes.values()) == 150, outcomes


def test_concurrent_callers_each_get_their_own_frames(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from optimizer.contract.gdcm_decode import DecoderPool

    images = [smooth_image(ROWS, COLS, 0, 4095, seed=k) for k in range(6)]
    files = [dcmcjpeg(make_dataset(image, bits_stored=12), tmp_path / f"c{k}.dcm", "+e1")
             for k, image in enumerate(images)]
    pool = DecoderPool(2)
    try:
        with ThreadPoolExecutor(4) as threads:
            decoded = list(threads.map(lambda ds: pool.decode(ds, [0], True)[0], files * 3))
    finally:
        pool.close()
    for k, array in enumerate(decoded):
        np.testing.assert_array_equal(array, images[k % 6])
    with pytest.raises(ValueError, match="at least one helper"):
        DecoderPool(0)


def test_gdcm_never_decodes_in_this_process(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other syntax keeps its pinned decoder (pydicom would try GDCM first for all of
    them), and the GDCM ones go to the helper: GDCM in this process is never called."""
    from pydicom.pixels.decoders import base

    from tests.optimizer.pixel_data import jpeg_baseline, roundtrip

    called: list[str] = []

    def spy(src: bytes, runner: object) -> bytes:
        called.append(str(getattr(runner, "transfer_syntax", "")))
        raise AssertionError("GDCM decoded in the caller's process")

    for decoder in (base.JPEGBaseline8BitDecoder, base.JPEGLSLosslessDecoder,
                    base.JPEGLSNearLosslessDecoder, base.JPEG2000LosslessDecoder,
                    base.JPEG2000Decoder, base.JPEGLosslessSV1Decoder,
                    base.JPEGLosslessDecoder, base.JPEGExtended12BitDecoder):
        assert "gdcm" in decoder._available  # installed: pydicom would use it
        monkeypatch.setitem(decoder._available, "gdcm", spy)
    grey = make_dataset(smooth_image(ROWS, COLS, 0, 255), bits_allocated=8)
    instances = [jpeg_baseline(grey, tmp_path / "b.dcm"),
                 dcmcjpeg(grey, tmp_path / "e1.dcm", "+e1"),
                 dcmcjpeg(grey, tmp_path / "el.dcm", "+el"),
                 dcmcjpeg(grey, tmp_path / "ee.dcm", "+ee")]
    instances += [roundtrip(grey, tmp_path / f"{k}.dcm", syntax, **options)
                  for k, (syntax, options) in enumerate([
                      (uid.JPEGLSLossless, {}), (uid.JPEGLSNearLossless, {"jls_error": 2}),
                      (uid.JPEG2000Lossless, {}), (uid.JPEG2000, {"j2k_cr": [10]})])]
    for ds in instances:
        assert decode_frames(ds, [0]).shape == (1, ROWS, COLS)
    assert called == []
