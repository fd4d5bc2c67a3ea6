"""Real peers shared by the integration tests that stop and restart them."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient

from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env

STORESCU = "/usr/bin/storescu"
MODEL = TINY_MANIFEST.name


class Triton:
    """The real bundled Triton on fixed ports, so it can be stopped and started again."""

    def __init__(self, repository: Path, work: Path) -> None:
        self._install = TritonInstall.discover(triton_env())
        self._repository, self._work = repository, work
        self.ports = TritonPorts(free_port(), free_port(), free_port())
        self._server: TritonServer | None = None
        self._starts = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self) -> None:
        self._starts += 1
        self._server = TritonServer(self._install, self._repository,
                                    self._work / f"triton{self._starts}", self.ports)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def successful_requests(self) -> int:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            stats = client.get_inference_statistics(MODEL, as_json=True)
        finally:
            client.close()
        return sum(int(m["inference_stats"]["success"].get("count", 0))
                   for m in stats["model_stats"])
