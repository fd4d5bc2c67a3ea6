"""The job table's database: one small interface (``Database``: a transaction that runs SQL with
``?`` placeholders) over two real backends, and the versioned schema both are migrated to.

    SQLite      ``jobs.sqlite3`` on the spool volume, WAL mode, ``synchronous=FULL``, each
                transaction ``BEGIN IMMEDIATE`` (one writer at a time, across processes too):
                the embedded default, for one pod (several gateway processes share the file).
    PostgreSQL  for several replicas (the spool then on a ReadWriteMany volume shared by them):
                psycopg 3, one connection per process guarded by a lock, each transaction
                READ COMMITTED; claims take row locks (``FOR UPDATE SKIP LOCKED``) so two
                replicas never claim one group or job.

Migrations: ``schema_version`` holds the version reached; ``MIGRATIONS`` are the ordered steps,
each written for both dialects, applied at open in one transaction per step (under an advisory
lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite, so concurrent starts migrate once). A SQLite
file from before versioning is recognised by its columns (version 1: no group columns;
version 2: grouping).

Secrets: a PostgreSQL password comes from a file or the environment (``DbTarget``), never from
the URL, and is never logged; errors name the error class and the host, not the password.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.gateway.config import POSTGRESQL, SQLITE, DbTarget
from services.gateway.store.durable import DurableDb

__all__ = ["POSTGRESQL", "SQLITE", "Database", "DbTarget", "JobDbError", "JobDbUnavailable",
           "migrate", "open_database"]

LOG = logging.getLogger(__name__)


class JobDbError(Exception):
    """The job table's database is unusable (unreachable, refused, too new a schema)."""


class JobDbUnavailable(JobDbError):
    """The database did not answer now (server restart, network, lock timeout, disk): the
    transaction was rolled back; try again later."""


# SQLite's primary result codes that mean "not now" rather than a bug: BUSY, LOCKED, IOERR,
# FULL, CANTOPEN, PROTOCOL.
_SQLITE_TRANSIENT = frozenset({5, 6, 10, 13, 14, 15})


