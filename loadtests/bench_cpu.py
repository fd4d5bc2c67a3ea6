"""CPU milliseconds per image, stage by stage, on the gateway's REST and DIMSE paths.

    python -m loadtests.bench_cpu [--n 300] [--json out.json]

Two tables, both measured now, in this process, on this machine:

1. **Stages**: each stage's own code called ``n`` times back to back on a 512x512 12-bit CR
   instance (the load tests' payload), CPU time from ``time.thread_time`` (so an fsync's wait
   is not CPU) and wall time beside it. REST ``POST /v1/infer``: receive (body join, preamble
   repair), parse (pydicom ``dcmread``), header checks, decode (``pixel_array``), LUT (modality
   + VOI + MONOCHROME1, to float32), resize + normalise, tensor encode (the Triton gRPC request
   built and serialised as tritonclient does), postprocess, result encode (JSON response), result
   store (durable write). DIMSE C-STORE: receive (pynetdicom's decode of the received data set,
   its file meta, the encoded bytes to spool), header checks, spool (durable write + fsync + job
   row), then the worker's read + parse of the spool file and the same stages as REST.
   Preprocessing is measured on both of its paths: ``reference`` (decode, then the LUT in
   float64 per pixel) and the fast path the gateway takes (``decode + LUT``, one table lookup per
   pixel, equal bit for bit; see ``optimizer.contract.preprocess``), so the before/after of that
   change is in every run.
2. **Whole process** (``--whole``): a real gateway in this process (its Triton edge faked: the
   tensor encode is in table 1), fed by a client in another process (``httpx`` for REST, dcmtk
   ``storescu`` for DIMSE on one association), and this process's CPU (``time.process_time``,
   every thread) per image, from the first request until the last result is stored. What it
   shows beyond the sum of the stages is the protocol stacks (uvicorn + starlette, pynetdicom),
   threads, logging and metrics.

Inputs: the demo model's (128x128) and DenseNet121's (224x224). Figures depend on the machine
and its other load: compare only rows of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, decode, encode_file_meta
from starlette.responses import JSONResponse
from tritonclient.grpc._utils import _get_inference_request

from loadtests.payloads import Payloads
from optimizer.contract import preprocess as pp
from optimizer.contract.findings import activate, findings
from optimizer.contract.manifest import Manifest
from services.demo import DEMO_MANIFEST
from services.gateway.dicom.parsing import parse, part10_bytes, read_leniently
from services.gateway.inference.core import InferenceCore
from services.gateway.intake.ingest import with_preamble
from services.gateway.store.jobs import JobTable
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool

CHUNK = 65536  # what an ASGI server hands the app at a time, about


@dataclasses.dataclass(frozen=True)
class Stage:
    path: str  # rest | dimse
    name: str
    cpu_ms: float
    wall_ms: float


def measure(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Mean CPU (this thread) and wall milliseconds of one call, over ``n`` after a warm-up."""
    fn()
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return ((time.thread_time() - c0) * 1000.0 / n, (time.perf_counter() - w0) * 1000.0 / n)


