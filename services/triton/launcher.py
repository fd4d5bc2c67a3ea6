"""Start and stop a real Triton Inference Server: the binary bundled in the nvidia-pytriton wheel.

Triton runs from its own Python environment (nvidia-pytriton, onnxruntime, numpy<2), exactly as
it runs in its own container in a cluster: its python backend returns empty tensors under
numpy 2, which the project environment uses. The backend stub for that environment's Python
version is copied into a private backend directory, and that environment's ``bin`` is put first
on PATH so the stub runs with its interpreter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as grpcclient

from services.errors import ConfigError, ServiceError
from services.lifetime import die_with_parent

LOG = logging.getLogger(__name__)

_DISCOVER = """
import json, pathlib, sys, numpy, pytriton
root = pathlib.Path(pytriton.__file__).parent
print(json.dumps({"dist": str(root / "tritonserver"),
                  "libs": str(root.parent / "nvidia_pytriton.libs"),
                  "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                  "numpy": numpy.__version__}))
"""


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled tritonserver and its runtime environment live."""

    env_dir: Path
    dist_dir: Path
    libs_dir: Path
    python_version: str

    @classmethod
    def discover(cls, env_dir: Path) -> TritonInstall:
        python = env_dir / "bin" / "python"
        if not python.exists():
            raise ConfigError(
                f"no Triton environment at {env_dir}: create it with scripts/dev.sh setup "
                "(a virtual environment with nvidia-pytriton, onnxruntime and numpy<2)"
            )
        proc = subprocess.run(
            [str(python), "-c", _DISCOVER], capture_output=True, text=True, timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise ConfigError(f"{env_dir} has no usable nvidia-pytriton: {proc.stderr[-500:]}")
        info = json.loads(proc.stdout)
        if int(info["numpy"].split(".")[0]) >= 2:
            raise ConfigError(
                f"{env_dir} has numpy {info['numpy']}: Triton's python backend returns empty "
                "tensors under numpy 2; install numpy<2 there"
            )
        install = cls(env_dir=env_dir, dist_dir=Path(info["dist"]), libs_dir=Path(info["libs"]),
                      python_version=info["python"])
        if not install.binary.exists():
            raise ConfigError(f"tritonserver binary missing in {install.dist_dir}")
        return install

    @property
    def binary(self) -> Path:
        return self.dist_dir / "bin" / "tritonserver"

    def stub(self) -> Path:
        return (self.dist_dir / "python_backend_stubs" / self.python_version
                / "triton_python_backend_stub")


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


class TritonServer:
    """A tritonserver process on loopback, serving one model repository."""

    def __init__(
        self, install: TritonInstall, repository: Path, workdir: Path, ports: TritonPorts,
        host: str = "127.0.0.1", explicit_models: bool = False,
    ) -> None:
        self._install = install
        self._explicit = explicit_models  # models loaded through the API (bedside tune)
        self._repository = repository
        self._workdir = workdir
        self.ports = ports
        self._host = host
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"{self._host}:{self.ports.grpc}"

    def _backends(self) -> Path:
        backends = self._workdir / "backends"
        if backends.exists():
            shutil.rmtree(backends)
        shutil.copytree(self._install.dist_dir / "backends", backends)
        shutil.copy(self._install.stub(), backends / "python" / "triton_python_backend_stub")
        return backends

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = str(self._install.libs_dir)
        env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{libs}" if env.get(
            "LD_LIBRARY_PATH") else libs
        env["PATH"] = f"{self._install.env_dir / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)  # the stub must see Triton's environment only
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self, timeout_s: float = 90.0) -> None:
        """Start and wait until the server and every model are ready."""
        self._workdir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self._install.binary),
            f"--model-repository={self._repository}",
            f"--backend-directory={self._backends()}",
            f"--cache-directory={self._install.dist_dir / 'caches'}",
            f"--http-address={self._host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self._host}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self._host}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0",
        ]
        if self._explicit:
            args.append("--model-control-mode=explicit")
        LOG.info("starting tritonserver (grpc %s)", self.grpc_url)
        # Its own session (a terminal's Ctrl-C reaches it through us, in order), but not its
        # own life: SIGKILL when the thread that starts it ends, so that a parent killed with
        # SIGKILL leaves no tritonserver behind holding its ports. Start it from the main
        # thread.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                cwd=self._workdir, start_new_session=True,
                preexec_fn=partial(die_with_parent, signal.SIGKILL, os.getpid()),
            )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise ServiceError(
                        f"tritonserver exited with {self._proc.returncode}: {self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        LOG.info("tritonserver ready")
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise ServiceError(f"tritonserver not ready after {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        LOG.info("tritonserver stopped")

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
