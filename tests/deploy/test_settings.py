"""Every gateway setting is declared once, as a ``GatewayConfig`` field (default, flag, chart
value); the chart's default values, the commands' flags and the chart's rendered command line
agree with those declarations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import _parser
from services.gateway.config import (
    SAME,
    SETTING,
    GatewayConfig,
    Setting,
    command_default,
    settings,
    settings_from_args,
)
from tests.deploy.chart import CHART, objects, of_kind, render

VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
SPECS = dict(settings())
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GatewayConfig)}

# What the chart derives from other values (model, TLS, auth, routes, Triton address), at its
# defaults (release "demo" in namespace "bedside"); every such setting must be listed.
DERIVED_AT_DEFAULTS: dict[str, Any] = {
    "model_name": "cxr-lesion",
    "triton_grpc_url": "demo-bedside-triton.bedside.svc:8001",
    "api_keys": Path("/etc/bedside/api-keys/keys.yaml"),
    "tls_cert": None, "tls_key": None, "tls_ca": None, "routes_file": None,
    "http_tls": False,  # --plaintext: TLS ends at the ingress unless gateway.tls.enabled
    "dicom_tls": True,
    "job_db": "sqlite",  # postgresql://USER@HOST:PORT/DB with gateway.jobTable.backend postgresql
    "job_db_password_file": None,  # the password comes as $BEDSIDE_JOB_DB_PASSWORD instead
}

# Values that differ from each chart default, for the settings a generic change cannot make
# (choices, addresses, names the chart checks elsewhere).
CHANGED: dict[str, Any] = {
    "ae_title": "OTHER_AE", "group_level": "series",
    "group_timeout_s": 30.0, "allowed_calling_aets": ["CT1", "PACS"],
    "allowed_sources": ["10.1.0.0/16"], "audit_log": "/var/lib/bedside/spool/audit.jsonl",
    "audit_syslog": "syslog.logging.svc:514", "models": ["*"],
    "shadow_versions": ["tiny-cxr=2"], "canary_versions": ["tiny-cxr=3:0.25"],
}


def _lookup(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        assert isinstance(tree, dict) and key in tree, f"{path}: no {key!r}"
        tree = tree[key]
    return tree


def _nest(path: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _typed(name: str, value: Any) -> Any:
    """A chart or flag value as the setting holds it ("" and null: unset)."""
    if value is None or value == "":
        return None
    if "Path" in FIELD_TYPES[name]:
        return Path(value)
    if "tuple" in FIELD_TYPES[name]:
        return tuple(value)
    return value


def _chart_default(name: str, spec: Setting) -> Any:
    default = command_default(name, spec) if spec.chart_default is SAME else spec.chart_default
    return _typed(name, default)


def _gateway_args(values: dict[str, Any]) -> list[str]:
    (sts,) = of_kind(objects(render(values)), "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bedside", "gateway"]
    args: list[str] = container["args"]
    return args


def _parsed(args: list[str]) -> dict[str, Any]:
    return settings_from_args(_parser().parse_args(["gateway", *args]))


def test_every_field_is_declared_with_its_chart_side() -> None:
    fields = [f.name for f in dataclasses.fields(GatewayConfig)]
    assert [f for f in dataclasses.fields(GatewayConfig) if SETTING not in f.metadata] == []
    flags = [spec.flag for spec in SPECS.values()]
    assert len(set(flags)) == len(flags) == len(fields)
    for name, spec in SPECS.items():
        sides = [spec.chart is not None, spec.chart_fixed is not None,
                 name in DERIVED_AT_DEFAULTS]
        assert sides.count(True) == 1, f"{name}: a chart value, a fixed value or derived"
        explained = (spec.chart_fixed is not None or spec.chart is None
                     or spec.command_default is not SAME or spec.chart_default is not SAME)
        assert bool(spec.why) is explained, f"{name}: say why (only) where the chart or " \
                                            "the command departs from the plain default"


def test_chart_defaults_are_the_declared_defaults() -> None:
    """values.yaml holds each setting's default (read as the file says, not as Helm renders)."""
    checked = 0
    for name, spec in SPECS.items():
        if spec.chart is None:
            continue
        assert _typed(name, _lookup(VALUES, spec.chart)) == _chart_default(name, spec), name
        # and the schema knows the value
        node = SCHEMA
        for key in spec.chart.split("."):
            node = node["properties"][key]
        checked += 1
    assert checked >= 20


def test_every_declared_flag_is_on_its_command() -> None:
    sub = next(a for a in _parser()._actions if a.dest == "command").choices
    for command in ("gateway", "serve"):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        declared = {spec.flag for spec in SPECS.values() if command in spec.commands}
        assert declared <= flags, command
        alternatives = {spec.alternative[0] for spec in SPECS.values() if spec.alternative}
        extra = flags - declared - alternatives - {"-h", "--help"}
        assert extra == ({"--triton-grpc-port", "--triton-env"} if command == "serve"
                         else set()), command


def test_rendered_defaults_parse_back_into_the_declared_defaults() -> None:
    """The chart's command line at its defaults, read by `bedside gateway`, is the declared
    defaults, the chart's fixed mount paths and addresses, and what it derives."""
    parsed = _parsed(_gateway_args({}))
    expected: dict[str, Any] = {}
    for name, spec in SPECS.items():
        if spec.chart is not None:
            expected[name] = _chart_default(name, spec)
        elif spec.chart_fixed is not None:
            expected[name] = _typed(name, spec.chart_fixed)
        else:
            expected[name] = DERIVED_AT_DEFAULTS[name]
    assert parsed == expected
    assert parsed["max_pdu_bytes"] == 1024 * 1024  # the chart used to render 65536


def test_each_chart_value_reaches_its_flag() -> None:
    """Every chart value, changed, changes its setting to the same value (numbers included
    that Helm would print in exponent notation)."""
    values: dict[str, Any] = {}
    wanted: dict[str, Any] = {}
    for name, spec in SPECS.items():
        if spec.chart is None:
            continue
        default = _lookup(VALUES, spec.chart)
        if name in CHANGED:
            new = CHANGED[name]
        elif isinstance(default, bool) or not isinstance(default, int | float):
            raise AssertionError(f"{name}: add a changed value to CHANGED")
        elif isinstance(default, float) or "float" in FIELD_TYPES[name]:
            new = default * 2 + 0.5
        else:
            new = default + 1
        assert _typed(name, new) != _typed(name, default), name
        values = _merge(values, _nest(spec.chart, new))
        wanted[name] = _typed(name, new)
    # shadow and canary versions need Triton's explicit model control (the schema says so)
    values = _merge(values, {"triton": {"modelControlMode": "explicit"}})
    parsed = _parsed(_gateway_args(values))
    assert {name: parsed[name] for name in wanted} == wanted


@pytest.mark.parametrize("name", ["max_pdu_bytes", "job_retention_s"])
def test_the_comparison_fails_on_drift(name: str) -> None:
    """The checks above can fail: a chart default apart from the declaration is noticed."""
    spec = SPECS[name]
    assert spec.chart is not None
    drifted = _typed(name, _lookup(VALUES, spec.chart)) * 2
    assert drifted != _chart_default(name, spec)
    parsed = _parsed(_gateway_args(_nest(spec.chart, drifted)))
    assert parsed[name] == drifted != _chart_default(name, spec)
