"""Synthetic chest-radiograph-like DICOM data for the demo and the tests.

Nothing can be downloaded at run time, so the demo trains on data made here: 12-bit CR images
with lung fields, mediastinum, ribs, smooth anatomy variation and noise, half of them with a
small, faint round lesion in a lung. The lesion is kept faint on purpose: the task must not
saturate (validation AUC well below 1.0), or no quantization damage could ever show.
All patient data is fake and says so.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; defaults give a task a small DenseNet learns to AUC ~0.9."""

    size: int = 256
    noise: float = 0.035
    lesion_contrast: tuple[float, float] = (0.08, 0.20)
    lesion_sigma: tuple[float, float] = (5.0, 10.0)


def write_labels(out_dir: Path, header: tuple[str, str], rows: list[tuple[str, Any]]) -> None:
    """The labels.csv that optimizer.dataset reads beside the files it lists."""
    with (out_dir / LABELS_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def radiograph(rng: np.random.Generator, lesion: bool, cfg: SynthConfig) -> np.ndarray:
    """One image, float in ~[0, 1], larger = more attenuation (brighter, MONOCHROME2)."""
    return radiograph_with_mask(rng, int(lesion), cfg)[0]


def radiograph_with_mask(
    rng: np.random.Generator, lesions: int, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray]:
    """An image with ``lesions`` lesions and its lesion mask (where a lesion reaches half its
    peak), the ground truth for segmentation."""
    n = cfg.size
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j].astype(np.float32)
    dx, dy = rng.normal(0, 0.03, 2)
    scale = rng.uniform(0.9, 1.1)
    body = np.clip(1.0 - ((x - dx) / 0.95) ** 2 - ((y - dy) / 1.05) ** 2, 0, 1) ** 0.35
    img = 0.15 + 0.45 * body
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        cx, cy = side * 0.42 * scale + dx, -0.05 + dy
        ax, ay = 0.30 * scale, 0.62 * scale
        lungs += np.clip(1.0 - ((x - cx) / ax) ** 2 - ((y - cy) / ay) ** 2, 0, 1) ** 0.5
    img -= 0.28 * lungs
    img += 0.18 * np.exp(-((x - dx) ** 2) / 0.02) * (y > -0.7)  # mediastinum and spine
    ribs = 0.5 + 0.5 * np.sin(18.0 * (y - 0.35 * x**2) + rng.uniform(0, 2 * np.pi))
    img += 0.05 * (ribs**6) * (lungs > 0)
    for _ in range(6):  # smooth, patient-specific anatomy
        bx, by = rng.uniform(-0.8, 0.8, 2)
        img += rng.normal(0, 0.025) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / 0.08)
    mask = np.zeros((n, n), dtype=np.uint8)
    for _ in range(lesions):
        ys, xs = np.nonzero(lungs > 0.5)
        k = rng.integers(len(ys))
        sigma = rng.uniform(*cfg.lesion_sigma)
        amp = rng.uniform(*cfg.lesion_contrast)
        yy, xx = np.mgrid[0:n, 0:n]
        blob = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * sigma**2))
        img += amp * blob
        mask |= (blob >= 0.5).astype(np.uint8)
    img += rng.normal(0, cfg.noise, img.shape).astype(np.float32)
    return np.asarray(img, dtype=np.float32), mask


def to_dataset(
    pixels: np.ndarray,
    rng: np.random.Generator,
    index: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """Wrap an image as a CR instance with realistic headers and obviously fake patient data."""
    stored = np.clip(np.round(pixels * 4095.0), 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = UID(study_uid) if study_uid else generate_uid()
    ds.SeriesInstanceUID = UID(series_uid) if series_uid else generate_uid()
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    ds.PatientName = f"FAKE^SYNTHETIC^{index:05d}"
    ds.PatientID = f"SYN{index:07d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.AccessionNumber = f"ACC{index:07d}"
    ds.StudyID = str(index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = "FAKE^REFERRER"
    ds.Manufacturer = "Bedside synthetic"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    return ds


def write_labelled_set(
    out_dir: Path, count: int, seed: int, cfg: SynthConfig | None = None
) -> list[tuple[str, int]]:
    """Write ``count`` single-instance studies, half with a lesion, and a labels.csv beside them."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    for i in range(count):
        label = i % 2
        ds = to_dataset(radiograph(rng, bool(label), cfg), rng, index=seed * 100_000 + i)
        name = f"img{i:05d}.dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
        rows.append((name, label))
    write_labels(out_dir, ("file", "label"), rows)
    return rows


def write_segmentation_set(
    out_dir: Path, count: int, seed: int, cfg: SynthConfig | None = None
) -> None:
    """``count`` instances with 0-2 lesions each, a lesion mask (.npy) per instance, and a
    labels.csv (columns file,mask)."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img, mask = radiograph_with_mask(rng, i % 3, cfg)
        name = f"img{i:05d}"
        to_dataset(img, rng, index=seed * 100_000 + i).save_as(
            out_dir / f"{name}.dcm", enforce_file_format=True)
        np.save(out_dir / f"{name}.mask.npy", mask[None])
        rows.append((f"{name}.dcm", f"{name}.mask.npy"))
    write_labels(out_dir, ("file", "mask"), rows)


def write_study(
    out_dir: Path, instances: int, lesion: bool, seed: int, cfg: SynthConfig | None = None
) -> list[Path]:
    """One study (one series) of ``instances`` CR images, as a modality would send it."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for i in range(instances):
        ds = to_dataset(
            radiograph(rng, lesion, cfg), rng, index=900_000 + seed, study_uid=study_uid,
            series_uid=series_uid, instance_number=i + 1,
        )
        path = out_dir / f"instance{i + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
