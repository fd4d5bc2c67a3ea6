"""The routes file: a full example loads (YAML and JSON) into frozen dataclasses, routes match
as documented, and every kind of mistake is a ConfigError that names what is wrong."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from services.errors import ConfigError
from services.gateway.delivery.routing import (
    DimseDestination,
    Retry,
    StowDestination,
    load_routes,
    parse_routes,
)

ROOT = Path(__file__).resolve().parents[2]


def _readme_example() -> str:
    """The routes file example the README documents (so the README cannot drift)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(# routes\.yaml.*?)```", text, re.S)
    assert match, "README lacks the routes.yaml example"
    return match.group(1)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """The files the README example names, relative to the routes file."""
    (tmp_path / "deid.key").write_bytes(b"k" * 32)
    (tmp_path / "research.token").write_text("s3cret-token\n")
    (tmp_path / "pacs-ca.pem").write_text("-")
    (tmp_path / "gateway.pem").write_text("-")
    (tmp_path / "gateway.key").write_text("-")
    return tmp_path


def test_readme_example_loads(folder: Path) -> None:
    path = folder / "routes.yaml"
    path.write_text(_readme_example())
    config = load_routes(path)
    pacs = config.destinations["pacs"]
    assert isinstance(pacs, DimseDestination)
    assert pacs.tls is not None and pacs.tls.ca == folder / "pacs-ca.pem"
    assert pacs.retry == Retry(base_s=2.0, cap_s=300.0, max_attempts=50, max_age_s=86400.0)
    research = config.destinations["research"]
    assert isinstance(research, StowDestination)
    assert research.authorization == "Bearer s3cret-token"
    assert "s3cret" not in repr(research)  # secrets are not in reprs (nor logs)
    assert config.deid_secret == b"k" * 32
    assert "kkkk" not in repr(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].name = "x"  # type: ignore[misc]

    assert config.route_for(("dimse",), ("CT_SCANNER1",)).name == "ct"  # type: ignore[union-attr]
    assert config.route_for(("stow",), ()).name == "research"  # type: ignore[union-attr]
    research_route = config.route_for(("stow",), ())
    assert research_route is not None and research_route.deidentify
    assert research_route.retain_private == (0x00091001,)
    assert config.route_for(("dimse",), ("OTHER",)).name == "default"  # type: ignore[union-attr]

    # The same document as JSON gives the same configuration.
    as_json = folder / "routes.json"
    as_json.write_text(json.dumps(yaml.safe_load(_readme_example())))
    assert load_routes(as_json) == config


def test_no_default_route_means_unmatched_groups_are_not_routed(tmp_path: Path) -> None:
    config = parse_routes({"destinations": {"p": {"type": "dimse", "host": "h", "port": 104,
                                                  "called_aet": "P"}},
                           "routes": [{"name": "mr", "calling_aets": ["MR1"],
                                       "protocols": ["dimse"], "destinations": ["p"]}]},
                          tmp_path)
    assert config.route_for(("dimse",), ("MR1",)) is not None
    assert config.route_for(("stow",), ("MR1",)) is None  # both criteria must match
    assert config.route_for(("dimse",), ("CT1",)) is None


def test_basic_auth_file_becomes_a_basic_authorization(tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("orthanc:pass word\n")
    config = parse_routes({"destinations": {"w": {"type": "stowrs", "url": "http://h/s",
                                                  "basic_auth_file": "auth"}},
                           "routes": [{"name": "d", "default": True, "destinations": "w"}]},
                          tmp_path)
    w = config.destinations["w"]
    assert isinstance(w, StowDestination)
    assert w.authorization == "Basic " + base64.b64encode(b"orthanc:pass word").decode()


DIMSE = {"type": "dimse", "host": "h", "port": 104, "called_aet": "PACS"}
ROUTE = {"name": "d", "default": True, "destinations": ["p"]}


@pytest.mark.parametrize(("doc", "message"), [
    ({"routes": [ROUTE]}, "missing key(s) ['destinations']"),
    ({"destinations": {"p": DIMSE}, "routes": [ROUTE], "extra": 1}, "unknown key(s) ['extra']"),
    ({"destinations": {"p": {**DIMSE, "type": "ftp"}}, "routes": [ROUTE]},
     "'dimse' or 'stowrs'"),
    ({"destinations": {"p": {**DIMSE, "port": 70000}}, "routes": [ROUTE]}, "not a TCP port"),
    ({"destinations": {"p": {**DIMSE, "port": "104"}}, "routes": [ROUTE]},
     "expected an integer"),
    ({"destinations": {"p": {**DIMSE, "called_aet": "A" * 17}}, "routes": [ROUTE]},
     "called_aet"),
    ({"destinations": {"p": {**DIMSE, "hots": "x"}}, "routes": [ROUTE]}, "unknown key(s)"),
    ({"destinations": {"P Q": DIMSE}, "routes": [ROUTE]}, "metric label"),
    ({"destinations": {"p": {**DIMSE, "retry": {"base_s": 0}}}, "routes": [ROUTE]},
     "base_s must be > 0"),
    ({"destinations": {"p": {**DIMSE, "retry": {"max_attempts": 0, "max_age_s": 0}}},
      "routes": [ROUTE]}, "dead-letter"),
    ({"destinations": {"p": {**DIMSE, "tls": {"ca": "missing.pem"}}}, "routes": [ROUTE]},
     "is not a file"),
    ({"destinations": {"p": {"type": "stowrs", "url": "ftp://x"}}, "routes": [ROUTE]},
     "not an http(s) URL"),
    ({"destinations": {"p": {"type": "stowrs", "url": "http://x",
                             "bearer_token_file": "nope"}}, "routes": [ROUTE]}, "cannot read"),
    ({"destinations": {"p": DIMSE}, "routes": []}, "at least one route"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "destinations": ["q"]}]},
     "unknown destination(s) ['q']"),
    ({"destinations": {"p": DIMSE}, "routes": [{"name": "r", "destinations": ["p"]}]},
     "default: true"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "protocols": ["dimse"]}]},
     "a default route has no"),
    ({"destinations": {"p": DIMSE}, "routes": [ROUTE, {**ROUTE, "name": "e"}]},
     "at most one default"),
    ({"destinations": {"p": DIMSE}, "routes": [ROUTE, ROUTE]}, "unique"),
    ({"destinations": {"p": DIMSE}, "routes": [{"name": "r", "protocols": ["ftp"],
                                                "destinations": ["p"]}]}, "'ftp' is not one"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "deidentify": True}]},
     "secret_file"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "deidentify": "yes"}]},
     "true or false"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "retain_private": ["0x00091001"]}]},
     "without deidentify"),
    ({"destinations": {"p": DIMSE}, "routes": [{**ROUTE, "deidentify": True,
                                                "retain_private": ["0x00101001"]}],
      "deidentification": {"secret_file": "k"}}, "not a private tag"),
    ({"destinations": {"p": DIMSE}, "routes": [ROUTE],
      "deidentification": {"secret_file": "short"}}, "at least 16 bytes"),
])
def test_invalid_routes_are_config_errors_saying_what_is_wrong(
        tmp_path: Path, doc: dict[str, object], message: str) -> None:
    (tmp_path / "k").write_bytes(b"x" * 32)
    (tmp_path / "short").write_bytes(b"x" * 8)
    with pytest.raises(ConfigError) as err:
        parse_routes(doc, tmp_path)
    assert message in str(err.value)


def test_unreadable_or_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes file .*missing"):
        load_routes(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routes(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_routes(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_routes(listed)