class Tx(Protocol):
    """One open transaction: ``execute`` runs a statement with ``?`` placeholders and returns
    (rows, rowcount)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple[Any, ...]], int]:
        ...


class Database(Protocol):
    dialect: str
    skip_locked: str  # appended to a claim's inner SELECT: row locks where the backend has them

    def tx(self) -> Any:  # a context manager yielding a ``Tx``
        ...

    def close(self) -> None: ...


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple[Any, ...]], int]:
        cur = self._db.execute(sql, tuple(params))
        rows = cur.fetchall()
        return rows, cur.rowcount


class SqliteDatabase(DurableDb):
    dialect = SQLITE
    skip_locked = ""  # BEGIN IMMEDIATE already makes every transaction the only writer

    def __init__(self, path: Path) -> None:
        super().__init__(path, "job table")

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        try:
            with self._tx() as db:
                yield _SqliteTx(db)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_TRANSIENT:
                raise JobDbUnavailable(f"job table: {exc.sqlite_errorname}") from exc
            raise


class _PgTx:
    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple[Any, ...]], int]:
        self._cur.execute(sql.replace("?", "%s"), tuple(params))
        rows = self._cur.fetchall() if self._cur.description is not None else []
        return rows, self._cur.rowcount


class PostgresDatabase:
    """One connection shared by the process's threads under a lock; a connection that broke
    (server restart, network) is replaced at the next transaction."""

    dialect = POSTGRESQL
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, target: DbTarget, connect_timeout_s: float = 10.0) -> None:
        self.target = target
        self._timeout = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        import psycopg  # imported here: SQLite-only gateways never load the driver
        import psycopg.sql

        try:
            self._conn = psycopg.connect(self.target.url, password=self.target.password(),
                                         autocommit=True, connect_timeout=int(self._timeout),
                                         application_name="bedside-gateway")
            if self.target.schema:  # another served model's job table: its own schema
                name = psycopg.sql.Identifier(self.target.schema)
                with contextlib.suppress(psycopg.errors.UniqueViolation):  # a replica's
                    self._conn.execute(psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                                       .format(name))
                self._conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(name))
        except psycopg.Error as exc:
            raise JobDbUnavailable(f"job table database {self.target.redacted()} unreachable:"
                                   f" {type(exc).__name__}") from None

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        import psycopg

        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._connect()
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield _PgTx(cur)
            except psycopg.OperationalError as exc:
                if self._conn.broken:
                    self._conn = None
                raise JobDbUnavailable(f"job table database {self.target.redacted()}: "
                                       f"{type(exc).__name__}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_database(target: DbTarget, spool_root: Path, file: str) -> Database:
    if target.dialect == SQLITE:
        return SqliteDatabase(spool_root / file)
    return PostgresDatabase(target)


# -- schema -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


def _jobs(table: str, states: str, real: str, grouping: bool) -> str:
    columns = [
        "name TEXT PRIMARY KEY", "study_hash TEXT NOT NULL", "series_hash TEXT NOT NULL",
        "sop_hash TEXT NOT NULL", "protocol TEXT NOT NULL",
        f"state TEXT NOT NULL CONSTRAINT jobs_state_check CHECK (state IN ({states}))",
        "attempts INTEGER NOT NULL DEFAULT 0", f"received_at {real} NOT NULL",
        f"updated_at {real} NOT NULL", "error TEXT",
    ]
    if grouping:
        columns += ["group_key TEXT", "calling_aet TEXT"]
    return f"CREATE TABLE {table} ({', '.join(columns)})"


_V1_STATES = "'received', 'inferred', 'failed'"
_V2_STATES = "'received', 'inferred', 'failed', 'skipped', 'delivered'"
_V1_COLUMNS = ("name, study_hash, series_hash, sop_hash, protocol, state, attempts,"
               " received_at, updated_at, error")
_GROUPS_V2 = """CREATE TABLE {table} (
    key TEXT PRIMARY KEY, level TEXT NOT NULL, study_hash TEXT NOT NULL,
    series_hash TEXT NOT NULL,
    state TEXT NOT NULL CONSTRAINT groups_state_check CHECK (state IN ('open', 'closed')),
    opened_at {real} NOT NULL, updated_at {real} NOT NULL)"""
_GROUPS_V3 = """CREATE TABLE {table} (
    key TEXT PRIMARY KEY, level TEXT NOT NULL, study_hash TEXT NOT NULL,
    series_hash TEXT NOT NULL,
    state TEXT NOT NULL CONSTRAINT groups_state_check
        CHECK (state IN ('open', 'closing', 'closed')),
    opened_at {real} NOT NULL, updated_at {real} NOT NULL,
    due_at {real} NOT NULL DEFAULT 0, owner TEXT)"""
_GROUPS_V2_COLUMNS = "key, level, study_hash, series_hash, state, opened_at, updated_at"
_INDEXES_V2 = ("CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_hash, state)",
               "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)",
               "CREATE INDEX IF NOT EXISTS jobs_group ON jobs (group_key)",
               "CREATE INDEX IF NOT EXISTS groups_state ON groups (state)")
# Shared workers: one open group per (level, study, series) across every process and replica,
# so an instance reaching another process joins the group the first one opened. Duplicates a
# single-owner table may hold are closed first; their received members are re-grouped at start.
_V3_COMMON = (
    "UPDATE groups SET state = 'closed' WHERE state = 'open' AND key NOT IN"
    " (SELECT MIN(key) FROM groups WHERE state = 'open'"
    " GROUP BY level, study_hash, series_hash)",
    "CREATE UNIQUE INDEX groups_one_open ON groups (level, study_hash, series_hash)"
    " WHERE state = 'open'",
    "CREATE INDEX groups_due ON groups (state, due_at)",
    "CREATE INDEX jobs_owner ON jobs (owner, state)",
    "CREATE TABLE workers (owner TEXT PRIMARY KEY, lease_until {real} NOT NULL)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs: one row per acknowledged instance", sqlite=(
        _jobs("jobs", _V1_STATES, "REAL", grouping=False),
        "CREATE INDEX jobs_study ON jobs (study_hash, state)",
        "CREATE INDEX jobs_state ON jobs (state)",
    ), postgresql=(
        _jobs("jobs", _V1_STATES, "DOUBLE PRECISION", grouping=False),
        "CREATE INDEX jobs_study ON jobs (study_hash, state)",
        "CREATE INDEX jobs_state ON jobs (state)",
    )),
    Migration(2, "grouping: skipped and delivered states, group and AE columns, groups", sqlite=(
        # SQLite cannot change a CHECK: the table is rebuilt, its rows kept
        _jobs("jobs_v2", _V2_STATES, "REAL", grouping=True),
        f"INSERT INTO jobs_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM jobs",
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v2 RENAME TO jobs",
        _GROUPS_V2.format(table="groups", real="REAL"),
        *_INDEXES_V2,
    ), postgresql=(
        "ALTER TABLE jobs DROP CONSTRAINT jobs_state_check",
        f"ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ({_V2_STATES}))",
        "ALTER TABLE jobs ADD COLUMN group_key TEXT",
        "ALTER TABLE jobs ADD COLUMN calling_aet TEXT",
        _GROUPS_V2.format(table="groups", real="DOUBLE PRECISION"),
        *_INDEXES_V2,
    )),
    Migration(3, "shared workers: owners and leases, group due times and claims", sqlite=(
        _GROUPS_V3.format(table="groups_v3", real="REAL"),
        f"INSERT INTO groups_v3 ({_GROUPS_V2_COLUMNS}) SELECT {_GROUPS_V2_COLUMNS} FROM groups",
        "DROP TABLE groups",
        "ALTER TABLE groups_v3 RENAME TO groups",
        "CREATE INDEX groups_state ON groups (state)",
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        *(s.format(real="REAL") for s in _V3_COMMON),
    ), postgresql=(
        "ALTER TABLE groups DROP CONSTRAINT groups_state_check",
        "ALTER TABLE groups ADD CONSTRAINT groups_state_check"
        " CHECK (state IN ('open', 'closing', 'closed'))",
        "ALTER TABLE groups ADD COLUMN due_at DOUBLE PRECISION NOT NULL DEFAULT 0",
        "ALTER TABLE groups ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        *(s.format(real="DOUBLE PRECISION") for s in _V3_COMMON),
    )),
)
LATEST = MIGRATIONS[-1].version
_ADVISORY_KEY = 0x6265647369646501  # "bedside" + 1: serializes migrations across replicas


def _has_table(tx: Tx, dialect: str, table: str) -> bool:
    if dialect == SQLITE:
        rows, _ = tx.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
                             (table,))
    else:
        rows, _ = tx.execute("SELECT tablename FROM pg_tables WHERE schemaname ="
                             " current_schema() AND tablename = ?", (table,))
    return bool(rows)


def _version(tx: Tx, dialect: str) -> int:
    if _has_table(tx, dialect, "schema_version"):
        rows, _ = tx.execute("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0
    if not _has_table(tx, dialect, "jobs"):
        return 0
    if dialect == SQLITE:  # a file from before versioning: told by its columns
        cols = {r[1] for r in tx.execute("PRAGMA table_info(jobs)")[0]}
        return 2 if "group_key" in cols else 1
    raise JobDbError("job table database has a jobs table but no schema_version")


def migrate(db: Database, upto: int = LATEST) -> int:
    """Bring the schema to version ``upto``, one transaction per step; the version before."""
    with db.tx() as tx:
        if db.dialect == POSTGRESQL:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
        start = _version(tx, db.dialect)
    if start > LATEST:
        raise JobDbError(f"job table schema version {start} is newer than this gateway's "
                         f"({LATEST}): upgrade the gateway")
    for step in MIGRATIONS:
        if step.version > upto:
            break
        with db.tx() as tx:
            if db.dialect == POSTGRESQL:
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
            if _version(tx, db.dialect) >= step.version:
                continue  # another process got there first
            for sql in step.sqlite if db.dialect == SQLITE else step.postgresql:
                tx.execute(sql)
            if not _has_table(tx, db.dialect, "schema_version"):
                tx.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            tx.execute("DELETE FROM schema_version")
            tx.execute("INSERT INTO schema_version (version) VALUES (?)", (step.version,))
        LOG.info("job table migrated to schema version %d (%s)", step.version, step.what)
    return start
