from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from optimizer.contract.errors import PreprocessError
from optimizer.contract.manifest import Normalize, Window
from optimizer.contract.preprocess import preprocess, resize
from optimizer.synthetic import to_dataset
from tests.conftest import TINY_MANIFEST

SPEC = TINY_MANIFEST.input


def _ds(pixels: np.ndarray):  # type: ignore[no-untyped-def]
    return to_dataset(pixels, np.random.default_rng(0), index=1)


def test_window_then_normalise_maps_known_values() -> None:
    spec = dataclasses.replace(SPEC, height=2, width=2, window=Window(center=1000, width=1000),
                               normalize=Normalize(mean=0.0, std=1.0))
    ds = _ds(np.zeros((2, 2), np.float32))
    stored = np.array([[0, 500], [1000, 4000]], dtype=np.uint16)
    ds.PixelData = stored.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -500  # modality LUT: 2*v - 500
    out = preprocess(ds, spec)[0]
    # modality values: -500, 500, 1500, 7500; window [500, 1500]
    np.testing.assert_allclose(out, [[0.0, 0.0], [1.0, 1.0]], atol=1e-6)


def test_dicom_voi_window_used_when_manifest_has_none() -> None:
    spec = dataclasses.replace(SPEC, height=1, width=2, normalize=Normalize(mean=0.0, std=1.0))
    ds = _ds(np.zeros((1, 2), np.float32))
    ds.PixelData = np.array([[100, 300]], dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 200, 400
    np.testing.assert_allclose(preprocess(ds, spec)[0], [[0.25, 0.75]], atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    spec = dataclasses.replace(SPEC, height=4, width=4)
    ds = _ds(np.random.default_rng(1).random((4, 4)).astype(np.float32))
    mono2 = preprocess(ds, spec)
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = preprocess(ds, spec)
    n = spec.normalize
    np.testing.assert_allclose(mono1 * n.std + n.mean, 1.0 - (mono2 * n.std + n.mean),
                               atol=1e-5)


def test_resize_averages_areas_and_keeps_constants() -> None:
    img = np.zeros((4, 4), np.float32)
    img[:2, :2] = 4.0
    np.testing.assert_allclose(resize(img, 2, 2), [[4.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(resize(np.full((7, 5), 3.0, np.float32), 3, 11), 3.0)


def test_output_shape_and_dtype() -> None:
    x = preprocess(_ds(np.random.default_rng(2).random((256, 256)).astype(np.float32)), SPEC)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32


def test_no_pixel_data() -> None:
    ds = _ds(np.zeros((8, 8), np.float32))
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no Pixel Data"):
        preprocess(ds, SPEC)


def test_wrong_modality() -> None:
    ds = _ds(np.zeros((8, 8), np.float32))
    ds.Modality = "MR"
    with pytest.raises(PreprocessError, match="modality MR is not one of CR, DX"):
        preprocess(ds, SPEC)


def test_absurd_dimensions_refused_before_decoding() -> None:
    ds = _ds(np.zeros((8, 8), np.float32))
    ds.Rows, ds.Columns = 60000, 60000
    with pytest.raises(PreprocessError, match="exceeds the limit"):
        preprocess(ds, SPEC)


def test_truncated_pixel_data() -> None:
    ds = _ds(np.zeros((64, 64), np.float32))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(PreprocessError, match="cannot decode pixel data"):
        preprocess(ds, SPEC)


@pytest.mark.parametrize(("shape", "out"), [((512, 512), (64, 64)), ((515, 389), (128, 96)),
                                            ((300, 1024), (100, 128))])
def test_resize_block_means_match_a_plain_mean_per_block(shape: tuple[int, int],
                                                         out: tuple[int, int]) -> None:
    """The fast area step (row sums, then column sums) against a per-block mean written out."""
    img = np.random.default_rng(0).random(shape, dtype=np.float32) * 4000.0
    fy, fx = shape[0] // out[0], shape[1] // out[1]
    h2, w2 = shape[0] // fy, shape[1] // fx
    blocks = np.array([[img[i * fy:(i + 1) * fy, j * fx:(j + 1) * fx].mean()
                        for j in range(w2)] for i in range(h2)], dtype=np.float32)
    if blocks.shape == out:
        np.testing.assert_allclose(resize(img, *out), blocks, rtol=1e-5)
    else:  # the bilinear step follows; a constant image must stay constant through both
        assert resize(np.full(shape, 7.0, np.float32), *out).shape == out
        np.testing.assert_allclose(resize(np.full(shape, 7.0, np.float32), *out), 7.0,
                                   rtol=1e-6)
