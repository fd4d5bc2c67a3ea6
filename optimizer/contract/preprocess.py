"""Manifest-driven preprocessing: a DICOM instance becomes the model's input tensor.

This one module is used for training, calibration, validation and serving, so the optimizer
calibrates and verifies on exactly what the gateway will feed the model.

Order for greyscale images (PS3.3 C.11): modality LUT (Rescale Slope/Intercept or a Modality
LUT Sequence, per frame from the functional groups of enhanced objects) -> VOI (the manifest's
fixed window, else the instance's window or VOI LUT Sequence per ``InputSpec.voi``, else the
modality values' min..max) -> MONOCHROME1 inversion -> resize -> normalise. Colour images (RGB,
and YBR_* as the decoders hand them back, converted to RGB) have no modality or VOI transform:
they are scaled by their bit depth, then made grey (ITU-R BT.601 luma) for one-channel models.

Multi-frame instances: a 2-D model takes the middle frame (``frames: "middle"``, frame index
``frames // 2``) or every frame (``frames: "all"``, one model input per frame, see
``preprocess_frames``); for a 3-D model the frames are the volume, resampled to its depth.

Everything that can be refused from the header alone (transfer syntax, photometric
interpretation, bit depths, sizes) is refused by ``check_image_header`` before any decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import numpy as np
from pydicom import uid
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.tag import Tag

from optimizer.contract.errors import PixelLimitExceeded, PreprocessError, UnsupportedTransferSyntax
from optimizer.contract.gdcm_decode import PLUGINS as GDCM_PLUGINS
from optimizer.contract.gdcm_decode import decode_isolated
from optimizer.contract.manifest import InputSpec

# Refuse absurd images before decoding anything: 64 Mpixel per frame is beyond any radiograph.
MAX_PIXELS_PER_FRAME = 8192 * 8192

# What the project's environment decodes, and with which of pydicom's decoder plugins: pydicom
# alone (native and RLE), pillow (JPEG baseline), pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG
# 2000), GDCM (python-gdcm: JPEG lossless processes 14 and 14 SV1, JPEG extended 8 and 12 bit).
# Each syntax is pinned to one plugin: GDCM, which pydicom would otherwise try first for every
# JPEG syntax, runs only where nothing else decodes, and only in a child process
# (``gdcm_decode``: a corrupt stream can make it end the process). Other syntaxes (MPEG, HEVC,
# JPEG 2000 Part 2, HTJ2K...) are refused by name.
SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    uid.ImplicitVRLittleEndian: "Implicit VR Little Endian",
    uid.ExplicitVRLittleEndian: "Explicit VR Little Endian",
    uid.DeflatedExplicitVRLittleEndian: "Deflated Explicit VR Little Endian",
    uid.ExplicitVRBigEndian: "Explicit VR Big Endian",
    uid.RLELossless: "RLE Lossless",
    uid.JPEGBaseline8Bit: "JPEG Baseline (Process 1)",
    uid.JPEGExtended12Bit: "JPEG Extended (Process 2 and 4, 8 and 12 bit)",
    uid.JPEGLossless: "JPEG Lossless (Process 14)",
    uid.JPEGLosslessSV1: "JPEG Lossless SV1 (Process 14, Selection Value 1)",
    uid.JPEGLSLossless: "JPEG-LS Lossless",
    uid.JPEGLSNearLossless: "JPEG-LS Near-Lossless",
    uid.JPEG2000Lossless: "JPEG 2000 Lossless",
    uid.JPEG2000: "JPEG 2000",
}
# pydicom decoder plugin per compressed syntax decoded in this process ("" = pydicom's own).
IN_PROCESS_PLUGINS: dict[str, str] = {
    uid.RLELossless: "",
    uid.JPEGBaseline8Bit: "pillow",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
    uid.JPEG2000Lossless: "pylibjpeg",
    uid.JPEG2000: "pylibjpeg",
}
GREY = ("MONOCHROME1", "MONOCHROME2")
# YBR_* are converted to RGB by pydicom (native data) or by the JPEG decoders.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


@dataclass(frozen=True)
class PixelLimits:
    """Upper bounds checked on the header before decoding (a deployment setting, not the
    model's): decoded size of the whole instance, and pixels in one frame."""

    max_decoded_bytes: int = 1 << 30
    max_pixels_per_frame: int = MAX_PIXELS_PER_FRAME

    def __post_init__(self) -> None:
        if self.max_decoded_bytes < 1 or self.max_pixels_per_frame < 1:
            raise ValueError("pixel limits must be positive")


DEFAULT_LIMITS = PixelLimits()


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise PreprocessError(f"the instance has no {keyword}")
        return default
    return int(value)


def transfer_syntax(ds: Dataset) -> uid.UID:
    """The instance's transfer syntax, or a PreprocessError naming the one we cannot decode."""
    meta = getattr(ds, "file_meta", None)
    ts = None if meta is None else meta.get("TransferSyntaxUID")
    if not ts:
        raise PreprocessError("the instance has no Transfer Syntax UID (0002,0010)")
    ts = uid.UID(str(ts))
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        # a garbled value is not echoed back: only a well-formed UID is quoted
        shown = f"{ts} ({ts.name if ts.is_transfer_syntax else 'unknown'})" if ts.is_valid \
            else "(not a valid UID)"
        raise UnsupportedTransferSyntax(
            f"transfer syntax {shown} is not supported; supported: "
            + ", ".join(SUPPORTED_TRANSFER_SYNTAXES.values()))
    return ts


def check_image_header(ds: Dataset, spec: InputSpec,
                       limits: PixelLimits = DEFAULT_LIMITS) -> None:
    """Reject what cannot become a model input, using the header alone (cheap, before decode)."""
    if "PixelData" not in ds:
        raise PreprocessError("the instance has no Pixel Data (7FE0,0010)")
    modality = str(ds.get("Modality", "")).strip()
    if modality not in spec.modalities:
        allowed = ", ".join(spec.modalities)
        raise PreprocessError(f"modality {modality or '(none)'} is not one of {allowed}")
    ts = transfer_syntax(ds)
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise PreprocessError("Rows and Columns must be positive")
    if rows * cols > limits.max_pixels_per_frame:
        raise PixelLimitExceeded(f"image of {rows}x{cols} pixels exceeds the limit "
                              f"({limits.max_pixels_per_frame} pixels per frame)")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise PreprocessError(f"NumberOfFrames must be >= 1, got {frames}")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in GREY:
        if samples != 1:
            raise PreprocessError(f"{photometric} with {samples} samples per pixel (needs 1)")
    elif photometric in COLOUR:
        if samples != 3:
            raise PreprocessError(f"{photometric} with {samples} samples per pixel (needs 3)")
    else:
        raise PreprocessError(
            f"photometric interpretation {photometric or '(none)'} is not supported; "
            "supported: " + ", ".join(GREY + COLOUR))
    allocated = _int(ds, "BitsAllocated")
    stored = _int(ds, "BitsStored", allocated)
    if allocated not in (8, 16):
        raise PreprocessError(f"BitsAllocated {allocated} is not supported (8 or 16)")
    if not 1 <= stored <= allocated:
        raise PreprocessError(f"BitsStored {stored} must lie in [1, BitsAllocated={allocated}]")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise PreprocessError("PixelRepresentation must be 0 (unsigned) or 1 (signed)")
    if ts == uid.JPEGBaseline8Bit and allocated != 8:
        raise PreprocessError(f"JPEG Baseline holds 8-bit samples, BitsAllocated is {allocated}")
    decoded = rows * cols * frames * samples * (allocated // 8)
    if decoded > limits.max_decoded_bytes:
        raise PixelLimitExceeded(
            f"decoded pixel data would be {decoded} bytes ({frames} frame(s) of {rows}x{cols}"
            f"x{samples} at {allocated} bits), which exceeds the limit of "
            f"{limits.max_decoded_bytes} bytes")
    if spec.depth is not None and frames < 2:
        raise PreprocessError("a 3-D model needs a multi-frame instance (the frames form the "
                              "volume); this instance has one frame")


def frame_indices(ds: Dataset, spec: InputSpec) -> list[int]:
    """The 0-based frames that become model input: all of them for 3-D models and for
    ``frames: "all"``, else the middle one (``frames // 2``)."""
    frames = _int(ds, "NumberOfFrames", 1)
    if spec.depth is not None or spec.frames == "all":
        return list(range(frames))
    return [frames // 2]


def _check_jpeg_ls_ends(ds: Dataset, frames: int) -> None:
    """CharLS spends tens of seconds on a truncated JPEG-LS stream before it fails (found by
    tests/fuzz: a 3 KB instance held a worker for 20 s), so every frame must end with its
    end-of-image marker (FFD9, then at most padding) before it is decoded."""
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        if not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise PreprocessError(f"JPEG-LS frame {k + 1} is truncated (no end-of-image "
                                  "marker)")


def decode_frames(ds: Dataset, indices: list[int]) -> np.ndarray:
    """The stored values of the given frames: (n, rows, cols) or (n, rows, cols, 3) for colour
    (YBR converted to RGB), or a PreprocessError that says why not."""
    ts = transfer_syntax(ds)
    frames = _int(ds, "NumberOfFrames", 1)
    plugin = IN_PROCESS_PLUGINS.get(ts, "")
    try:
        if ts in (uid.JPEGLSLossless, uid.JPEGLSNearLossless):
            _check_jpeg_ls_ends(ds, frames)
        if ts in GDCM_PLUGINS:
            arr = decode_isolated(ds, indices, all_frames=len(indices) == frames)
        elif len(indices) == frames:
            arr = pixel_array(ds, as_rgb=True, decoding_plugin=plugin)
            if frames == 1:
                arr = arr[None]
        else:
            arr = np.stack([pixel_array(ds, index=i, as_rgb=True, decoding_plugin=plugin)
                            for i in indices])
    except PreprocessError:
        raise
    except Exception as exc:  # decoders raise many types for bad pixel data
        raise PreprocessError(
            f"cannot decode pixel data ({SUPPORTED_TRANSFER_SYNTAXES.get(ts, ts)}): {exc}"
        ) from exc
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    expected = (len(indices), rows, cols) + ((3,) if samples == 3 else ())
    if arr.shape != expected:
        raise PreprocessError(f"decoded pixel data has shape {arr.shape}, header says "
                              f"{expected}")
    return arr


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values of a single-frame greyscale instance as a 2-D array."""
    arr = decode_frames(ds, [0])
    if arr.ndim != 3:
        raise PreprocessError(f"expected a greyscale image, got shape {arr.shape[1:]}")
    return arr[0]


def functional_group(ds: Dataset, keyword: str, frame: int = 0) -> Dataset | None:
    """An enhanced multi-frame object's functional group macro ``keyword`` for one frame: the
    per-frame item if it has one, else the shared one; None when neither holds it."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(keyword)
            if inner:
                return inner[0]
    return None


def modality_values(ds: Dataset, stored: np.ndarray, frame: int = 0) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units) for one frame."""
    item = functional_group(ds, "PixelValueTransformationSequence", frame)
    if item is not None and "RescaleSlope" in item:
        slope = float(item.RescaleSlope)
        intercept = float(item.get("RescaleIntercept", 0.0))
        return stored.astype(np.float64) * slope + intercept
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)


def _first(value: object) -> float:
    if isinstance(value, list | tuple | MultiValue):
        value = next(iter(value))
    return float(value)  # type: ignore[arg-type]


def _window(source: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The instance's Window Center/Width applied, in [0, 1]; None if it has none.

    LINEAR is taken as c +/- w/2 (LINEAR_EXACT): the DICOM LINEAR form differs by under one
    part in the width and would shift every model trained before this module existed."""
    if "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    center, width = _first(source.WindowCenter), _first(source.WindowWidth)
    if width <= 0:
        raise PreprocessError("WindowWidth must be positive")
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function in ("LINEAR", "LINEAR_EXACT"):
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    raise PreprocessError(f"VOILUTFunction {function} is not supported")


def _voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first item of the instance's VOI LUT Sequence applied, scaled to [0, 1] by the
    LUT's declared bit depth (PS3.3 C.11.2.1.1); None if it has none."""
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise PreprocessError("VOI LUT Descriptor must have 3 values")
    entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    if not 8 <= bits <= 16:
        raise PreprocessError(f"VOI LUT entries of {bits} bits are not supported")
    if first >= 32768 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        first -= 65536  # the descriptor's US/SS ambiguity: signed data maps from a negative
    raw = item.LUTData
    if isinstance(raw, bytes):
        big = ds.file_meta.get("TransferSyntaxUID") == uid.ExplicitVRBigEndian
        lut = np.frombuffer(raw, dtype=">u2" if big else "<u2")
    else:
        lut = np.asarray(list(raw) if isinstance(raw, MultiValue | list) else [raw])
    if lut.size < entries:
        raise PreprocessError(f"VOI LUT Data has {lut.size} entries, descriptor says {entries}")
    index = np.clip(np.round(values).astype(np.int64) - first, 0, entries - 1)
    return lut[:entries].astype(np.float64)[index] / float(2**bits - 1)


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low if high > low else 1.0)


def voi_window(ds: Dataset, spec: InputSpec, values: np.ndarray) -> tuple[float, float]:
    """(low, high) in modality units of a linear window: the manifest's, else the instance's,
    else min/max. Kept for callers that want the bounds; ``to_unit`` applies the full VOI."""
    if spec.window is not None:
        return (spec.window.center - spec.window.width / 2.0,
                spec.window.center + spec.window.width / 2.0)
    if spec.voi != "minmax" and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width <= 0:
            raise PreprocessError("WindowWidth must be positive")
        return center - width / 2.0, center + width / 2.0
    low, high = float(values.min()), float(values.max())
    return low, high if high > low else low + 1.0


def grey_to_unit(ds: Dataset, spec: InputSpec, stored: np.ndarray,
                 indices: list[int]) -> np.ndarray:
    """Greyscale stored frames (n, rows, cols) -> displayed values in [0, 1] (1 = bright):
    modality LUT, VOI, MONOCHROME1 inversion. Min/max scaling spans all n frames."""
    values = np.stack([modality_values(ds, stored[i], f) for i, f in enumerate(indices)])
    if spec.window is not None:
        low = spec.window.center - spec.window.width / 2.0
        unit = np.clip((values - low) / spec.window.width, 0.0, 1.0)
    elif spec.voi == "minmax":
        unit = _minmax(values)
    else:
        out: list[np.ndarray] = []
        for i, f in enumerate(indices):
            source = functional_group(ds, "FrameVOILUTSequence", f) or ds
            if spec.voi == "window":
                mapped = _window(source, values[i])
                if mapped is None:
                    mapped = _voi_lut(ds, values[i])
            else:
                mapped = _voi_lut(ds, values[i])
                if mapped is None:
                    mapped = _window(source, values[i])
            if mapped is None:
                out = []
                break
            out.append(mapped)
        unit = np.stack(out) if out else _minmax(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


# The fast path below serves native (uncompressed, little-endian) greyscale data whose display
# transform is per pixel: every stored code value maps to one unit value whatever the other
# pixels are. Then modality LUT + VOI + inversion, worked out in float64 for all 2**BitsAllocated
# code values once by the very functions above (``pixel_array``'s decoding, ``grey_to_unit``),
# becomes one float32 table, and an image costs one lookup per pixel instead of several float64
# passes over it: equal bit for bit, since each of those steps is elementwise. Not served here
# (they take the reference path): compressed or big-endian data, colour, enhanced objects
# (per-frame functional groups), Modality/VOI LUT Sequences, the SIGMOID VOI function, and
# min/max scaling (manifest ``voi: minmax``, or an instance with no window), which depends on
# the image's own values.
_NATIVE_LE = (uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian,
              uid.DeflatedExplicitVRLittleEndian)
# Header elements the table depends on, copied into the tiny data set it is built from.
_LUT_ELEMENTS = ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "SamplesPerPixel", "PhotometricInterpretation", "RescaleSlope",
                 "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction")
_NOT_PER_PIXEL = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
                  "ModalityLUTSequence", "VOILUTSequence")