class _Zeros:
    """The Triton edge faked: logits of zeros (its cost is measured as "tensor encode")."""

    def __init__(self, manifest: Manifest) -> None:
        self.model = manifest.name
        self._shape = manifest.output_shape

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((batch.shape[0], *self._shape), dtype=np.float32)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def tensor_encode(manifest: Manifest, x: np.ndarray) -> bytes:
    """The gRPC request the Triton edge sends for ``x``, built and serialised as
    ``TritonInferer`` and tritonclient build it (grpc serialises it on send)."""
    tensor = grpcclient.InferInput(manifest.input.name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    request = _get_inference_request(
        model_name=manifest.name, inputs=[tensor], model_version="", request_id="",
        outputs=[grpcclient.InferRequestedOutput(manifest.output.name)], sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None)
    return bytes(request.SerializeToString())


def stages(manifest: Manifest, n: int, work: Path) -> list[Stage]:
    """Table 1 for one model input (see the module docstring)."""
    read_leniently()
    spec = manifest.input
    core = InferenceCore(manifest, _Zeros(manifest))
    payloads = Payloads(count=2)
    data = payloads.part10()
    ds = parse(data)
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    indices = pp.frame_indices(ds, spec)
    stored = pp.decode_frames(ds, indices)
    unit = pp.grey_to_unit(ds, spec, stored, indices)
    x = pp.preprocess_frames(ds, spec, header_checked=True)
    if not np.array_equal(x, pp.preprocess_frames(ds, spec, header_checked=True,
                                                  reference=True)):
        raise AssertionError("the fast preprocessing path differs from the reference")
    logits = np.zeros((1, *manifest.output_shape), dtype=np.float32)
    result = core.analyze(ds)
    spool = Spool(work / "spool")
    jobs = JobTable(work / "spool")
    results = ResultStore(work / "spool")
    rows: list[tuple[str, str, Callable[[], Callable[[], object]]]] = []

    def same(fn: Callable[[], object]) -> Callable[[], Callable[[], object]]:
        return lambda: fn

    def fresh(fn: Callable[[Dataset], object]) -> Callable[[], Callable[[], object]]:
        """``fn`` on a newly parsed and header-checked data set each call, as served (pydicom
        converts an element's value on first access, then keeps it)."""
        def make() -> Callable[[], object]:
            pool = iter([_checked(core, data) for _ in range(n + 1)])
            return lambda: fn(next(pool))
        return make

    def resize_normalise() -> np.ndarray:
        planes = unit[:, None]
        out = np.empty((1, 1, spec.height, spec.width), dtype=np.float32)
        out[0, 0] = pp.resize(planes[0, 0], spec.height, spec.width)
        return ((out - spec.normalize.mean) / spec.normalize.std).astype(np.float32)

    def post() -> object:
        return findings(manifest, activate(logits, manifest.output.activation))

    counter = iter(range(10**9))

    def spool_write() -> None:
        path = spool.put(data)
        k = next(counter)
        jobs.insert(path.name, f"1.2.{k}", f"1.2.{k}.1", f"1.2.{k}.1.1", "dimse", "BENCH")

    rows += [
        ("rest", "receive (body, preamble)", same(lambda: with_preamble(b"".join(chunks)))),
        ("rest", "parse (dcmread)", same(lambda: parse(data))),
        ("rest", "header checks", fresh_unchecked(core, data, n)),
        ("rest", "decode (pixel_array)", same(lambda: pp.decode_frames(ds, indices))),
        ("rest", "LUT (modality+VOI, float64)",
         same(lambda: pp.grey_to_unit(ds, spec, stored, indices))),
        ("rest", "decode + LUT, fast path",
         fresh(lambda d: pp.native_grey_unit(d, spec, indices))),
        ("rest", "resize + normalise", same(resize_normalise)),
        ("rest", "preprocess, reference",
         fresh(lambda d: pp.preprocess_frames(d, spec, header_checked=True, reference=True))),
        ("rest", "preprocess, as served",
         fresh(lambda d: pp.preprocess_frames(d, spec, header_checked=True))),
        ("rest", "tensor encode (gRPC request)", same(lambda: tensor_encode(manifest, x))),
        ("rest", "postprocess", same(post)),
        ("rest", "result encode (JSON body)", same(lambda: JSONResponse(result.to_dict()).body)),
        ("rest", "result store (durable)",
         same(lambda: results.save(result.study_instance_uid, result.sop_instance_uid,
                                   result.to_dict()))),
    ]
    encoded = _dataset_bytes(data)
    if _served_receive(encoded, ds)[0] != _pynetdicom_receive(encoded, ds)[0]:
        raise AssertionError("the spooled bytes differ from pynetdicom's encoded_dataset()")
    (work / "one.dcm").write_bytes(data)
    rows += [
        ("dimse", "receive: decode, meta, Part-10 bytes (pynetdicom)",
         same(lambda: _pynetdicom_receive(encoded, ds))),
        ("dimse", "receive: as served", same(lambda: _served_receive(encoded, ds))),
        ("dimse", "header checks", fresh_received(core, encoded, ds, n)),
        ("dimse", "spool (write+fsync+job row)", same(spool_write)),
        ("dimse", "worker: read + parse", same(lambda: parse((work / "one.dcm").read_bytes()))),
        ("dimse", "worker: checks, preprocess, infer, result", same(lambda: None)),
    ]
    out = []
    for path, name, make in rows:
        if name.startswith("worker: checks"):
            out.append(Stage(path, "worker: then as REST from header checks", 0.0, 0.0))
            continue
        calls = n if "durable" not in name and "spool" not in name else max(20, n // 5)
        cpu, wall = measure(make(), calls)
        out.append(Stage(path, name, round(cpu, 3), round(wall, 3)))
    jobs.close()
    return out


def _checked(core: InferenceCore, data: bytes) -> Dataset:
    ds = parse(data)
    core.check(ds)
    return ds


def fresh_unchecked(core: InferenceCore, data: bytes,
                    n: int) -> Callable[[], Callable[[], object]]:
    """``core.check`` on a newly parsed data set each call."""
    def make() -> Callable[[], object]:
        pool = iter([parse(data) for _ in range(n + 1)])
        return lambda: core.check(next(pool))
    return make


def fresh_received(core: InferenceCore, encoded: bytes, header: Dataset,
                   n: int) -> Callable[[], Callable[[], object]]:
    """``core.check`` on a newly received (pynetdicom-decoded) data set each call."""
    def make() -> Callable[[], object]:
        pool = iter([_pynetdicom_receive(encoded, header)[1] for _ in range(n + 1)])
        return lambda: core.check(next(pool))
    return make


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set as a DIMSE peer sends it: the Part-10 file without preamble and meta."""
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    from pydicom.filereader import _read_file_meta_info

    _read_file_meta_info(fp)
    return part10[fp.tell():]


def _meta(header: Dataset) -> FileMetaDataset:
    return create_file_meta(sop_class_uid=header.SOPClassUID,
                            sop_instance_uid=header.SOPInstanceUID,
                            transfer_syntax=ExplicitVRLittleEndian)


def _pynetdicom_receive(encoded: bytes, header: Dataset) -> tuple[bytes, Dataset]:
    """The DIMSE edge's receive before this change: the data set decoded as pynetdicom's
    ``event.dataset`` does, ``event.file_meta`` set on it, the SOP class read, and the Part-10
    bytes built by ``event.encoded_dataset()`` (which makes the file meta again and encodes it
    with pydicom's writer)."""
    ds = decode(io.BytesIO(encoded), False, True, False)
    ds.set_original_encoding(False, True)
    ds.file_meta = _meta(header)
    str(ds.get("SOPClassUID", ""))
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(_meta(header)), encoded)), ds


def _served_receive(encoded: bytes, header: Dataset) -> tuple[bytes, Dataset]:
    """The same as the DIMSE edge does it now (``dimse._spooled_bytes``)."""
    ds = decode(io.BytesIO(encoded), False, True, False)
    ds.set_original_encoding(False, True)
    ds.file_meta = _meta(header)
    str(ds.get("SOPClassUID", ""))
    data = part10_bytes(encoded, str(header.SOPClassUID), str(header.SOPInstanceUID),
                        ExplicitVRLittleEndian, PYNETDICOM_IMPLEMENTATION_UID,
                        PYNETDICOM_IMPLEMENTATION_VERSION)
    assert data is not None
    return data, ds


def whole_process(manifest: Manifest, n: int, work: Path) -> dict[str, float]:
    """Table 2: this process's CPU per image with a real gateway fed from another process."""
    from services.gateway.app import Gateway
    from services.gateway.config import GatewayConfig
    from services.net import free_port

    repo = work / "repo"
    (repo / manifest.name).mkdir(parents=True, exist_ok=True)
    manifest.save(repo / manifest.name / "manifest.json")
    config = GatewayConfig(model_repository=repo, model_name=manifest.name,
                           triton_grpc_url="unused:1", spool_dir=work / "gw-spool",
                           http_port=free_port(), dicom_port=free_port(), grpc_port=0)
    gateway = Gateway(config, inferer=_Zeros(manifest))
    gateway.start()
    payloads = Payloads(count=2)
    files = work / "files"
    files.mkdir(exist_ok=True)
    names = []
    for k in range(n):
        name = files / f"{k:05d}.dcm"
        name.write_bytes(payloads.part10())
        names.append(str(name))
    body = work / "body.dcm"
    body.write_bytes(payloads.part10())
    try:
        figures: dict[str, float] = {}
        client = ("import httpx,sys\n"
                  "d=open(sys.argv[1],'rb').read()\n"
                  "with httpx.Client() as c:\n"
                  " for _ in range(int(sys.argv[3])):\n"
                  "  r=c.post(sys.argv[2],content=d,"
                  "headers={'content-type':'application/dicom'}); r.raise_for_status()\n")
        url = f"http://{config.http_host}:{config.http_port}/v1/infer"
        subprocess.run([sys.executable, "-c", client, str(body), url, "5"], check=True)
        c0 = time.process_time()
        subprocess.run([sys.executable, "-c", client, str(body), url, str(n)], check=True)
        figures["rest_infer_cpu_ms"] = round((time.process_time() - c0) * 1000.0 / n, 3)
        env = {**os.environ, "TCP_NODELAY": "1"}
        before = _results(config.spool_dir)
        c0 = time.process_time()
        subprocess.run(["/usr/bin/storescu", "-aec", config.ae_title, "-aet", "BENCH",
                        config.dicom_host, str(config.dicom_port), *names], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        acked = time.process_time()
        deadline = time.monotonic() + 120
        while _results(config.spool_dir) < before + n and time.monotonic() < deadline:
            time.sleep(0.01)
        done = time.process_time()
        figures["dimse_ack_cpu_ms"] = round((acked - c0) * 1000.0 / n, 3)
        figures["dimse_ingest_and_infer_cpu_ms"] = round((done - c0) * 1000.0 / n, 3)
        return figures
    finally:
        gateway.stop()


def _results(spool: Path) -> int:
    return sum(1 for _ in (spool / "results").rglob("*.json"))


def render(report: dict[str, Any]) -> str:
    lines = [f"CPU: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, load average "
             f"{report['machine']['load_average']}; n = {report['n']} per stage", ""]
    for model, table in report["models"].items():
        lines += [f"{model}:", "", "| path | stage | CPU ms/image | wall ms |", "|---|---|---|---|"]
        lines += [f"| {s['path']} | {s['name']} | {s['cpu_ms']:.3f} | {s['wall_ms']:.3f} |"
                  for s in table["stages"]]
        whole = table.get("whole_process")
        if whole:
            lines += ["", "whole process, CPU ms per image: " + ", ".join(
                f"{k} {v:.2f}" for k, v in whole.items())]
        lines.append("")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="calls per stage (instances for --whole)")
    p.add_argument("--whole", action="store_true",
                   help="also measure a whole gateway process per image (REST and DIMSE)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    densenet = dataclasses.replace(
        DEMO_MANIFEST, input=dataclasses.replace(DEMO_MANIFEST.input, height=224, width=224))
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu(), "cpus": os.cpu_count(),
                    "load_average": round(os.getloadavg()[0], 2)},
        "n": args.n, "models": {}}
    for label, manifest in (("demo model, 1x128x128", DEMO_MANIFEST),
                            ("DenseNet121 input, 1x224x224", densenet)):
        with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
            table: dict[str, Any] = {"stages": [dataclasses.asdict(s) for s in
                                                stages(manifest, args.n, Path(tmp))]}
            if args.whole and manifest is DEMO_MANIFEST:
                table["whole_process"] = whole_process(manifest, args.n, Path(tmp))
        report["models"][label] = table
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
