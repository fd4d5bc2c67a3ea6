"""DIMSE ingest benchmark: durable C-STORE acknowledgement rate, the gateway beside Orthanc.

    .venv/bin/python -m loadtests.bench_ingest [--n 300] [--json out.json] [--replicas]

What runs, all on this machine, in one run:

- N synthetic 512x512 16-bit CT instances (explicit VR little endian, ~525 KB each) written
  once per scenario (each scenario sends its own SOP Instance UIDs, so neither peer ever sees a
  duplicate).
- The sender is dcmtk's ``/usr/bin/storescu`` (TCP_NODELAY=1), over one association, then over
  four concurrent associations (the files split four ways). The figure is wall-clock instances
  per second from the first storescu start to the last exit, every C-STORE answered Success.
- The gateway: ``bedside gateway`` as a subprocess, with the real bundled Triton serving a tiny
  CT classifier built for the run (64x64 input, so inference is cheap but real). While storescu
  sends, the gateway's worker infers the acknowledged instances in the background, sharing the
  CPU, as in service. Before the next measurement the run waits until the gateway has finished
  every instance (spool empty), so nothing of one measurement spills into the next.
- The gateway again with no Triton reachable ("ingest only"): the worker waits with backoff
  behind an open circuit breaker, so storescu competes with nothing but the acknowledgement
  path itself, like Orthanc, which infers nothing. DIMSE keeps acknowledging to the spool while
  Triton is down, so this is a real operating state, not a special mode.
- With ``--replicas``: two gateways inferring on one PostgreSQL job table (Debian postgresql
  15 started for the run) and one shared spool, the files split between them over as many
  associations in all as the most above, beside the one gateway on SQLite of the same run
  (the figure "two replicas on PostgreSQL vs one on SQLite").
- Orthanc: the Debian package with its default durable storage (fsync after each write,
  SQLite index), on its own free ports and a private storage folder.

The gateway overhead percentiles come from the per-instance result timings (the results API,
``timings_ms``): ``gateway_overhead`` minus ``queue`` (arrival to acknowledgement, plus
preprocessing and result encoding; the wait behind earlier instances is left out), and the
queue wait reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from loadtests.stack import GatewayProcess
from optimizer.contract.manifest import (
    AccuracyBudget,
    InputSpec,
    Manifest,
    Normalize,
    OutputSpec,
    Window,
)
from services.net import free_port

STORESCU = Path("/usr/bin/storescu")
SIDE = 512
MODEL = "bench-ct"
MANIFEST = Manifest(
    name=MODEL, version=1, task="classification",
    input=InputSpec(name="image", modalities=("CT",), height=64, width=64, channels=1,
                    window=Window(center=40.0, width=400.0),
                    normalize=Normalize(mean=0.5, std=0.25)),
    output=OutputSpec(name="logits", labels=("finding",), activation="sigmoid",
                      thresholds=(0.5,)),
    accuracy_budget=AccuracyBudget(max_auc_drop=1.0, min_agreement=0.0),
    latency_slo_ms=50.0,
)


# -- data ----------------------------------------------------------------------------------

def ct_instance(pixels: np.ndarray, study: str, series: str, number: int) -> Dataset:
    """One 512x512 CT slice, uint16 stored values, rescale to HU."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Synthetic", "BENCH0001"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "BENCH1"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = series
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = SIDE, SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.tobytes()
    return ds