# As tags: a keyword lookup per element costs more than the rest of the key together.
_LUT_TAGS = tuple(Tag(k) for k in _LUT_ELEMENTS)
_NOT_PER_PIXEL_TAGS = tuple(Tag(k) for k in _NOT_PER_PIXEL)
LUT_CACHE_SIZE = 32  # distinct headers (each table: 2**16 float32, 256 KiB)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, MultiValue | list) else value


def _key_item(element: DataElement | RawDataElement) -> tuple[Any, ...]:
    """One header element as the key holds it: as read (its bytes and encoding), when pydicom
    has not converted it yet (converting costs more than the table lookup saves), else its
    value. Either way ``_unit_lut`` rebuilds the element the dataset has."""
    if isinstance(element, RawDataElement):
        return ("raw", element.tag, element.VR, element.value, element.is_implicit_VR,
                element.is_little_endian)
    return ("value", element.tag, element.VR, _frozen(element.value))


def _lut_key(ds: Dataset, spec: InputSpec) -> tuple[Any, ...] | None:
    """The per-pixel table's whole input, hashable; None when the instance is not for the fast
    path (see above). Raises on a malformed value (the caller then takes the reference path)."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts not in _NATIVE_LE or any(t in ds for t in _NOT_PER_PIXEL_TAGS):
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip() not in GREY:
        return None
    if _int(ds, "BitsAllocated") not in (8, 16) or _int(ds, "SamplesPerPixel", 1) != 1:
        return None
    if spec.window is None:
        if spec.voi == "minmax" or "WindowCenter" not in ds or "WindowWidth" not in ds:
            return None
        if str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper() not in (
                "LINEAR", "LINEAR_EXACT"):
            return None
    elements = tuple(_key_item(ds.get_item(tag)) for tag in _LUT_TAGS if tag in ds)
    return (str(ts), spec.window, spec.voi, elements)


@lru_cache(maxsize=LUT_CACHE_SIZE)
def _unit_lut(key: tuple[Any, ...], spec: InputSpec) -> np.ndarray:
    """Code value (the raw little-endian word or byte) -> unit value, float32, for every code
    value; built only from ``key`` (so the cache cannot mix up two headers)."""
    ts, _, _, elements = key
    tiny = Dataset()
    tiny.file_meta = FileMetaDataset()
    tiny.file_meta.TransferSyntaxUID = uid.UID(ts)
    for kind, tag, vr, value, *encoding in elements:
        if kind == "raw":
            implicit, little = encoding
            tiny[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, little)
        else:
            tiny.add_new(tag, vr, list(value) if isinstance(value, tuple) else value)
    bits = _int(tiny, "BitsAllocated")
    side = 256 if bits == 16 else 16  # 2**bits code values as a square image
    tiny.Rows = tiny.Columns = side
    codes = np.arange(2**bits, dtype="<u2" if bits == 16 else np.uint8)
    tiny.PixelData = codes.tobytes()
    stored = pixel_array(tiny)  # pydicom's own decoding: sign, unused high bits
    unit = grey_to_unit(tiny, spec, stored.reshape(1, 1, -1), [0])
    table = np.ascontiguousarray(unit.reshape(-1))
    table.flags.writeable = False  # shared by every caller (and thread) through the cache
    return table


def native_grey_unit(ds: Dataset, spec: InputSpec, indices: list[int]) -> np.ndarray | None:
    """``grey_to_unit(ds, spec, decode_frames(ds, indices), indices)`` by table lookup, equal
    bit for bit; None when the instance is not for this path (see above)."""
    try:
        key = _lut_key(ds, spec)
        if key is None:
            return None
        lut = _unit_lut(key, spec)
    except Exception:  # a malformed value: the reference path says what is wrong with it
        return None
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1)
    dtype = np.dtype("<u2") if lut.size == 65536 else np.dtype(np.uint8)
    count = frames * rows * cols
    data = ds.PixelData
    if len(data) < count * dtype.itemsize:
        return None  # truncated: the reference path's decoder says so
    codes = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, cols)
    picked = codes if len(indices) == frames else codes[indices]
    return lut.take(cast("np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]]", picked))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaged downscale by the integer part of the ratio, then bilinear to the exact size.

    Plain bilinear on a 4x downscale aliases small structures, which is what lesions are.
    """
    img = image.astype(np.float32, copy=False)
    fy, fx = img.shape[0] // height, img.shape[1] // width
    if fy >= 2 or fx >= 2:
        fy, fx = max(fy, 1), max(fx, 1)
        h2, w2 = (img.shape[0] // fy) * fy, (img.shape[1] // fx) * fx
        # Rows summed in blocks of fy, then columns in blocks of fx: the same block means as
        # one mean over both axes of a 4-D view, about 5x faster on a 512x512 image. The sums
        # are strided adds in the order numpy's reductions add (row k of a block after rows
        # 0..k-1; columns likewise while fx < 8, past which numpy sums pairwise, so its own
        # reduction is kept): equal bit for bit to ``sum(axis=...)``, and half the time.
        rows = img[0:h2:fy, :w2].copy()
        for k in range(1, fy):
            rows += img[k:h2:fy, :w2]
        if fx < 8:
            block = rows[:, 0:w2:fx].copy()
            for k in range(1, fx):
                block += rows[:, k:w2:fx]
        else:
            block = rows.reshape(h2 // fy, w2 // fx, fx).sum(axis=2)
        img = block / np.float32(fy * fx)
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
    upper, lower = img[y0], img[y1]  # each source row gathered once, not twice
    top = upper[:, x0] * (1 - wx) + upper[:, x1] * wx
    bottom = lower[:, x0] * (1 - wx) + lower[:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _channels(unit: np.ndarray, colour: bool, channels: int) -> np.ndarray:
    """(n, rows, cols[, 3]) in [0, 1] -> (n, channels, rows, cols)."""
    if colour:
        if channels == 1:
            return np.tensordot(unit, LUMA, axes=([3], [0]))[:, None].astype(np.float32)
        return np.ascontiguousarray(unit.transpose(0, 3, 1, 2))
    if channels == 1:
        return unit[:, None]  # a view: the copy np.repeat makes is not needed
    return np.repeat(unit[:, None], channels, axis=1)


def preprocess_frames(ds: Dataset, spec: InputSpec, header_checked: bool = False,
                      limits: PixelLimits = DEFAULT_LIMITS,
                      reference: bool = False) -> np.ndarray:
    """One instance -> float32 model inputs of shape ``(n, *spec.shape)``: n = 1, except for a
    2-D model with ``frames: "all"``, where n is the instance's number of frames.
    ``reference``: skip the table-lookup fast path (``native_grey_unit``), whose output is the
    same bit for bit; for the tests that check that, and the CPU benchmark."""
    try:
        if not header_checked:
            check_image_header(ds, spec, limits)
        return _preprocess(ds, spec, reference)
    except PreprocessError:
        raise
    except (ValueError, TypeError, AttributeError, OverflowError, KeyError,
            NotImplementedError) as exc:
        # pydicom converts raw values lazily: a malformed number (WindowCenter "abc",
        # RescaleSlope "x") surfaces here, not at read time; so does an element whose VR
        # bytes were damaged (pydicom: "Unknown Value Representation", found by tests/fuzz).
        raise PreprocessError(f"malformed header value: {exc}") from exc


def preprocess(ds: Dataset, spec: InputSpec, header_checked: bool = False,
               limits: PixelLimits = DEFAULT_LIMITS) -> np.ndarray:
    """One instance -> float32 array of shape ``spec.shape``; ``header_checked`` skips the
    header checks a caller (the gateway, before its acknowledgement) has already run."""
    batch = preprocess_frames(ds, spec, header_checked, limits)
    if batch.shape[0] != 1:
        raise PreprocessError(f"{batch.shape[0]} frames make {batch.shape[0]} model inputs "
                              "(frames: all); use preprocess_frames")
    return batch[0]


def _preprocess(ds: Dataset, spec: InputSpec, reference: bool = False) -> np.ndarray:
    indices = frame_indices(ds, spec)
    fast = None if reference else native_grey_unit(ds, spec, indices)
    colour = False
    if fast is not None:
        unit = fast
    else:
        stored = decode_frames(ds, indices)
        colour = stored.ndim == 4
        if colour:
            bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated"))
            unit = stored.astype(np.float32) / float(2**bits - 1)
        else:
            unit = grey_to_unit(ds, spec, stored, indices)
    planes = _channels(unit, colour, spec.channels)  # (n, C, rows, cols)
    n, c = planes.shape[:2]
    out = np.empty((n, c, spec.height, spec.width), dtype=np.float32)
    for i in range(n):
        for k in range(c):
            out[i, k] = resize(planes[i, k], spec.height, spec.width)
    out = (out - spec.normalize.mean) / spec.normalize.std
    if spec.depth is not None:  # the frames are the volume: resample along the slices
        return stack_volume(out, spec.depth)
    return out.astype(np.float32)


def stack_volume(planes: np.ndarray, depth: int) -> np.ndarray:
    """Preprocessed planes (n, C, H, W), in slice order -> one 3-D model input
    (1, C, depth, H, W), resampled along the slices (area-averaged, then linear, as ``resize``).

    The frames of one multi-frame instance and the slices of a series
    (``optimizer.contract.series``) become a volume through this one function."""
    n, c, h, w = planes.shape
    volume = resize(planes.reshape(n, -1), depth, c * h * w).reshape(depth, c, h, w)
    return np.ascontiguousarray(volume.transpose(1, 0, 2, 3))[None].astype(np.float32)
