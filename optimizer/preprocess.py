"""Manifest-driven preprocessing: a DICOM instance becomes the model's input tensor.

This one function is used for training, calibration, validation and serving, so the optimizer
calibrates and verifies on exactly what the gateway will feed the model.
Order (PS3.3 C.11): modality LUT -> VOI window -> MONOCHROME1 inversion -> resize -> normalise.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from optimizer.errors import PreprocessError
from optimizer.manifest import InputSpec

# Refuse absurd images before decoding anything: 64 Mpixel per frame is beyond any radiograph.
MAX_PIXELS_PER_FRAME = 8192 * 8192


def check_image_header(ds: Dataset, spec: InputSpec) -> None:
    """Reject what cannot become a model input, using the header alone (cheap, before decode)."""
    if "PixelData" not in ds:
        raise PreprocessError("the instance has no Pixel Data (7FE0,0010)")
    modality = str(ds.get("Modality", "")).strip()
    if modality not in spec.modalities:
        allowed = ", ".join(spec.modalities)
        raise PreprocessError(f"modality {modality or '(none)'} is not one of {allowed}")
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise PreprocessError("Rows and Columns must be positive")
    if rows * cols > MAX_PIXELS_PER_FRAME:
        raise PreprocessError(f"image of {rows}x{cols} pixels exceeds the limit")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise PreprocessError(f"multi-frame instances ({frames} frames) are not supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise PreprocessError(f"{samples} samples per pixel: only greyscale images are supported")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values as a 2-D array, or a PreprocessError that says why not."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        raise PreprocessError(f"cannot decode pixel data: {exc}") from exc
    if pixels.ndim != 2:
        raise PreprocessError(f"expected a 2-D image, got shape {pixels.shape}")
    return pixels


def voi_window(ds: Dataset, spec: InputSpec, values: np.ndarray) -> tuple[float, float]:
    """(low, high) in modality units: the manifest's window, else the instance's, else min/max."""
    if spec.window is not None:
        center, width = spec.window.center, spec.window.width
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center = _first(ds.WindowCenter)
        width = _first(ds.WindowWidth)
        if width <= 0:
            raise PreprocessError("WindowWidth must be positive")
    else:
        low, high = float(values.min()), float(values.max())
        return low, high if high > low else low + 1.0
    return center - width / 2.0, center + width / 2.0


def _first(value: object) -> float:
    if isinstance(value, list | tuple | MultiValue):
        value = next(iter(value))
    return float(value)  # type: ignore[arg-type]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaged downscale by the integer part of the ratio, then bilinear to the exact size.

    Plain bilinear on a 4x downscale aliases small structures, which is what lesions are.
    """
    img = image.astype(np.float32, copy=False)
    fy, fx = img.shape[0] // height, img.shape[1] // width
    if fy >= 2 or fx >= 2:
        fy, fx = max(fy, 1), max(fx, 1)
        h2, w2 = (img.shape[0] // fy) * fy, (img.shape[1] // fx) * fx
        img = img[:h2, :w2].reshape(h2 // fy, fy, w2 // fx, fx).mean(axis=(1, 3))
    if img.shape == (height, width):
        return img
    ys = (np.arange(height, dtype=np.float32) + 0.5) * (img.shape[0] / height) - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) * (img.shape[1] / width) - 0.5
    ys = np.clip(ys, 0, img.shape[0] - 1)
    xs = np.clip(xs, 0, img.shape[1] - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, img.shape[0] - 1)
    x1 = np.minimum(x0 + 1, img.shape[1] - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def preprocess(ds: Dataset, spec: InputSpec, header_checked: bool = False) -> np.ndarray:
    """One instance -> float32 array of shape ``spec.shape``; ``header_checked`` skips the
    header checks a caller (the gateway, before its acknowledgement) has already run."""
    try:
        if not header_checked:
            check_image_header(ds, spec)
        return _preprocess(ds, spec)
    except PreprocessError:
        raise
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # pydicom converts raw values lazily: a malformed number (WindowCenter "abc",
        # RescaleSlope "x") surfaces here, not at read time.
        raise PreprocessError(f"malformed header value: {exc}") from exc


def _preprocess(ds: Dataset, spec: InputSpec) -> np.ndarray:
    stored = decode_pixels(ds)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    low, high = voi_window(ds, spec, values)
    image = np.clip((values - low) / (high - low), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 1.0 - image
    image = resize(image, spec.height, spec.width)
    image = (image - spec.normalize.mean) / spec.normalize.std
    return np.broadcast_to(image, spec.shape).astype(np.float32)
