"""``bedside gateway``: the gateway against a running Triton. Its flags are generated from the
settings declared in ``services/gateway/config.py``; ``bedside serve`` shares them.

With ``--processes`` above 1 (by default one per CPU the pod is given) the command is a
supervisor (``services.supervisor``) of that many gateway processes, each serving DIMSE, HTTP
and gRPC on the same ports (SO_REUSEPORT), sharing the spool and the job table. The pod's run
directory (created here, removed on the way out) holds what the processes share that is the
pod's alone: the limits (``security.podstate``) and the metrics files (multiprocess mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from services.errors import ConfigError, ServiceError
from services.gateway.config import add_flags, settings_from_args

if TYPE_CHECKING:
    from services.gateway.config import GatewayConfig

LOG = logging.getLogger("bedside")
NAME = "gateway"
HELP = "run the gateway against a running Triton"
_RUN_PREFIX = "bedside-pod-"
_PROCESS_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, NAME)


def config_from_args(args: argparse.Namespace, triton_url: str) -> GatewayConfig:
    """The gateway's configuration from ``bedside gateway`` / ``bedside serve`` flags, once the
    operator has chosen TLS or plaintext (keys or --no-auth is a required flag group)."""
    from services.gateway.config import GatewayConfig

    if not args.plaintext and (args.tls_cert is None or args.tls_key is None):
        raise ConfigError("choose TLS for HTTP and gRPC (--tls-cert and --tls-key, optionally "
                          "--tls-ca for client certificates) or --plaintext explicitly")
    return GatewayConfig(**{**settings_from_args(args), "triton_grpc_url": triton_url})


def serve_until_interrupted(args: argparse.Namespace, triton_url: str) -> None:
    from services.lifetime import cpus_given

    config = config_from_args(args, triton_url)
    processes = config.processes or cpus_given()
    if processes > 1:
        serve_pod(dataclasses.replace(config, processes=processes),
                  getattr(args, "verbose", False))
        return
    from services.gateway.app import Gateway

    gateway = Gateway(config)
    try:
        gateway.start()
        LOG.info("serving; Ctrl-C to stop")
        threading.Event().wait()
    except KeyboardInterrupt:
        LOG.info("stopping")
    finally:
        gateway.stop()


def serve_pod(config: GatewayConfig, verbose: bool) -> None:
    """``config.processes`` gateway processes under a supervisor, until SIGTERM or Ctrl-C."""
    from prometheus_client.multiprocess import mark_process_dead

    from services.gateway.metrics import MULTIPROC_ENV
    from services.gateway.security.podstate import PodState
    from services.supervisor import FATAL, Supervisor

    _remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=_RUN_PREFIX))
    lock = os.open(run_dir / "supervisor.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held for the pod's life; released by the kernel
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    os.environ[MULTIPROC_ENV] = str(metrics_dir)  # inherited by every process spawned below

    def released(index: int, pid: int) -> None:
        mark_process_dead(pid, str(metrics_dir))  # its live gauges leave the pod's sums
        PodState.release_process(run_dir, index)

    LOG.info("serving with %d gateway processes; Ctrl-C to stop", config.processes)
    try:
        code = Supervisor(partial(_gateway_process, config, run_dir, verbose), config.processes,
                          "gateway", on_exit=released).run()
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.close(lock)
    if code == FATAL:
        raise ServiceError("a gateway process could not start (its error is in the log above)")


def _remove_stale_run_dirs() -> None:
    """Run directories of pods whose supervisor is gone (killed with SIGKILL: no clean-up ran;
    a container's /tmp outlives a restart of the container): their lock is free."""
    for stale in Path(tempfile.gettempdir()).glob(_RUN_PREFIX + "*"):
        try:
            fd = os.open(stale / "supervisor.lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # not ours, or being created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live pod's
        finally:
            os.close(fd)
        shutil.rmtree(stale, ignore_errors=True)


def _gateway_process(config: GatewayConfig, run_dir: Path, verbose: bool, index: int) -> None:
    """One gateway process of a pod (spawned by the supervisor): serves until SIGTERM, then
    stops its listeners and drains its worker."""
    from optimizer.contract.errors import BedsideError
    from services.cli import _configure_logging
    from services.gateway.app import Gateway
    from services.gateway.security.podstate import PodState
    from services.supervisor import FATAL

    _configure_logging(verbose)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(_PROCESS_FORMAT))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        gateway = Gateway(config, pod=PodState(run_dir, index))
        gateway.start()
    except BedsideError as exc:
        LOG.error("gateway process %d could not start: %s", index, exc)
        sys.exit(FATAL)
    try:
        while not stop.wait(1.0):
            pass
        LOG.info("stopping")
    finally:
        gateway.stop()


def run(args: argparse.Namespace) -> int:
    serve_until_interrupted(args, args.triton_url)
    return 0
