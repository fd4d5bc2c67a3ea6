"""Every transfer syntax, photometric interpretation, bit depth and sign the preprocessing
reads, built by real encoders and checked against the original pixels (exactly where the
compression is lossless, within the codec's bound where it is not)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space

from optimizer.contract.manifest import Normalize
from optimizer.contract.preprocess import decode_frames, preprocess, preprocess_frames
from tests.conftest import TINY_MANIFEST
from tests.optimizer.pixel_data import jpeg_baseline, make_dataset, roundtrip, smooth_image

ROWS, COLS = 64, 48
NATIVE = [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian,
          uid.DeflatedExplicitVRLittleEndian]
LOSSLESS = [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless]
# A spec that keeps the source geometry and leaves [0, 1] values as they are.
UNIT = dataclasses.replace(TINY_MANIFEST.input, height=ROWS, width=COLS, voi="minmax",
                           modalities=("CR", "OT"), normalize=Normalize(mean=0.0, std=1.0))


def _all_frames(ds: Dataset) -> np.ndarray:
    return decode_frames(ds, list(range(int(ds.get("NumberOfFrames", 1)))))


def _error(decoded: np.ndarray, original: np.ndarray) -> np.ndarray:
    return np.abs(decoded.astype(np.int64) - original.astype(np.int64))


# (bits allocated, bits stored, signed, value range)
DEPTHS = [
    (16, 12, False, (0, 4095)),
    (16, 12, True, (-2048, 2047)),
    (16, 16, False, (0, 65535)),
    (16, 16, True, (-32768, 32767)),
    (8, 8, False, (0, 255)),
    (8, 8, True, (-128, 127)),
]


# Big endian differs from little endian only for 16-bit samples.
GREY_CASES = [(syntax, depth) for syntax in [*NATIVE, uid.ExplicitVRBigEndian, *LOSSLESS]
              for depth in DEPTHS if not (syntax == uid.ExplicitVRBigEndian and depth[0] == 8)]


@pytest.mark.parametrize(("syntax", "depth"), GREY_CASES,
                         ids=[f"{uid.UID(s).keyword}-{d[0]}-{d[1]}-{'s' if d[2] else 'u'}"
                              for s, d in GREY_CASES])
def test_lossless_greyscale_is_exact(tmp_path: Path, syntax: str,
                                     depth: tuple[int, int, bool, tuple[int, int]]) -> None:
    allocated, stored, signed, (lo, hi) = depth
    original = smooth_image(ROWS, COLS, lo, hi)
    ds = roundtrip(make_dataset(original, bits_allocated=allocated, bits_stored=stored,
                                signed=signed), tmp_path / "x.dcm", syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    decoded = decode_frames(ds, [0])[0]
    assert decoded.dtype.kind == ("i" if signed else "u")
    np.testing.assert_array_equal(decoded, original)
    # and through the whole pipeline: min..max scaling of the exact values
    np.testing.assert_allclose(preprocess(ds, UNIT)[0], (original - lo) / (hi - lo), atol=1e-6)


def test_deflated_file_is_really_deflated(tmp_path: Path) -> None:
    original = smooth_image(ROWS, COLS, 0, 4095)
    roundtrip(make_dataset(original, bits_stored=12), tmp_path / "d.dcm",
              uid.DeflatedExplicitVRLittleEndian)
    raw = (tmp_path / "d.dcm").read_bytes()
    assert original.astype(np.uint16).tobytes()[:256] not in raw
    assert len(raw) < original.size * 2


@pytest.mark.parametrize("depth", [(16, 12, False, (0, 4095)), (16, 16, True, (-20000, 20000)),
                                   (8, 8, False, (0, 255)), (16, 12, True, (-1000, 1000))],
                         ids=["12u", "16s", "8u", "12s"])
def test_jpeg_ls_near_lossless_within_its_bound(
        tmp_path: Path, depth: tuple[int, int, bool, tuple[int, int]]) -> None:
    # Signed data that reaches both ends of its range wraps in near-lossless JPEG-LS (the codec
    # sees two's complement as unsigned): an encoder-side limit, so ranges stay inside.
    allocated, stored, signed, (lo, hi) = depth
    original = smooth_image(ROWS, COLS, lo, hi)
    ds = roundtrip(make_dataset(original, bits_allocated=allocated, bits_stored=stored,
                                signed=signed), tmp_path / "x.dcm", uid.JPEGLSNearLossless,
                   jls_error=3)
    err = _error(decode_frames(ds, [0])[0], original)
    assert 0 < err.max() <= 3  # lossy, and never beyond NEAR


@pytest.mark.parametrize("depth", [(16, 12, False, (0, 4095)), (16, 16, True, (-20000, 20000)),
                                   (8, 8, False, (0, 255))], ids=["12u", "16s", "8u"])
def test_jpeg_2000_lossy_within_tolerance(
        tmp_path: Path, depth: tuple[int, int, bool, tuple[int, int]]) -> None:
    allocated, stored, signed, (lo, hi) = depth
    original = smooth_image(ROWS, COLS, lo, hi)
    ds = roundtrip(make_dataset(original, bits_allocated=allocated, bits_stored=stored,
                                signed=signed), tmp_path / "x.dcm", uid.JPEG2000, j2k_cr=[10])
    err = _error(decode_frames(ds, [0])[0], original) / (hi - lo)
    assert 0 < err.max() < 0.05 and err.mean() < 0.01


def test_jpeg_baseline_greyscale_from_dcmtk(tmp_path: Path) -> None:
    original = smooth_image(ROWS, COLS, 0, 255)
    ds = jpeg_baseline(make_dataset(original, bits_allocated=8), tmp_path / "j.dcm")
    err = _error(decode_frames(ds, [0])[0], original)
    assert 0 < err.max() <= 12 and err.mean() < 2.0
    out = preprocess(ds, dataclasses.replace(UNIT, voi="window"))[0]
    assert out.shape == (ROWS, COLS) and out.min() >= 0.0 and out.max() <= 1.0


def _rgb() -> np.ndarray:
    return np.stack([smooth_image(ROWS, COLS, 0, 255, seed=s) for s in range(3)], axis=-1)


@pytest.mark.parametrize("syntax", [*NATIVE, *LOSSLESS], ids=lambda s: uid.UID(s).keyword)
def test_rgb_lossless_is_exact(tmp_path: Path, syntax: str) -> None:
    original = _rgb()
    ds = roundtrip(make_dataset(original, photometric="RGB", bits_allocated=8),
                   tmp_path / "c.dcm", syntax)
    np.testing.assert_array_equal(decode_frames(ds, [0])[0], original)


def test_rgb_planar_configuration_1(tmp_path: Path) -> None:
    original = _rgb()
    ds = make_dataset(original, photometric="RGB", bits_allocated=8)
    ds.PlanarConfiguration = 1
    ds.PixelData = original.astype(np.uint8).transpose(2, 0, 1).tobytes()
    ds = roundtrip(ds, tmp_path / "p.dcm")
    np.testing.assert_array_equal(decode_frames(ds, [0])[0], original)


def test_ybr_full_native_becomes_rgb(tmp_path: Path) -> None:
    original = _rgb()
    ybr = convert_color_space(original.astype(np.uint8), "RGB", "YBR_FULL")
    ds = roundtrip(make_dataset(ybr, photometric="YBR_FULL", bits_allocated=8),
                   tmp_path / "y.dcm")
    assert _error(decode_frames(ds, [0])[0], original).max() <= 2  # 8-bit rounding twice


def test_ybr_rct_jpeg_2000_becomes_rgb(tmp_path: Path) -> None:
    original = _rgb()
    ds = make_dataset(original, photometric="RGB", bits_allocated=8)
    ds = roundtrip(ds, tmp_path / "r.dcm", uid.JPEG2000Lossless)
    ds.PhotometricInterpretation = "YBR_RCT"  # what a modality writes for MCT codestreams
    np.testing.assert_array_equal(decode_frames(ds, [0])[0], original)


def test_jpeg_baseline_rgb_is_ybr_full_422_and_decodes_to_rgb(tmp_path: Path) -> None:
    original = _rgb()
    ds = jpeg_baseline(make_dataset(original, photometric="RGB", bits_allocated=8),
                       tmp_path / "jc.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    err = _error(decode_frames(ds, [0])[0], original)
    assert 0 < err.max() <= 24 and err.mean() < 2.5


def test_colour_to_one_or_three_channels(tmp_path: Path) -> None:
    pixels = np.zeros((ROWS, COLS, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    pixels[:, : COLS // 2, 2] = 51  # left half: a little blue
    ds = roundtrip(make_dataset(pixels, photometric="RGB", bits_allocated=8), tmp_path / "c.dcm")
    grey = preprocess(ds, UNIT)
    assert grey.shape == (1, ROWS, COLS)
    np.testing.assert_allclose(grey[0, :, -1], 0.299, atol=1e-6)  # BT.601 luma of red
    np.testing.assert_allclose(grey[0, :, 0], 0.299 + 0.114 * 0.2, atol=1e-6)
    three = preprocess(ds, dataclasses.replace(UNIT, channels=3))
    assert three.shape == (3, ROWS, COLS)
    np.testing.assert_allclose(three[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(three[:, 0, -1], [1.0, 0.0, 0.0], atol=1e-6)
    # colour has no VOI: a manifest window does not touch it
    from optimizer.contract.manifest import Window
    windowed = preprocess(ds, dataclasses.replace(UNIT, channels=3, window=Window(10, 5)))
    np.testing.assert_allclose(windowed, three)


def test_greyscale_to_three_channels_repeats() -> None:
    original = smooth_image(ROWS, COLS, 0, 4095)
    ds = make_dataset(original, bits_stored=12)
    out = preprocess(ds, dataclasses.replace(UNIT, channels=3))
    assert out.shape == (3, ROWS, COLS)
    np.testing.assert_array_equal(out[0], out[2])


# ----- multi-frame -----

FRAMES = 5


def _multiframe(tmp_path: Path, syntax: str) -> tuple[Dataset, np.ndarray]:
    frames = np.stack([np.full((ROWS, COLS), 100 * (f + 1)) for f in range(FRAMES)])
    frames[:, 0, 0] = 0  # min 0 in every frame, max = 100 * (f + 1)
    frames[:, -1, -1] = 1000
    ds = roundtrip(make_dataset(frames, bits_stored=12, frames=FRAMES, modality="OT"),
                   tmp_path / "mf.dcm", syntax)
    return ds, frames


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless,
                                    uid.JPEGLSLossless, uid.JPEG2000Lossless],
                         ids=lambda s: uid.UID(s).keyword)
def test_multiframe_decodes_every_frame_exactly(tmp_path: Path, syntax: str) -> None:
    ds, frames = _multiframe(tmp_path, syntax)
    np.testing.assert_array_equal(_all_frames(ds), frames)
    np.testing.assert_array_equal(decode_frames(ds, [3])[0], frames[3])  # one frame alone


def test_multiframe_2d_model_takes_the_middle_frame(tmp_path: Path) -> None:
    ds, _ = _multiframe(tmp_path, uid.RLELossless)
    out = preprocess(ds, UNIT)  # middle: frame index 5 // 2 = 2, value 300 in [0, 1000]
    np.testing.assert_allclose(out[0, 10, 10], 0.3, atol=1e-6)


def test_multiframe_all_frames_gives_one_input_per_frame(tmp_path: Path) -> None:
    ds, _ = _multiframe(tmp_path, uid.JPEG2000Lossless)
    spec = dataclasses.replace(UNIT, frames="all")
    batch = preprocess_frames(ds, spec)
    assert batch.shape == (FRAMES, 1, ROWS, COLS)
    np.testing.assert_allclose(batch[:, 0, 10, 10], [0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-6)
    with pytest.raises(Exception, match="use preprocess_frames"):
        preprocess(ds, spec)


def test_multiframe_is_the_volume_of_a_3d_model(tmp_path: Path) -> None:
    ds, _ = _multiframe(tmp_path, uid.ExplicitVRLittleEndian)
    ds.NumberOfFrames = 4  # four frames of 100..400: depth 2 averages pairs
    ds.PixelData = ds.PixelData[: 4 * ROWS * COLS * 2]
    spec = dataclasses.replace(UNIT, depth=2, height=32, width=24)
    volume = preprocess(ds, spec)
    assert volume.shape == (1, 2, 32, 24)
    # min..max spans the volume ([0, 1000]); slices (100+200)/2 and (300+400)/2
    np.testing.assert_allclose(volume[0, :, 10, 10], [0.15, 0.35], atol=1e-6)
    up = preprocess(ds, dataclasses.replace(spec, depth=8))
    assert up.shape == (1, 8, 32, 24)
    assert np.all(np.diff(up[0, :, 10, 10]) >= 0)
    np.testing.assert_allclose(up[0, [0, -1], 10, 10], [0.1, 0.4], atol=1e-6)
