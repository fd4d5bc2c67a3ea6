"""A real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests and benchmarks.

Each ``OrthancServer`` runs its own ``/usr/sbin/Orthanc`` on free HTTP and DICOM ports with its
storage and index in a private folder, the DICOMweb plugin loaded, remote access off (it binds
every interface but answers only loopback callers), no authentication, and TCP_NODELAY=1 (without
it Orthanc's DICOM stalls ~40 ms per instance on Nagle's algorithm). The configuration keeps
Orthanc's defaults for durability (``SyncStorageArea``: fsync after each write), so an ingest
rate measured against it is the rate of a durable PACS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.net import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
AE_TITLE = "ORTHANC"


def dicomweb_plugin() -> Path:
    for folder in PLUGIN_DIRS:
        for candidate in sorted(folder.glob("libOrthancDicomWeb.so*")):
            return candidate
    raise FileNotFoundError("Orthanc's DICOMweb plugin not found: install Debian "
                            "orthanc-dicomweb (scripts/dev.sh setup as root)")


class OrthancServer:
    """Start with ``start()`` (or as a context manager); ``modalities`` maps a name Orthanc's
    REST API uses (``/modalities/<name>/store``) to (AE title, host, port)."""

    def __init__(self, work: Path, modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        if not os.access(ORTHANC, os.X_OK):
            raise FileNotFoundError(f"{ORTHANC} missing: install Debian orthanc "
                                    "(scripts/dev.sh setup as root)")
        self.work = work
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config_path = work / "orthanc.json"
        self.log_path = work / "orthanc.log"
        self._config: dict[str, Any] = {
            "Name": "bedside-test-pacs",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AE_TITLE,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
            "DicomAlwaysAllowStore": True,
            "StableAge": 2,
            **(extra or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self._config, indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(ORTHANC), "--no-jobs", str(self.config_path)], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work,
                env=dict(os.environ, TCP_NODELAY="1"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}: "
                                   + self.log_tail())
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer /system in time: " + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM (Orthanc's clean shutdown), SIGKILL after ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST helpers ------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None, content: bytes | None = None,
             timeout: float = 120) -> Any:
        if content is not None:
            r = httpx.post(f"{self.url}{path}", content=content, timeout=timeout,
                           headers={"Content-Type": "application/dicom"})
        else:
            r = httpx.post(f"{self.url}{path}", json=body, timeout=timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"Orthanc POST {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST /instances: the stored instance's description (ID, ParentStudy, Status)."""
        answer: dict[str, Any] = self.post("/instances", content=data)
        return answer

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's study ID for a StudyInstanceUID, or None."""
        r = httpx.post(f"{self.url}/tools/lookup", content=study_uid.encode("ascii"),
                       timeout=30)
        r.raise_for_status()
        for item in r.json():
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(modalities) -> OrthancServer`` started; every server is stopped at teardown."""
    servers: list[OrthancServer] = []

    def make(modalities: Mapping[str, tuple[str, str, int]] | None = None) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(servers)}", modalities)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
