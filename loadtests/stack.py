"""A local Bedside stack for load tests and benchmarks: the real bundled Triton and the gateway
as a ``bedside gateway`` subprocess, on free loopback ports, stopped on the way out.

The gateway runs in its own process so that the load generator's CPU is not the gateway's, as
in a deployment. ``gateway_command`` is the one place that knows the CLI's flags.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

from services.errors import ServiceError
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Endpoints:
    """Where a running stack listens (all on 127.0.0.1)."""

    model: str
    http_port: int
    dicom_port: int
    grpc_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    ae_title: str = "BEDSIDE"
    host: str = "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"


def bedside_executable() -> Path:
    exe = Path(sys.executable).with_name("bedside")
    if not exe.exists():
        raise ServiceError(f"{exe} missing: install the project (scripts/dev.sh setup)")
    return exe


@cache
def _gateway_help() -> str:
    return subprocess.run([str(bedside_executable()), "gateway", "--help"], capture_output=True,
                          text=True, timeout=60, check=False).stdout


def local_security_flags() -> list[str]:
    """Loopback benchmarks run without API keys and without TLS. Where the CLI asks for that
    choice to be explicit (``--no-auth``, ``--plaintext``), say it explicitly."""
    text = _gateway_help()
    return [flag for flag in ("--no-auth", "--plaintext") if flag in text]


def gateway_command(repository: Path, model: str, spool: Path, triton_url: str,
                    ports: Endpoints, extra: Sequence[str] = ()) -> list[str]:
    return [str(bedside_executable()), "gateway", "--repository", str(repository),
            "--model", model, "--spool", str(spool), "--http-host", ports.host,
            "--http-port", str(ports.http_port), "--dicom-host", ports.host,
            "--dicom-port", str(ports.dicom_port), "--grpc-port", str(ports.grpc_port),
            "--triton-url", triton_url, *local_security_flags(), *extra]


def expected_processes(args: Sequence[str]) -> int:
    """The gateway processes a command line starts: ``--processes N``, else (0, the
    default) one per CPU given to this process, as the gateway counts them."""
    from services.lifetime import cpus_given

    args, n = list(args), 0
    for i, arg in enumerate(args):
        if arg == "--processes":
            n = int(args[i + 1])
        elif arg.startswith("--processes="):
            n = int(arg.split("=", 1)[1])
    return n or cpus_given()


def wait_processes_ready(log: Path, offset: int, processes: int, timeout_s: float,
                         proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``processes`` gateway processes logged "gateway ready" after byte ``offset``:
    the kernel spreads connections over every listener at once, so a measurement must not
    start while some process is still loading."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"gateway exited with {proc.returncode}")
        with log.open("rb") as f:
            f.seek(offset)
            if f.read().count(b"gateway ready") >= processes:
                return
        time.sleep(0.1)
    raise ServiceError(f"{processes} gateway processes not ready after {timeout_s:.0f}s")


def triton_env() -> Path:
    return Path(os.environ.get("BEDSIDE_TRITON_ENV", ROOT / ".venv-triton"))


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                 log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise ServiceError(f"process exited with {proc.returncode} before {url}: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # loopback only
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ServiceError(f"{url} not ready after {timeout_s:.0f}s")


class GatewayProcess:
    """``bedside gateway`` as a subprocess in a session of its own (so that a test can kill it
    for real, SIGKILL included), on free loopback ports; ready once ``ready_path`` answers 200.

    ``security`` is the explicit authentication/TLS choice the CLI requires (loopback: no keys,
    plain text); ``extra`` adds any other flags."""

    def __init__(self, repository: Path, model: str, spool: Path, triton_url: str, log: Path,
                 *extra: str, security: Sequence[str] = ("--no-auth", "--plaintext"),
                 grpc: bool = False, verbose: bool = False, ready_path: str = "/healthz",
                 timeout_s: float = 60.0) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.grpc_port = free_port() if grpc else 0
        self.spool, self.log = spool, log
        cmd = [str(bedside_executable()), *(["-v"] if verbose else []), "gateway",
               "--repository", str(repository), "--model", model, "--spool", str(spool),
               "--http-port", str(self.http_port), "--dicom-port", str(self.dicom_port),
               "--grpc-port", str(self.grpc_port), "--triton-url", triton_url,
               *security, *extra]
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_http_ok(f"{self.url}{ready_path}", timeout_s, self.proc, log)
            wait_processes_ready(log, offset, expected_processes(extra), timeout_s, self.proc)
        except ServiceError:
            self.kill()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group and wait for the gateway to be gone."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a clean stop), then SIGKILL if it has not stopped in time."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


class Stack:
    """Triton + gateway on a model repository; ``with Stack(...) as endpoints``."""

    def __init__(self, repository: Path, model: str, workdir: Path,
                 start_gateway: bool = True, gateway_args: Sequence[str] = ()) -> None:
        """``gateway_args``: extra ``bedside gateway`` flags (e.g. ``--processes 2``)."""
        self.gateway_args = list(gateway_args)
        self.repository = repository.absolute()
        self.model = model
        self.workdir = workdir.absolute()
        self._start_gateway = start_gateway
        self.triton: TritonServer | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tports = TritonPorts(free_port(), free_port(), free_port())
        self.triton = TritonServer(TritonInstall.discover(triton_env()), self.repository,
                                   self.workdir / "triton", tports)
        self.triton.start()
        ends = Endpoints(model=self.model, http_port=free_port(), dicom_port=free_port(),
                         grpc_port=free_port(), triton_grpc_port=tports.grpc,
                         triton_metrics_port=tports.metrics)
        self.endpoints = ends
        if self._start_gateway:
            self.start_gateway()
        return ends

    def start_gateway(self) -> None:
        assert self.triton is not None and self.endpoints is not None
        spool = self.workdir / "spool"
        shutil.rmtree(spool, ignore_errors=True)
        log = self.workdir / "gateway.log"
        cmd = gateway_command(self.repository, self.model, spool, self.triton.grpc_url,
                              self.endpoints, self.gateway_args)
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            self.gateway = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            wait_http_ok(f"{self.endpoints.http_url}/readyz", 60, self.gateway, log)
            wait_processes_ready(log, offset, expected_processes(self.gateway_args), 60,
                                 self.gateway)
        except ServiceError:
            self.stop()
            raise
        LOG.info("gateway ready on %s (%s)", self.endpoints.http_url,
                 " ".join(self.gateway_args) or "default processes")

    def stop_gateway(self) -> None:
        proc, self.gateway = self.gateway, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def stop(self) -> None:
        self.stop_gateway()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
