"""`bedside optimize`'s flags are declared once, with the request: the command line a request
writes (`command()`) parses back into the same request, and the parser takes nothing else."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from optimizer.request import (
    CALIBRATION_METHODS,
    DEFAULT_OPENVINO,
    DEFAULT_PRECISIONS,
    OPTION,
    OptimizeRequest,
    from_args,
)
from services.cli import _parser, main


def _paths(base: Path) -> dict[str, Path]:
    return {"checkpoint": base / "model.pt", "manifest": base / "manifest.json",
            "calibration_dir": base / "calibration", "validation_dir": base / "validation",
            "out_dir": base / "out"}


def _round_trip(request: OptimizeRequest) -> OptimizeRequest:
    argv = request.command()
    assert argv[:2] == ["bedside", "optimize"]
    return from_args(_parser().parse_args(argv[1:]))


def _every_option_changed(base: Path) -> OptimizeRequest:
    return OptimizeRequest(
        **_paths(base), threads=3, precisions=("fp32", "int8"),
        calibration_methods=("entropy", "minmax"), objective="throughput-within-slo",
        target="gpu", calibration_limit=16, recovery_max_fraction=0.25, fp16_io="fp16",
        recovery=False, mae_tolerances={"int8": 0.125, "fp16": 0.002},
        openvino=("fp32", "int8"), ov_streams=2, ov_hint="throughput", bench_budget_s=90.0,
        builder="my_models.nets:build")


REQUESTS: dict[str, Callable[[Path], OptimizeRequest]] = {
    "defaults": lambda base: OptimizeRequest(**_paths(base)),
    "every option changed": _every_option_changed,
    "gpu-torch fp32,fp16,bf16": lambda base: OptimizeRequest(
        **_paths(base), target="gpu-torch", precisions=("fp32", "fp16", "bf16")),
    "mae tolerances": lambda base: OptimizeRequest(
        **_paths(base), mae_tolerances={"fp32": 1e-05, "fp16": 0.003, "int8": 0.1}),
    "gpu-torch fp32 only, latency": lambda base: OptimizeRequest(
        **_paths(base), target="gpu-torch", precisions=("fp32",), objective="latency"),
    "state dict with a builder file": lambda base: OptimizeRequest(
        **_paths(base), builder=str(base / "nets.py") + ":build"),
    "every OpenVINO variant, unbounded benchmark": lambda base: OptimizeRequest(
        **_paths(base), openvino=("fp32", "bf16", "int8"), bench_budget_s=float("inf")),
}


@pytest.mark.parametrize("make", list(REQUESTS.values()), ids=list(REQUESTS))
def test_command_parses_back_into_the_same_request(make: Callable[[Path], OptimizeRequest],
                                                   tmp_path: Path) -> None:
    request = make(tmp_path)
    assert _round_trip(request) == request


def test_the_changed_request_changes_every_option_and_writes_every_flag(tmp_path: Path) -> None:
    """So the round trip above covers each declared option, and command() each flag."""
    changed = _every_option_changed(tmp_path)
    default = OptimizeRequest(**_paths(tmp_path))
    optional = [f.name for f in dataclasses.fields(OptimizeRequest)
                if OPTION in f.metadata and f.name not in _paths(tmp_path)]
    assert optional and [n for n in optional if getattr(changed, n) == getattr(default, n)] == []
    sub = next(a for a in _parser()._actions if a.dest == "command").choices["optimize"]
    flags = {s for a in sub._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == set(changed.command()) & flags


def test_round_trip_fails_when_a_value_is_lost(tmp_path: Path) -> None:
    """The comparison can fail: a command line missing one option gives another request."""
    request = _every_option_changed(tmp_path)
    argv = request.command()
    i = argv.index("--calibration-limit")
    del argv[i:i + 2]
    assert from_args(_parser().parse_args(argv[1:])) != request


@pytest.mark.parametrize("target", sorted(DEFAULT_PRECISIONS))
def test_precisions_default_per_target(target: str, tmp_path: Path) -> None:
    argv = OptimizeRequest(**_paths(tmp_path)).command()
    i = argv.index("--precisions")
    del argv[i:i + 2]
    argv[argv.index("--target") + 1] = target
    assert from_args(_parser().parse_args(argv[1:])).precisions == DEFAULT_PRECISIONS[target]


@pytest.mark.parametrize("target", sorted(DEFAULT_OPENVINO))
def test_openvino_variants_default_per_target(target: str, tmp_path: Path) -> None:
    """The command builds every OpenVINO variant for the CPU target unless told otherwise; a
    library caller's request builds none unless it asks."""
    argv = OptimizeRequest(**_paths(tmp_path)).command()
    i = argv.index("--openvino")
    assert argv[i + 1] == "none"
    del argv[i:i + 2]
    argv[argv.index("--target") + 1] = target
    if target == "gpu-torch":
        argv[argv.index("--precisions") + 1] = "fp32"
    assert from_args(_parser().parse_args(argv[1:])).openvino == DEFAULT_OPENVINO[target]
    assert DEFAULT_OPENVINO["cpu"] == ("fp32", "bf16", "int8")


def test_malformed_mae_tolerance_is_a_clean_exit_2(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = OptimizeRequest(**_paths(tmp_path)).command()
    assert main([*argv[1:], "--mae-tolerance", "int8"]) == 2
    assert "--mae-tolerance takes KEY=VALUE" in capsys.readouterr().err


def test_calibration_methods_are_the_quantizers() -> None:
    from optimizer.quantize import METHODS

    assert set(CALIBRATION_METHODS) == set(METHODS)


def test_the_command_builds_its_parser_without_torch_or_onnx() -> None:
    """`bedside --help` and the gateway image (no torch) import the request declarations."""
    code = ("import sys, services.cli; services.cli._parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'monai') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
