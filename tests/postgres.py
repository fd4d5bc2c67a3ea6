"""A real PostgreSQL for the tests (Debian ``postgresql`` 15, installed by scripts/dev.sh): one
server per test session on a free port, data and unix socket in a temporary directory, each
test its own database.

``initdb`` and ``postgres`` refuse to run as root (the tests and CI run as root): they then run
as the ``postgres`` user in a directory it owns. fsync is off: this server holds test data
only; the gateway's durability does not depend on it (the job table's commits are PostgreSQL's
own business in a cluster)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gateway.config import DbTarget

BIN = Path("/usr/lib/postgresql/15/bin")
_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    def __init__(self) -> None:
        if not (BIN / "postgres").exists():
            pytest.fail("PostgreSQL 15 is not installed: run scripts/dev.sh setup")
        self.root = Path(tempfile.mkdtemp(prefix="bedside-pg-"))
        self.port = _free_port()
        self._as: list[str] = []
        self.user = os.environ.get("USER", "postgres")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        self.data = self.root / "data"
        self._proc: subprocess.Popen[bytes] | None = None

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
                  "--no-sync", "-E", "UTF8")
        with (self.root / "log").open("wb") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [*self._as, str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-h", "127.0.0.1", "-k", str(self.root), "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=100"],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start: "
                                       + (self.root / "log").read_text(errors="replace")) from None
                time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def job_db(request: pytest.FixtureRequest) -> DbTarget:
    """The job table's backend, each test run against both: SQLite beside the spool, or a
    fresh database of the session's PostgreSQL."""
    if request.param == "sqlite":
        return DbTarget()
    server: Postgres = request.getfixturevalue("postgres")
    return DbTarget(server.new_database())