def synthesize(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` instances of one new study (one series) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(900, 1200, size=(SIDE, SIDE), dtype=np.uint16)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        pixels = base.copy()
        pixels[rng.integers(0, SIDE), :] += 40  # a little variation per slice
        path = folder / f"{k:05d}.dcm"
        ct_instance(pixels, study, series, k + 1).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_repository(root: Path) -> Path:
    """A Triton model repository with a tiny, untrained CT classifier (real ONNX, real Triton)."""
    import torch
    from torch import nn

    from optimizer.export import export_onnx
    from optimizer.repository import ServingOptions, write_repository

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 1))
    onnx_path = export_onnx(model, MANIFEST, root / "onnx" / "model.onnx")
    repo = root / "repository"
    write_repository(repo, MANIFEST, onnx_path, "fp32", ServingOptions(warmup_runs=1))
    return repo


# -- peers ---------------------------------------------------------------------------------

class Gateway(GatewayProcess):
    """``bedside gateway`` subprocess on free ports, against a Triton gRPC URL (no disk
    watermark: the benchmark's own spool is small and the machine's disk may be full)."""

    def __init__(self, repository: Path, spool: Path, triton_url: str, log: Path,
                 extra: Sequence[str] = ()) -> None:
        super().__init__(repository, MODEL, spool, triton_url, log, "--min-free-bytes", "0",
                         *extra, timeout_s=90)

    def spool_depth(self) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("bedside_gateway_spool_depth "):
                return float(line.split()[1])
        raise RuntimeError("no bedside_gateway_spool_depth in /metrics")

    def drain(self, timeout_s: float) -> float:
        """Wait until every acknowledged instance is finished; the seconds it took."""
        start = time.monotonic()
        while self.spool_depth() > 0:
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"gateway still busy after {timeout_s:.0f}s")
            time.sleep(0.1)
        return time.monotonic() - start

    def results(self, study_uid: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/v1/studies/{study_uid}/results", timeout=60)
        r.raise_for_status()
        instances: list[dict[str, Any]] = r.json()["instances"]
        return instances

    def stop(self) -> None:
        self.terminate()


@dataclass(frozen=True)
class Sent:
    seconds: float
    acknowledged: int

    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds > 0 else 0.0


def storescu(port: int, called_aet: str, files: Sequence[Path], associations: int) -> Sent:
    """Send ``files`` split over ``associations`` concurrent storescu processes."""
    return storescu_many([(port, files)], called_aet, associations)


def storescu_many(targets: Sequence[tuple[int, Sequence[Path]]], called_aet: str,
                  associations: int) -> Sent:
    """Each target's (port, files) split over ``associations`` concurrent storescu processes,
    every target at once (one wall clock for all)."""
    if not os.access(STORESCU, os.X_OK):
        raise FileNotFoundError(f"{STORESCU} missing: install Debian dcmtk")
    chunks = [(port, list(files[k::associations])) for port, files in targets
              for k in range(associations)]
    files = [f for _, chunk in chunks for f in chunk]
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [str(STORESCU), "-v", "-aet", "BENCHSCU", "-aec", called_aet, "127.0.0.1", str(port),
         *map(str, chunk)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for port, chunk in chunks]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    seconds = time.perf_counter() - start
    acked = sum(out.count("Received Store Response (Success)") for out in outputs)
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {out[-2000:]}")
    if acked != len(files):
        raise RuntimeError(f"only {acked} of {len(files)} C-STOREs were acknowledged")
    return Sent(seconds, acked)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _overheads(results: list[dict[str, Any]]) -> dict[str, float]:
    """Percentiles (ms) of gateway overhead without queue wait, and of the queue wait."""
    bad = [r for r in results if "error" in r]
    if bad:
        raise RuntimeError(f"{len(bad)} instances got error results: {bad[0]['error']}")
    own = [r["timings_ms"]["gateway_overhead"] - r["timings_ms"].get("queue", 0.0)
           for r in results]
    queue = [r["timings_ms"].get("queue", 0.0) for r in results]
    ack = [r["timings_ms"].get("receive", 0.0) + r["timings_ms"].get("spool", 0.0)
           for r in results]
    return {"overhead_p50_ms": _percentile(own, 50), "overhead_p95_ms": _percentile(own, 95),
            "ack_p50_ms": _percentile(ack, 50), "ack_p95_ms": _percentile(ack, 95),
            "queue_p50_ms": _percentile(queue, 50), "queue_p95_ms": _percentile(queue, 95)}


# -- the run -------------------------------------------------------------------------------

def replicas_on_postgresql(repo: Path, root: Path, triton_url: str, files: Sequence[Path],
                           associations: int, gateway_args: Sequence[str]) -> dict[str, Any]:
    """Two gateways (``--job-db`` on one PostgreSQL database, one shared spool) inferring,
    the files split between them, ``associations`` in all; the figures."""
    from tests.postgres import Postgres

    server = Postgres()
    replicas: list[Gateway] = []
    try:
        server.start()
        flags = [*gateway_args, "--job-db", server.new_database()]
        for name in ("a", "b"):
            replicas.append(Gateway(repo, root / "spool-shared", triton_url,
                                    root / f"gateway-replica-{name}.log", flags))
        half = len(files) // 2
        sent = storescu_many([(replicas[0].dicom_port, files[:half]),
                              (replicas[1].dicom_port, files[half:])], "BEDSIDE",
                             max(1, associations // 2))
        drain_s = max(g.drain(timeout_s=600) for g in replicas)
        results = replicas[0].results(str(_study_uid(files[0])))
        if len(results) != len(files):
            raise RuntimeError(f"{len(results)} results for {len(files)} instances")
        return {"replicas": 2, "associations": associations, "instances": len(files),
                "per_s": sent.rate(), "seconds": sent.seconds, "drain_s": drain_s}
    finally:
        for g in replicas:
            g.stop()
        server.stop()


def run(n: int = 300, associations: Sequence[int] = (1, 4), work: Path | None = None,
        gateway_args: Sequence[str] = (), replicas: bool = False) -> dict[str, Any]:
    """Synthesize, start Triton + gateway + Orthanc, measure; the figures as a dict.
    ``replicas``: also two replicas on PostgreSQL, with as many associations as the most
    above, beside the one gateway on SQLite of the same run."""
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
    from tests.integration.orthanc import OrthancServer

    own_work = work is None
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-")) if work is None else work
    root.mkdir(parents=True, exist_ok=True)
    sets: dict[int, list[Path]] = {}
    try:
        t0 = time.perf_counter()
        for k, assoc in enumerate(associations):
            sets[assoc] = synthesize(root / f"data-{assoc}", n, seed=k)
        replica_files = (synthesize(root / "data-replicas", n, seed=len(associations))
                         if replicas else [])
        synth_s = time.perf_counter() - t0
        size = sets[associations[0]][0].stat().st_size
        repo = build_repository(root / "model")
        env = Path(os.environ.get("BEDSIDE_TRITON_ENV",
                                  Path(__file__).resolve().parents[1] / ".venv-triton"))
        triton = TritonServer(TritonInstall.discover(env), repo, root / "triton",
                              TritonPorts(free_port(), free_port(), free_port()))
        triton.start()
        gateway: Gateway | None = None
        ingest_only: Gateway | None = None
        orthanc = OrthancServer(root / "orthanc")
        rows: list[dict[str, Any]] = []
        replica_figures: dict[str, Any] | None = None
        try:
            gateway = Gateway(repo, root / "spool", triton.grpc_url, root / "gateway.log",
                              gateway_args)
            ingest_only = Gateway(repo, root / "spool-ingest-only", f"127.0.0.1:{free_port()}",
                                  root / "gateway-ingest-only.log", gateway_args)
            orthanc.start()
            for assoc in associations:
                files = sets[assoc]
                gw = storescu(gateway.dicom_port, "BEDSIDE", files, assoc)
                drain_s = gateway.drain(timeout_s=600)
                study = str(_study_uid(files[0]))
                results = gateway.results(study)
                if len(results) != len(files):
                    raise RuntimeError(f"{len(results)} results for {len(files)} instances")
                alone = storescu(ingest_only.dicom_port, "BEDSIDE", files, assoc)
                pacs = storescu(orthanc.dicom_port, "ORTHANC", files, assoc)
                stored = orthanc.get("/statistics")["CountInstances"]
                rows.append({
                    "associations": assoc, "instances": len(files),
                    "gateway_per_s": gw.rate(), "gateway_ingest_only_per_s": alone.rate(),
                    "orthanc_per_s": pacs.rate(), "ratio": gw.rate() / pacs.rate(),
                    "ratio_ingest_only": alone.rate() / pacs.rate(), "gateway_s": gw.seconds,
                    "gateway_ingest_only_s": alone.seconds, "orthanc_s": pacs.seconds,
                    "gateway_drain_s": drain_s, "orthanc_instances_stored": stored,
                    **_overheads(results),
                })
            if replicas:
                for g in (gateway, ingest_only):
                    if g is not None:
                        g.stop()
                gateway = ingest_only = None  # their CPU is the replicas' now
                most = max(associations)
                two = replicas_on_postgresql(repo, root, triton.grpc_url, replica_files, most,
                                             gateway_args)
                one = next(r for r in rows if r["associations"] == most)["gateway_per_s"]
                replica_figures = {**two, "one_sqlite_per_s": one,
                                   "ratio_to_one_sqlite": two["per_s"] / one}
        finally:
            for g in (gateway, ingest_only):
                if g is not None:
                    g.stop()
            orthanc.stop()
            triton.stop()
        return {"instances_per_scenario": n, "instance_bytes": size, "side": SIDE,
                "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                "synthesis_s": synth_s, "rows": rows,
                "overhead_source": "result timings_ms: gateway_overhead - queue",
                "background": "gateway worker inferring with the real bundled Triton",
                "replicas_postgresql": replica_figures}
    finally:
        if own_work:
            shutil.rmtree(root, ignore_errors=True)


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def table(figures: dict[str, Any]) -> str:
    lines = [f"C-STORE ingest, durable ack, {figures['side']}x{figures['side']} CT "
             f"({figures['instance_bytes'] / 1024:.0f} KiB), {figures['instances_per_scenario']}"
             f" instances per scenario, dcmtk storescu, {figures['cpu_count']} CPUs, load "
             f"average {figures['load_average'][0]:.1f}",
             "",
             "| associations | gateway inst/s (inferring) | gateway inst/s (ingest only) | "
             "Orthanc inst/s | gateway/Orthanc | ack p50/p95 ms | overhead p50/p95 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in figures["rows"]:
        lines.append(f"| {r['associations']} | {r['gateway_per_s']:.0f} | "
                     f"{r['gateway_ingest_only_per_s']:.0f} | {r['orthanc_per_s']:.0f} | "
                     f"{r['ratio']:.2f} / {r['ratio_ingest_only']:.2f} | "
                     f"{r['ack_p50_ms']:.1f} / {r['ack_p95_ms']:.1f} | "
                     f"{r['overhead_p50_ms']:.1f} / {r['overhead_p95_ms']:.1f} |")
    two = figures.get("replicas_postgresql")
    if two:
        lines += ["", f"two replicas on PostgreSQL (one spool), {two['associations']} "
                  f"associations, inferring: {two['per_s']:.0f} inst/s; one gateway on SQLite, "
                  f"same run: {two['one_sqlite_per_s']:.0f} inst/s "
                  f"({two['ratio_to_one_sqlite']:.2f}x)"]
    lines += ["", "gateway/Orthanc: inferring / ingest only. ack: the C-STORE's arrival to durable",
              "spool + job row (the acknowledgement); overhead: gateway_overhead - queue wait;",
              "both from each result's timings_ms (inferring run)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="instances per scenario")
    p.add_argument("--associations", default="1,4", help="comma-separated, e.g. 1,4")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--work", type=Path, default=None, help="keep data and logs here")
    p.add_argument("--gateway-arg", action="append", default=[],
                   help="extra argument for bedside gateway (repeatable)")
    p.add_argument("--replicas", action="store_true",
                   help="also two gateway replicas on one PostgreSQL (Debian postgresql 15) "
                        "and one shared spool, beside the one gateway on SQLite")
    args = p.parse_args(argv)
    figures = run(args.n, tuple(int(a) for a in args.associations.split(",")), args.work,
                  args.gateway_arg, args.replicas)
    print(table(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
