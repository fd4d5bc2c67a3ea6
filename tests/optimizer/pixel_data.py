"""Builders of DICOM instances in every pixel format the preprocessing reads.

Compressed forms are made by real encoders: pydicom's RLE, pyjpegls (JPEG-LS),
pylibjpeg-openjpeg (JPEG 2000) through ``Dataset.compress``, and dcmtk's ``dcmcjpeg`` for JPEG
baseline, extended and lossless (no Python JPEG encoder writes DICOM). Every instance goes
through a Part-10 file and back, so parsing of each transfer syntax is exercised too.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

SC_IMAGE_STORAGE = uid.UID("1.2.840.10008.5.1.4.1.1.7")
CR_IMAGE_STORAGE = uid.UID("1.2.840.10008.5.1.4.1.1.1")
MULTIFRAME_SC = {8: uid.UID("1.2.840.10008.5.1.4.1.1.7.2"),
                 16: uid.UID("1.2.840.10008.5.1.4.1.1.7.3"),
                 3: uid.UID("1.2.840.10008.5.1.4.1.1.7.4")}
DCMCJPEG = "/usr/bin/dcmcjpeg"


def smooth_image(rows: int, cols: int, lo: int, hi: int, seed: int = 0,
                 frames: int | None = None) -> np.ndarray:
    """Gradients, blobs and mild noise spanning [lo, hi]: realistic for lossy codecs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    out = []
    for f in range(frames or 1):
        img = 0.5 * x / cols + 0.3 * y / rows
        for _ in range(4):
            cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
            img += 0.3 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.02 * rows * cols))
        img += 0.1 * f
        img += rng.normal(0, 0.005, img.shape)
        img = (img - img.min()) / (img.max() - img.min())
        out.append(np.round(lo + img * (hi - lo)))
    arr = np.stack(out)
    return arr if frames else arr[0]


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                 bits_allocated: int = 16, bits_stored: int | None = None,
                 signed: bool = False, frames: int = 1, modality: str = "CR") -> Dataset:
    """An uncompressed (Explicit VR Little Endian) instance holding ``pixels``:
    (rows, cols), (rows, cols, 3), or with a leading frame axis when ``frames > 1``."""
    bits_stored = bits_stored or bits_allocated
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    kind = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16,
            (16, True): np.int16}[(bits_allocated, signed)]
    arr = np.asarray(pixels).astype(kind)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    if frames > 1:  # the multi-frame SC classes: byte, word, true colour
        sop_class = MULTIFRAME_SC[(3 if colour else bits_allocated)]
    else:
        sop_class = SC_IMAGE_STORAGE if colour else CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "FAKE^FORMATS", "FMT0001"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACCFMT", "FAKE^REF"
    ds.Manufacturer = "Bedside synthetic"
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ["L", "F"]
    if sop_class != CR_IMAGE_STORAGE:
        ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    if frames > 1:
        ds.NumberOfFrames = frames
        rows, cols = arr.shape[1:3]
    else:
        rows, cols = arr.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.tobytes()
    return ds


def roundtrip(ds: Dataset, path: Path, syntax: str = uid.ExplicitVRLittleEndian,
              **compress_options: object) -> Dataset:
    """``ds`` encoded in ``syntax`` (native syntaxes written as such), through a file."""
    ds = copy.deepcopy(ds)
    syntax = uid.UID(syntax)
    if syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False, **compress_options)  # type: ignore[arg-type]
    else:
        if syntax == uid.ExplicitVRBigEndian:  # pydicom writes OW bytes as they are
            assert ds.BitsAllocated == 16
            ds.PixelData = np.frombuffer(ds.PixelData, "<u2").byteswap().tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True,
               implicit_vr=syntax == uid.ImplicitVRLittleEndian,
               little_endian=syntax != uid.ExplicitVRBigEndian)
    return pydicom.dcmread(path)


def jpeg_baseline(ds: Dataset, path: Path, quality: int = 95) -> Dataset:
    """``ds`` (8-bit) compressed with dcmtk's dcmcjpeg in JPEG baseline (process 1)."""
    src = path.with_suffix(".src.dcm")
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([DCMCJPEG, "+eb", "+q", str(quality), str(src), str(path)], check=True,
                   capture_output=True, env={"TCP_NODELAY": "1"})
    out = pydicom.dcmread(path)
    assert out.file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    return out


DCMDJPEG = "/usr/bin/dcmdjpeg"
DCMCJPEG_SYNTAX = {"+e1": uid.JPEGLosslessSV1, "+el": uid.JPEGLossless,
                   "+ee": uid.JPEGExtended12Bit}


def dcmcjpeg(ds: Dataset, path: Path, process: str) -> Dataset:
    """``ds`` compressed with dcmtk's dcmcjpeg: ``process`` "+e1" (lossless SV1), "+el"
    (lossless, process 14) or "+ee" (extended, process 2/4: 8 or 12 bits)."""
    src = path.with_suffix(".src.dcm")
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([DCMCJPEG, process, str(src), str(path)], check=True, capture_output=True,
                   env={"TCP_NODELAY": "1"})
    out = pydicom.dcmread(path)
    assert out.file_meta.TransferSyntaxUID == DCMCJPEG_SYNTAX[process]
    return out


def dcmdjpeg(path: Path) -> Dataset:
    """The JPEG file at ``path`` as dcmtk's dcmdjpeg decodes it (the reference decoder)."""
    out = path.with_suffix(".dcmdjpeg.dcm")
    subprocess.run([DCMDJPEG, str(path), str(out)], check=True, capture_output=True)
    return pydicom.dcmread(out)
