"""Where results go: destinations (a PACS by C-STORE, a DICOMweb server by STOW-RS) and the
routes that pick them for a group of instances by calling AE title and/or protocol, with
optional per-route de-identification (``deidentify``: for research archives and external
services) and the return path (``reidentify``: objects coming back about a de-identified study,
re-identified and delivered into the original study, for the hospital's own PACS).

Loaded once at start-up from a YAML or JSON file (``bedside gateway --routes FILE``), validated
into frozen dataclasses; anything wrong is a ``ConfigError`` naming the offending key. Secrets
(the de-identification key, a bearer token, basic-auth credentials) are never in the file
itself: it names files that hold them, read here once and never logged.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from services.errors import ConfigError

_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,39}$")  # metric label values: bounded, plain
PROTOCOLS = ("dimse", "stow", "rest", "recovered")


@dataclass(frozen=True)
class Retry:
    """Exponential backoff: attempt n waits ``min(cap_s, base_s * 2**(n-1))``; the row goes to
    dead-letter after ``max_attempts`` failed attempts or once it is ``max_age_s`` old,
    whichever comes first (0 disables that limit; at least one must be set)."""

    base_s: float = 1.0
    cap_s: float = 300.0
    max_attempts: int = 20
    max_age_s: float = 86400.0

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ConfigError("retry: base_s must be > 0 and cap_s >= base_s")
        if self.max_attempts < 0 or self.max_age_s < 0:
            raise ConfigError("retry: max_attempts and max_age_s must be >= 0")
        if self.max_attempts == 0 and self.max_age_s == 0:
            raise ConfigError("retry: set max_attempts or max_age_s (a destination that keeps "
                              "failing must end in the dead-letter state)")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        return float(min(self.cap_s, self.base_s * 2 ** max(0, attempts - 1)))

    def exhausted(self, attempts: int, age_s: float) -> bool:
        return ((self.max_attempts > 0 and attempts >= self.max_attempts)
                or (self.max_age_s > 0 and age_s >= self.max_age_s))


@dataclass(frozen=True)
class Tls:
    """Client-side TLS: ``ca`` verifies the server (system CAs when absent); ``cert`` + ``key``
    present a client certificate (mutual TLS); ``server_name`` overrides the name checked
    against the server's certificate (the host by default)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls: cert and key go together")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"tls: {name} {path} is not a file")

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.ca) if self.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.cert is not None and self.key is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls: client certificate or key unusable: {exc}") from exc
        return ctx


