"""API keys and client-certificate principals, read from a keys file that is re-read when it
changes (rotation without restart).

The keys file is YAML or JSON::

    keys:
      - name: pacs-bridge                 # the principal's name, in audit records
        sha256: 9f2c...                   # hex SHA-256 of the key; the key itself is never stored
        scopes: [submit, read]
      - name: ris                         # a mutual-TLS client: no key, its certificate subject
        subject: "CN=ris.hospital.example,O=Hospital"
        scopes: [infer, read]
        rate_per_s: 20                    # optional: overrides the gateway's per-key rate
        burst: 40

Why SHA-256 and not scrypt: the keys are 256-bit random values made by ``new`` below, not
passwords. A slow KDF protects low-entropy secrets against guessing; against a 256-bit random
key guessing is hopeless either way, and a KDF would cost tens of milliseconds of CPU on every
request (and hand an attacker a cheap way to burn CPU). A stolen keys file still yields no key.
Every stored hash is compared with ``hmac.compare_digest``, all of them on every lookup, so the
time taken does not depend on which entry (if any) matched.

``python -m services.gateway.security.auth new --name X --scopes infer,read`` (or
``bedside keys new``) prints a fresh key once, with the entry to paste into the keys file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ConfigError

LOG = logging.getLogger(__name__)

# What each scope allows. Health and readiness need none.
SCOPES = ("infer", "submit", "read", "metrics", "models")  # models: promote, roll back
KEY_PREFIX = "bsk_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# A changed file is noticed at most this long after the change.
RELOAD_CHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``kind`` is ``api_key``, ``client_cert`` or ``calling_ae``."""

    name: str
    kind: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: float | None = None

    @property
    def label(self) -> str:
        """The principal as written in audit records: ``key:NAME``, ``cert:NAME``,
        ``ae:TITLE``, or ``anonymous`` without authentication."""
        prefix = {"api_key": "key", "client_cert": "cert", "calling_ae": "ae"}.get(self.kind)
        return f"{prefix}:{self.name}" if prefix else self.name


@dataclass(frozen=True)
class KeyEntry:
    name: str
    scopes: frozenset[str]
    sha256: bytes | None = None
    subject: str | None = None
    rate_per_s: float | None = None
    burst: float | None = None

    def principal(self) -> Principal:
        kind = "api_key" if self.sha256 is not None else "client_cert"
        return Principal(self.name, kind, self.scopes, self.rate_per_s, self.burst)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def normalize_subject(subject: str) -> str:
    """``CN=a, O=b``, ``CN=a,O=b`` and ``O=b,CN=a`` name the same subject: Python's ssl lists
    a certificate's attributes in certificate order, gRPC in RFC 4514's reversed order, so
    the attributes are compared sorted."""
    return ",".join(sorted(part.strip() for part in subject.split(",") if part.strip()))


def _positive(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what} must be a positive number")
    return float(value)


def _entry(raw: Any, k: int) -> KeyEntry:
    where = f"keys[{k}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is not a mapping")
    unknown = set(raw) - {"name", "sha256", "subject", "scopes", "rate_per_s", "burst"}
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
    scopes = raw.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where} ({name}): scopes must be a list of {', '.join(SCOPES)}")
    bad = set(scopes) - set(SCOPES)
    if bad:
        raise ConfigError(f"{where} ({name}): unknown scopes {sorted(bad)}; "
                          f"known: {', '.join(SCOPES)}")
    digest, subject = raw.get("sha256"), raw.get("subject")
    if (digest is None) == (subject is None):
        raise ConfigError(f"{where} ({name}): exactly one of sha256 (an API key) or subject "
                          "(a client certificate) is needed")
    if digest is not None and (not isinstance(digest, str) or not _HEX64_RE.match(digest)):
        raise ConfigError(f"{where} ({name}): sha256 must be 64 lower-case hex digits")
    if subject is not None and (not isinstance(subject, str) or "=" not in subject):
        raise ConfigError(f"{where} ({name}): subject must look like 'CN=...,O=...'")
    return KeyEntry(
        name=name, scopes=frozenset(scopes),
        sha256=bytes.fromhex(digest) if digest is not None else None,
        subject=normalize_subject(subject) if subject is not None else None,
        rate_per_s=_positive(raw.get("rate_per_s"), f"{where} ({name}): rate_per_s"),
        burst=_positive(raw.get("burst"), f"{where} ({name}): burst"),
    )


def parse_keys(text: str, source: str) -> tuple[KeyEntry, ...]:
    """Keys file text (JSON, or YAML when PyYAML is installed) -> entries, or ConfigError."""
    doc: Any
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{source} is not JSON, and PyYAML (for YAML) is not "
                              "installed") from exc
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} is neither JSON nor YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'keys' list")
    entries = tuple(_entry(raw, k) for k, raw in enumerate(doc["keys"]))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: duplicate names {dupes}")
    return entries


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows symlinks: a Kubernetes Secret's ..data swap changes it
    return st.st_ino, st.st_mtime_ns, st.st_size


class KeyStore:
    """The keys file, re-read when its inode, mtime or size changes (checked at most once a
    second). A changed file that does not parse is logged and ignored: the keys read before
    stay in force, so a botched edit cannot lock everyone out or let everyone in."""

    def __init__(self, path: Path, clock: Any = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._seen = _fingerprint(path)
            self._entries = parse_keys(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise ConfigError(f"API keys file {path}: {exc.strerror}") from exc
        self._checked = clock()
        LOG.info("API keys: %d entries from %s", len(self._entries), path)
        if not self._entries:
            LOG.warning("the API keys file lists no keys: every authenticated call is refused")

    def _maybe_reload(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            try:
                seen = _fingerprint(self.path)
                if seen == self._seen:
                    return
                entries = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
            except (OSError, ConfigError) as exc:
                LOG.error("API keys file not reloaded, previous keys stay in force: %s", exc)
                return
            self._seen, self._entries = seen, entries
            LOG.info("API keys reloaded: %d entries", len(entries))

    def entries(self) -> tuple[KeyEntry, ...]:
        self._maybe_reload()
        return self._entries

    def by_key(self, key: str) -> Principal | None:
        """The principal whose hash matches ``key``; every entry is compared, in constant
        time, whether or not an earlier one matched."""
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        found = None
        for entry in self.entries():
            if entry.sha256 is not None and hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found.principal() if found is not None else None

    def by_subject(self, subject: str) -> Principal | None:
        wanted = normalize_subject(subject)
        for entry in self.entries():
            if entry.subject is not None and entry.subject == wanted:
                return entry.principal()
        return None


def new_key() -> str:
    """A fresh key: a recognisable prefix (secret scanners, logs review) + 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _new(args: argparse.Namespace) -> int:
    scopes = [s for s in args.scopes.split(",") if s]
    entry: dict[str, Any] = {"name": args.name, "scopes": scopes}
    key = new_key()
    entry["sha256"] = hash_key(key)
    try:
        _entry(entry, 0)  # the same validation the gateway applies
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"API key for {args.name} (shown once; give it to the client, store it nowhere "
          f"else):\n  {key}\n\nAdd this entry to the keys file's 'keys' list:\n"
          f"  - {json.dumps(entry)}")
    return 0


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="generate an API key; print it once with its entry")
    new.add_argument("--name", required=True, help="principal name (audit records)")
    new.add_argument("--scopes", required=True,
                     help=f"comma-separated, from {', '.join(SCOPES)}")


def run(args: argparse.Namespace) -> int:
    return _new(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.security.auth",
                                     description="Bedside gateway API keys")
    add_subcommands(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
