"""Locust users, one per gateway edge, each sending a realistic 512x512 CR instance:

- ``RestUser``: ``POST /v1/infer`` (synchronous: the latency is end to end, Triton included);
- ``OipGrpcUser``: Open Inference Protocol v2 over gRPC with the stock ``tritonclient.grpc``
  (synchronous, end to end);
- ``StowUser``: DICOMweb STOW-RS ``POST /dicomweb/studies`` (the latency is the durable ack;
  inference follows in the gateway's worker);
- ``DimseUser``: C-STORE over one pynetdicom association per user (durable ack, as STOW-RS).

The request name is the protocol (``rest``, ``oip_grpc``, ``stow``, ``dimse``), so Locust's
statistics are per protocol. ``--pace R`` makes each user send at most R requests per second
(open-loop-like load at a chosen rate); without it users send back to back.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8080 \
        --grpc-port 8081 --dicom-port 11112 --model cxr-lesion -u 4 -t 30s
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import grpc.experimental.gevent as grpc_gevent
import numpy as np
import tritonclient.grpc as grpcclient
from locust import HttpUser, User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.user.wait_time import constant_pacing
from pynetdicom import AE
from pynetdicom.association import Association

from loadtests.payloads import Payloads

grpc_gevent.init_gevent()  # Locust runs users as greenlets; gRPC must cooperate with gevent
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

DICOM = "application/dicom"
SUCCESS = 0x0000


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--model", default="cxr-lesion", help="model served by the gateway")
    parser.add_argument("--grpc-port", type=int, default=8081, help="gateway OIP gRPC port")
    parser.add_argument("--dicom-port", type=int, default=11112, help="gateway DIMSE port")
    parser.add_argument("--ae-title", default="BEDSIDE", help="gateway AE title")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="requests per second per user (0: back to back)")


def _host(user: User) -> str:
    host = str(user.environment.host or "http://127.0.0.1:8080")
    return host.split("://", 1)[-1].split(":")[0]


class Paced:
    """Mixin: ``--pace`` requests per second per user, or no wait at all."""

    environment: Any

    def wait_time(self) -> float:
        pace = float(self.environment.parsed_options.pace)
        return constant_pacing(1.0 / pace)(self) if pace > 0 else 0.0  # type: ignore[arg-type]


class RestUser(Paced, HttpUser):
    def on_start(self) -> None:
        self.payloads = Payloads(seed=1)

    @task
    def infer(self) -> None:
        with self.client.post("/v1/infer", data=self.payloads.part10(), name="rest",
                              headers={"Content-Type": DICOM},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif "findings" not in resp.json():
                resp.failure("no findings in the response")


class StowUser(Paced, HttpUser):
    def on_start(self) -> None:
        self.payloads = Payloads(seed=2)

    @task
    def store(self) -> None:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode()
                + self.payloads.part10() + f"\r\n--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        with self.client.post("/dicomweb/studies", data=body, headers=headers, name="stow",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")


class OipGrpcUser(Paced, User):
    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = str(opts.model)
        self.payloads = Payloads(seed=3)
        self.client = grpcclient.InferenceServerClient(f"{_host(self)}:{opts.grpc_port}")

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        data = self.payloads.part10()
        tensor = grpcclient.InferInput("DICOM", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        start = time.perf_counter()
        exc: Exception | None = None
        try:
            result = self.client.infer(self.model, [tensor], client_timeout=60)
            if result.as_numpy("SCORES") is None:
                raise ValueError("no SCORES output")
        except Exception as err:  # every failure is counted, none stops the user
            exc = err
        self.environment.events.request.fire(
            request_type="gRPC", name="oip_grpc", response_length=len(data), exception=exc,
            response_time=(time.perf_counter() - start) * 1000.0, context={})


class DimseUser(Paced, User):
    """One association per user, kept open (as a modality sends a study), re-opened after a
    failure."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.payloads = Payloads(seed=4)
        self.ae = AE(ae_title="LOADSCU")
        self.ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
        self.peer = (_host(self), int(opts.dicom_port), str(opts.ae_title))
        self.assoc: Association | None = None

    def on_stop(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def _association(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            host, port, aet = self.peer
            self.assoc = self.ae.associate(host, port, ae_title=aet)
            if not self.assoc.is_established:
                raise ConnectionError("association refused or aborted")
        return self.assoc

    @task
    def store(self) -> None:
        ds = self.payloads.dataset()
        start = time.perf_counter()
        exc: Exception | None = None
        try:
            status = self._association().send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code != SUCCESS:
                raise RuntimeError("no C-STORE response" if code is None
                                   else f"C-STORE status 0x{code:04X}")
        except Exception as err:  # every failure is counted, none stops the user
            exc = err
            if self.assoc is not None:
                self.assoc.abort()
                self.assoc = None
        self.environment.events.request.fire(
            request_type="C-STORE", name="dimse", response_length=0, exception=exc,
            response_time=(time.perf_counter() - start) * 1000.0, context={})