@dataclass(frozen=True)
class DimseDestination:
    """A C-STORE SCP (a PACS): we associate as ``calling_aet`` to ``called_aet`` at host:port."""

    name: str
    host: str
    port: int
    called_aet: str
    calling_aet: str = "BEDSIDE"
    tls: Tls | None = None
    timeout_s: float = 30.0
    retry: Retry = field(default_factory=Retry)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not self.host:
            raise ConfigError(f"destination {self.name}: host is empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"destination {self.name}: port {self.port} is not a TCP port")
        for key in ("called_aet", "calling_aet"):
            aet = getattr(self, key)
            if not _AE_RE.match(aet) or aet != aet.strip():
                raise ConfigError(f"destination {self.name}: {key} {aet!r}: 1-16 printable "
                                  "characters, no '\\', no surrounding spaces")
        if self.timeout_s <= 0:
            raise ConfigError(f"destination {self.name}: timeout_s must be > 0")


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb STOW-RS service: instances are POSTed to ``url`` (e.g.
    ``https://pacs/dicom-web/studies``). Credentials are read from files at load time."""

    name: str
    url: str
    tls: Tls | None = None
    timeout_s: float = 30.0
    retry: Retry = field(default_factory=Retry)
    # The Authorization header value (``Bearer ...`` or ``Basic ...``); never logged or shown.
    authorization: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"destination {self.name}: url {self.url!r} is not an http(s) URL")
        if self.tls is not None and parts.scheme != "https":
            raise ConfigError(f"destination {self.name}: tls options need an https URL")
        if self.tls is not None and self.tls.server_name is not None:
            raise ConfigError(f"destination {self.name}: tls.server_name is for DICOM TLS; "
                              "an https URL is checked against its own host name")
        if self.timeout_s <= 0:
            raise ConfigError(f"destination {self.name}: timeout_s must be > 0")


Destination = DimseDestination | StowDestination


@dataclass(frozen=True)
class Route:
    """Matches a group when every given criterion matches (an empty one matches anything):
    one of the group's calling AE titles is in ``calling_aets``, one of its protocols is in
    ``protocols``, the model whose results it carries is in ``models``. A ``default`` route has
    no criteria and is used when no other matches."""

    name: str
    destinations: tuple[str, ...]
    calling_aets: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    default: bool = False
    models: tuple[str, ...] = ()  # model names (manifest names); checked against those served
    deidentify: bool = False
    # Private tags (as 0xGGGGEEEE) kept by de-identification; all other private tags go.
    retain_private: tuple[int, ...] = ()
    # An instance arriving on this route that is about a study a ``deidentify`` route sent out
    # (its Study Instance UID or the UIDs it references are in the reverse map) is not
    # inferred: it is re-identified and delivered to this route's destinations.
    reidentify: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "route")
        if not self.destinations:
            raise ConfigError(f"route {self.name}: names no destination")
        if self.default and (self.calling_aets or self.protocols or self.models):
            raise ConfigError(f"route {self.name}: a default route has no calling_aets, "
                              "protocols or models")
        if not self.default and not (self.calling_aets or self.protocols or self.models):
            raise ConfigError(f"route {self.name}: give calling_aets, protocols and/or models, "
                              "or mark it default: true")
        for aet in self.calling_aets:
            if not _AE_RE.match(aet) or aet != aet.strip():
                raise ConfigError(f"route {self.name}: calling AE title {aet!r} is not valid")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ConfigError(f"route {self.name}: protocol {protocol!r} is not one of "
                                  f"{', '.join(PROTOCOLS)}")
        if self.retain_private and not self.deidentify:
            raise ConfigError(f"route {self.name}: retain_private without deidentify: true")
        if self.reidentify and self.deidentify:
            raise ConfigError(f"route {self.name}: deidentify and reidentify exclude each "
                              "other (identified results go to identified destinations)")

    def matches(self, protocols: Sequence[str], calling_aets: Sequence[str],
                model: str = "") -> bool:
        if self.default:
            return False
        return ((not self.calling_aets or any(a in self.calling_aets for a in calling_aets))
                and (not self.protocols or any(p in self.protocols for p in protocols))
                and (not self.models or model in self.models))


@dataclass(frozen=True)
class RoutesConfig:
    destinations: Mapping[str, Destination]
    routes: tuple[Route, ...]
    # Key of the consistent UID remapping (HMAC); required when a route de-identifies.
    deid_secret: bytes | None = field(default=None, repr=False)
    # How long the reverse map keeps a study after its last de-identified copy went out: an
    # object coming back later is no longer recognised (and is treated as any other).
    deid_retention_s: float = 365 * 86400.0

    def check_models(self, served: Sequence[str]) -> None:
        """ConfigError when a route names a model the gateway does not serve (checked at
        start, when the served models are known)."""
        for route in self.routes:
            unknown = [m for m in route.models if m not in served]
            if unknown:
                raise ConfigError(f"route {route.name}: model(s) {unknown} not served by this "
                                  f"gateway ({', '.join(served)})")

    def __post_init__(self) -> None:
        if not self.routes:
            raise ConfigError("routes: at least one route")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ConfigError("routes: route names must be unique")
        if sum(r.default for r in self.routes) > 1:
            raise ConfigError("routes: at most one default route")
        for route in self.routes:
            unknown = [d for d in route.destinations if d not in self.destinations]
            if unknown:
                raise ConfigError(f"route {route.name}: unknown destination(s) {unknown}")
        if any(r.deidentify for r in self.routes) and self.deid_secret is None:
            raise ConfigError("a route de-identifies: give deidentification.secret_file")
        if any(r.reidentify for r in self.routes) and not any(r.deidentify
                                                            for r in self.routes):
            raise ConfigError("a route re-identifies, but no route de-identifies: nothing "
                              "can come back")
        if self.deid_retention_s <= 0:
            raise ConfigError("deidentification.retention_days must be > 0")
        if self.deid_secret is not None and len(self.deid_secret) < 16:
            raise ConfigError("deidentification secret: at least 16 bytes")

    def route_for(self, protocols: Sequence[str], calling_aets: Sequence[str],
                  model: str = "") -> Route | None:
        """The first matching route in file order, else the default route, else None."""
        for route in self.routes:
            if route.matches(protocols, calling_aets, model):
                return route
        return next((r for r in self.routes if r.default), None)


