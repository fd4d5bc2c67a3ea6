"""A series as one model input: the volume from slices, and slice order from the plane
functional groups of enhanced multi-frame objects."""

from __future__ import annotations

import dataclasses

import numpy as np
from pydicom.dataset import Dataset

from optimizer.contract.manifest import Window
from optimizer.contract.preprocess import preprocess
from optimizer.contract.series import orientation, series_volume, slice_input, slice_order
from tests.conftest import TINY_MANIFEST
from tests.optimizer.pixel_data import make_dataset, smooth_image

SPEC_3D = dataclasses.replace(TINY_MANIFEST.input, depth=8,
                              window=Window(center=2000.0, width=4000.0))


def test_a_series_and_a_multiframe_instance_of_the_same_frames_make_the_same_volume() -> None:
    base = smooth_image(96, 80, 0, 2000, seed=3)
    frames = np.stack([base + 400 * k for k in range(5)])  # brighter with each frame
    multi = make_dataset(frames, frames=5)
    slices = [make_dataset(frame) for frame in frames]
    volume = series_volume([slice_input(ds, SPEC_3D) for ds in slices], 8)
    assert volume.shape == (1, 1, 8, 64, 64) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume, preprocess(multi, SPEC_3D)[None])
    means = volume[0, 0].mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0)  # slice order kept along the depth axis
    # in another order the volume differs: the comparison above sees the order
    shuffled = series_volume([slice_input(ds, SPEC_3D) for ds in reversed(slices)], 8)
    assert not np.allclose(shuffled, volume)


def _enhanced(z: float, *, shared_orientation: bool) -> Dataset:
    """An enhanced-style instance whose plane lies only in its functional groups."""
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint16))
    plane = Dataset()
    plane.PlanePositionSequence = [Dataset()]
    plane.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, z]
    orient = Dataset()
    orient.PlaneOrientationSequence = [Dataset()]
    orient.PlaneOrientationSequence[0].ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    if shared_orientation:
        ds.SharedFunctionalGroupsSequence = [orient]
        ds.PerFrameFunctionalGroupsSequence = [plane]
    else:
        plane.PlaneOrientationSequence = orient.PlaneOrientationSequence
        ds.PerFrameFunctionalGroupsSequence = [plane]
    ds.InstanceNumber = 1  # equal numbers: only the positions can order them
    return ds


def test_slice_order_and_orientation_from_plane_functional_groups() -> None:
    series = [_enhanced(z, shared_orientation=k % 2 == 0)
              for k, z in enumerate((12.0, -4.0, 30.0, 0.5))]
    assert [orientation(ds) for ds in series] == ["axial"] * 4
    assert slice_order(series) == [1, 3, 0, 2]
    del series[0].PerFrameFunctionalGroupsSequence  # one position missing: instance numbers
    assert slice_order(series) == [0, 1, 2, 3]