def _check_name(name: str, what: str = "destination") -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(f"{what} name {name!r}: 1-40 of a-z, 0-9, '_', '-' (it is a metric "
                          "label)")


def _keys(where: str, raw: Mapping[str, Any], allowed: set[str],
          required: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")


def _mapping(where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _strings(where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a string or a list of strings")
    return tuple(value)


def _number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _integer(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _path(base: Path, value: object, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a file path")
    path = Path(value)
    return path if path.is_absolute() else (base / path)


def _secret_file(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    if not data:
        raise ConfigError(f"{where}: {path} is empty")
    return data


def _retry(where: str, raw: object) -> Retry:
    raw = _mapping(where, raw)
    _keys(where, raw, {"base_s", "cap_s", "max_attempts", "max_age_s"})
    kwargs: dict[str, Any] = {}
    for key in ("base_s", "cap_s", "max_age_s"):
        if key in raw:
            kwargs[key] = _number(f"{where}.{key}", raw[key])
    if "max_attempts" in raw:
        kwargs["max_attempts"] = _integer(f"{where}.max_attempts", raw["max_attempts"])
    try:
        return Retry(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _tls(base: Path, where: str, raw: object) -> Tls:
    raw = _mapping(where, raw)
    _keys(where, raw, {"ca", "cert", "key", "server_name"})
    server_name = raw.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise ConfigError(f"{where}.server_name: expected a string")
    try:
        return Tls(**{k: _path(base, raw[k], f"{where}.{k}")
                      for k in ("ca", "cert", "key") if k in raw}, server_name=server_name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _destination(base: Path, name: str, raw: object) -> Destination:
    where = f"destinations.{name}"
    raw = _mapping(where, raw)
    kind = raw.get("type")
    common: dict[str, Any] = {"name": name}
    if "timeout_s" in raw:
        common["timeout_s"] = _number(f"{where}.timeout_s", raw["timeout_s"])
    if "retry" in raw:
        common["retry"] = _retry(f"{where}.retry", raw["retry"])
    if "tls" in raw:
        common["tls"] = _tls(base, f"{where}.tls", raw["tls"])
    if kind == "dimse":
        _keys(where, raw, {"type", "host", "port", "called_aet", "calling_aet", "tls",
                           "timeout_s", "retry"}, {"host", "port", "called_aet"})
        if not isinstance(raw["host"], str) or not isinstance(raw["called_aet"], str):
            raise ConfigError(f"{where}: host and called_aet are strings")
        calling = raw.get("calling_aet", "BEDSIDE")
        if not isinstance(calling, str):
            raise ConfigError(f"{where}.calling_aet: expected a string")
        return DimseDestination(host=raw["host"], port=_integer(f"{where}.port", raw["port"]),
                                called_aet=raw["called_aet"], calling_aet=calling, **common)
    if kind == "stowrs":
        _keys(where, raw, {"type", "url", "tls", "timeout_s", "retry", "bearer_token_file",
                           "basic_auth_file"}, {"url"})
        if "bearer_token_file" in raw and "basic_auth_file" in raw:
            raise ConfigError(f"{where}: bearer_token_file or basic_auth_file, not both")
        if not isinstance(raw["url"], str):
            raise ConfigError(f"{where}.url: expected a string")
        if "bearer_token_file" in raw:
            token = _secret_file(_path(base, raw["bearer_token_file"], where), where)
            common["authorization"] = "Bearer " + token.decode("ascii", "strict")
        if "basic_auth_file" in raw:
            import base64

            pair = _secret_file(_path(base, raw["basic_auth_file"], where), where)
            if b":" not in pair:
                raise ConfigError(f"{where}: basic_auth_file holds user:password")
            common["authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return StowDestination(url=raw["url"].rstrip("/"), **common)
    raise ConfigError(f"{where}.type: 'dimse' or 'stowrs', got {kind!r}")


def _tag(where: str, value: object) -> int:
    try:
        tag = int(value, 16) if isinstance(value, str) else _integer(where, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not a tag (e.g. '0x00091001')") from exc
    if not 0 <= tag < 2**32 or not (tag >> 16) % 2:
        raise ConfigError(f"{where}: {value!r} is not a private tag (odd group)")
    return tag


def _route(raw: object, index: int) -> Route:
    where = f"routes[{index}]"
    raw = _mapping(where, raw)
    _keys(where, raw, {"name", "destinations", "calling_aets", "protocols", "default",
                       "deidentify", "retain_private", "reidentify", "models"},
              {"name", "destinations"})
    name = raw["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a string")
    for key in ("default", "deidentify", "reidentify"):
        if not isinstance(raw.get(key, False), bool):
            raise ConfigError(f"route {name}.{key}: true or false")
    retain = raw.get("retain_private", [])
    if not isinstance(retain, list):
        raise ConfigError(f"route {name}.retain_private: a list of private tags")
    return Route(
        name=name, destinations=_strings(f"route {name}.destinations", raw["destinations"]),
        calling_aets=_strings(f"route {name}.calling_aets", raw.get("calling_aets", [])),
        protocols=_strings(f"route {name}.protocols", raw.get("protocols", [])),
        models=_strings(f"route {name}.models", raw.get("models", [])),
        default=raw.get("default", False), deidentify=raw.get("deidentify", False),
        reidentify=raw.get("reidentify", False),
        retain_private=tuple(_tag(f"route {name}.retain_private", t) for t in retain))


def parse_routes(raw: object, base: Path) -> RoutesConfig:
    """A parsed routes document -> RoutesConfig; relative file paths are relative to ``base``
    (the routes file's folder)."""
    raw = _mapping("routes file", raw)
    _keys("routes file", raw, {"destinations", "routes", "deidentification"},
          {"destinations", "routes"})
    destinations = {str(name): _destination(base, str(name), value)
                    for name, value in _mapping("destinations", raw["destinations"]).items()}
    if not isinstance(raw["routes"], list):
        raise ConfigError("routes: expected a list of routes")
    routes = tuple(_route(r, k) for k, r in enumerate(raw["routes"]))
    secret = None
    extra: dict[str, Any] = {}
    if "deidentification" in raw:
        deid = _mapping("deidentification", raw["deidentification"])
        _keys("deidentification", deid, {"secret_file", "retention_days"}, {"secret_file"})
        secret = _secret_file(_path(base, deid["secret_file"], "deidentification.secret_file"),
                              "deidentification.secret_file")
        if "retention_days" in deid:
            extra["deid_retention_s"] = _number("deidentification.retention_days",
                                                deid["retention_days"]) * 86400.0
    return RoutesConfig(destinations=destinations, routes=routes, deid_secret=secret, **extra)


def load_routes(path: Path) -> RoutesConfig:
    """Read and validate a routes file (``.json``, else YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"routes file {path}: {exc.strerror}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"routes file {path} is not valid "
                          f"{'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return parse_routes(raw, path.parent.absolute())
