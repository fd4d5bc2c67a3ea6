"""OpenVINO variants: FP32 / BF16 / INT8 built, verified, benchmarked, selected and written as
a repository; NNCF accuracy control passing and stopping at its bound; telemetry off."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.cpu_features import bf16_path, cpu_flags, int8_path, speed_features
from optimizer.ov_repository import CLUSTER_MAX_OPSET, ir_check
from optimizer.ov_runtime import OvOptions, compile_model, read, run
from optimizer.pipeline import OptimizeRequest, OptimizeResult, optimize
from tests.conftest import ROOT, TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH

HAS_BF16 = bf16_path(cpu_flags()) is not None


def _request(tiny_model: Path, tiny_data: Path, out: Path, **kw: object) -> OptimizeRequest:
    return OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=out, threads=1, bench=QUICK_BENCH, calibration_methods=("minmax",),
        **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ov_result(tiny_model: Path, tiny_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[OptimizeResult]:
    """ONNX Runtime FP32 and every OpenVINO variant. An FP32 MAE ceiling of 0 fails both FP32
    variants, so that an OpenVINO one (BF16 or INT8) is selected and written. INT8 is judged
    by the absolute seed rung: the random model's outputs barely vary, so it would miss its
    scale-aware one (optimizer.verify) and accuracy control would replace it."""
    out = tmp_path_factory.mktemp("ov")
    yield optimize(_request(tiny_model, tiny_data, out, precisions=("fp32",),
                            openvino=("fp32", "bf16", "int8"), ov_streams=1, ov_hint="latency",
                            mae_tolerances={"fp32": 0.0, "int8": 0.05}))


def _variants(result: OptimizeResult) -> dict[str, dict[str, object]]:
    return {str(v["name"]): v for v in result.report["variants"]}


def test_openvino_variants_are_verified_benchmarked_and_reported(
        ov_result: OptimizeResult) -> None:
    variants = _variants(ov_result)
    expected = {"onnx-fp32", "openvino-fp32", "openvino-int8"} | (
        {"openvino-bf16"} if HAS_BF16 else set())
    assert set(variants) >= expected
    fp32 = variants["openvino-fp32"]
    assert fp32["runtime"] == "openvino-cpu"
    assert fp32["reasons"] == [f"MAE {fp32['mae']:.3g} >= tolerance 0"]  # the forced failure
    assert fp32["mae"] < 1e-5  # run in f32, not in the BF16 the plugin would pick by default
    assert fp32["details"]["inference_precision"] == "f32"  # type: ignore[index]
    int8 = variants["openvino-int8"]
    assert int8["details"]["quantizer"] == "nncf"  # type: ignore[index]
    assert int8["mae_tolerance"] == 0.05 and int8["precision"] == "int8"
    # INT8 kernels really ran: the executed graph has i8 primitives
    assert any("i8" in k.lower() for k in int8["details"]["kernels"])  # type: ignore[index]
    assert int8["verdict"] == "pass"
    for v in (fp32, int8):
        lat = v["latency_ms"]
        assert lat["p99"] >= lat["p95"] >= lat["p50"] > 0  # type: ignore[index]
        assert v["size_bytes"] > 0 and str(v["file"]).endswith("model.xml")
        assert v["details"]["cluster_check"]["loads"]  # type: ignore[index]
        assert v["details"]["threads"] == 1 and v["details"]["streams"] == 1  # type: ignore[index]
    steps = {s["step"]: s["status"] for s in json.loads(
        (ov_result.report_json.parent / "steps.json").read_text())}
    assert steps["openvino_fp32"] == "ok" and steps["openvino_int8"] == "ok"
    assert steps["openvino_bf16"] == ("ok" if HAS_BF16 else "skipped")
    assert steps["benchmark_openvino-fp32"] == "ok"


@pytest.mark.skipif(not HAS_BF16, reason="the BF16 variant needs a CPU with native BF16; "
                    "test_bf16_is_skipped_with_the_reason_where_the_cpu_lacks_it covers others")
def test_bf16_variant_has_its_own_tolerance(ov_result: OptimizeResult) -> None:
    bf16 = _variants(ov_result)["openvino-bf16"]
    assert bf16["mae_tolerance"] == 1e-2 and bf16["precision"] == "bf16"
    assert bf16["details"]["inference_precision"] == "bf16"  # type: ignore[index]
    assert any("bf16" in k.lower() for k in bf16["details"]["kernels"])  # type: ignore[index]
    fp32 = _variants(ov_result)["openvino-fp32"]
    assert float(bf16["mae"]) > float(fp32["mae"])  # type: ignore[arg-type]


def test_bf16_is_skipped_with_the_reason_where_the_cpu_lacks_it_faked_flags(
        tiny_model: Path, tiny_data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer import ov_variants

    monkeypatch.setattr(ov_variants, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    result = optimize(_request(tiny_model, tiny_data, tmp_path, precisions=("fp32",),
                               openvino=("bf16",)))
    assert "openvino-bf16" not in _variants(result)
    [skip] = [s for s in result.report["not_built"] if s["name"] == "openvino_bf16"]
    assert skip["status"] == "skipped" and "no native BF16" in skip["reason"]


def test_report_names_cpu_features_and_reproduce_has_the_flags(
        ov_result: OptimizeResult) -> None:
    hw = ov_result.report["hardware"]
    assert hw["cpu_features"] == speed_features(cpu_flags())
    assert hw["paths"]["int8"] == int8_path(cpu_flags())
    assert hw["openvino_settings"] == {"threads": 1, "streams": 1, "hint": "latency"}
    assert "openvino" in hw and "nncf" in hw and "INT8" in hw["openvino_capabilities"]
    md = ov_result.report_md.read_text()
    assert "CPU features: " in md and "- openvino-int8: inference precision f32" in md
    assert "Step durations (" in md and "openvino_int8 " in md
    script = (ov_result.report_json.parent / "reproduce.sh").read_text()
    for flag in ("--threads 1", "--openvino fp32,bf16,int8", "--ov-streams 1",
                 "--ov-hint latency", "--bench-budget"):
        assert flag in script


def test_selected_openvino_variant_is_written_for_both_triton_backends(
        ov_result: OptimizeResult, tiny_data: Path) -> None:
    report = ov_result.report
    chosen = _variants(ov_result)[report["selected"]]
    model_dir = ov_result.repository / TINY_MANIFEST.name
    if chosen["runtime"] != "openvino-cpu":
        pytest.fail(f"an OpenVINO variant should be the fastest here, got {chosen['name']}")
    version = model_dir / "1"
    assert (version / "model.xml").read_bytes() == (
        ov_result.report_json.parent / str(chosen["file"])).read_bytes()
    assert (version / "model.bin").stat().st_size > 0
    assert "import openvino" in (version / "model.py").read_text()
    local = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert local.backend == "python" and local.max_batch_size == 8
    params = {k: v.string_value for k, v in local.parameters.items()}
    assert params["openvino_file"] == "model.xml" and "onnx_file" not in params
    assert params["INFERENCE_PRECISION_HINT"] == chosen["details"]["inference_precision"]  # type: ignore[index]
    assert params["NUM_STREAMS"] == "1" and params["PERFORMANCE_HINT"] == "LATENCY"
    cluster = text_format.Parse((model_dir / "configs" / "openvino.pbtxt").read_text(),
                                mc.ModelConfig())
    assert cluster.backend == "openvino" and cluster.default_model_filename == "model.xml"
    # only parameters the 24.10 openvino backend parses (others fail the model's load)
    assert set(cluster.parameters) <= {"INFERENCE_NUM_THREADS", "NUM_STREAMS",
                                       "PERFORMANCE_HINT", "HINT_BF16", "bedside_precision"}
    assert cluster.parameters["INFERENCE_NUM_THREADS"].string_value == "1"
    assert ("HINT_BF16" in cluster.parameters) == (chosen["precision"] == "bf16")
    assert list(cluster.input[0].dims) == [1, 64, 64]
    # the served IR answers like the verified variant
    from optimizer.dataset import load_labelled

    x = load_labelled(tiny_data / "validation", TINY_MANIFEST).inputs[:4]
    options = OvOptions(threads=1)
    served = run(compile_model(read(version / "model.xml"), str(chosen["precision"]), options), x)
    verified = run(compile_model(read(ov_result.report_json.parent / str(chosen["file"])),
                                 str(chosen["precision"]), options), x)
    np.testing.assert_array_equal(served, verified)


def test_ir_check_flags_operations_newer_than_the_cluster_openvino(tmp_path: Path) -> None:
    xml = tmp_path / "model.xml"
    xml.write_text('<?xml version="1.0"?>\n<net name="m" version="11"><layers>'
                   '<layer id="0" name="x" type="Parameter" version="opset1"/>'
                   f'<layer id="1" name="y" type="Foo" version="opset{CLUSTER_MAX_OPSET + 2}"/>'
                   '<layer id="2" name="z" type="Bar" version="extension"/>'
                   '</layers></net>')
    check = ir_check(xml)
    assert not check["loads"] and check["newest_opset"] == CLUSTER_MAX_OPSET + 2
    assert any("Foo needs opset" in p for p in check["problems"])
    assert any("Bar comes from 'extension'" in p for p in check["problems"])
    xml.write_text(xml.read_text().replace('version="11"', 'version="12"', 1)
                   .replace(f"opset{CLUSTER_MAX_OPSET + 2}", "opset1")
                   .replace('"extension"', '"opset3"'))
    check = ir_check(xml)
    assert not check["loads"] and check["problems"][0].startswith("IR version 12")


def details_held_out(variant: dict[str, object]) -> object:
    return variant["details"]["held_out_items"]  # type: ignore[index]


def test_accuracy_control_recovers_a_failing_int8(ov_result: OptimizeResult, tiny_model: Path,
                                                  tiny_data: Path, tmp_path: Path) -> None:
    # the plain NNCF INT8 of the same model and calibration set, which passed at 0.05; the
    # bound leaves the held-out half (which accuracy control never sees) room to pass too
    plain_mae = float(_variants(ov_result)["openvino-int8"]["mae"])  # type: ignore[arg-type]
    result = optimize(_request(tiny_model, tiny_data, tmp_path, precisions=("fp32",),
                               openvino=("int8",), mae_tolerances={"int8": plain_mae * 0.85}))
    ac = _variants(result)["openvino-int8-ac"]
    assert ac["verdict"] == "pass", ac["reasons"]
    assert float(ac["mae"]) < plain_mae * 0.85  # type: ignore[arg-type]
    assert details_held_out(ac) == 12
    details = ac["details"]
    assert details["fp32_nodes"]  # type: ignore[index]
    assert details["accuracy_control"]["score_final"] <= 1.0  # type: ignore[index]
    assert details["accuracy_control"]["score_plain"] > 1.0  # type: ignore[index]
    assert any("MAE" in r for r in details["plain_int8_reasons"])  # type: ignore[index]
    assert "Accuracy recovery for openvino-int8-ac" in result.report_md.read_text()


def test_accuracy_control_that_cannot_meet_its_budget_ends_failed_with_the_reason(
        tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = optimize(_request(tiny_model, tiny_data, tmp_path, precisions=("fp32",),
                               openvino=("int8",), mae_tolerances={"int8": 1e-12},
                               recovery_max_fraction=0.02))
    ac = _variants(result)["openvino-int8-ac"]
    assert ac["verdict"] == "fail"
    assert ac["reasons"] and "MAE" in ac["reasons"][0]  # type: ignore[index]
    control = ac["details"]["accuracy_control"]  # type: ignore[index]
    assert control["max_iterations"] == 1  # 2% of the quantized ops, at least one
    assert len(control["fp32_ops"]) <= 1 and control["score_final"] > 1.0
    assert result.report["selected"] == "onnx-fp32"
    md = result.report_md.read_text()
    assert "- openvino-int8-ac: MAE" in md  # "Why variants failed"


def test_openvino_is_skipped_on_the_gpu_target(tiny_model: Path, tiny_data: Path,
                                               tmp_path: Path) -> None:
    result = optimize(_request(tiny_model, tiny_data, tmp_path, precisions=("fp32",),
                               openvino=("fp32",), target="gpu"))
    assert all(v["runtime"] != "openvino-cpu" for v in result.report["variants"])
    [skip] = [s for s in result.report["not_built"] if s["name"] == "openvino"]
    assert "target gpu" in skip["reason"]


def test_telemetry_module_never_loads() -> None:
    """In a fresh interpreter (NNCF stubs its telemetry by itself under pytest): importing
    through optimizer.ov_runtime leaves openvino_telemetry unloaded and NNCF on its stub."""
    code = ("import sys\nfrom optimizer.ov_runtime import nncf, openvino\nopenvino(); nncf()\n"
            "import nncf.telemetry.wrapper as w\n"
            "print(sys.modules['openvino_telemetry'] is None, type(w.telemetry).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "MagicMock"]


def test_request_validation_for_openvino() -> None:
    for bad in ({"openvino": ("int4",)}, {"ov_streams": 0}, {"ov_hint": "fast"},
                {"mae_tolerances": {"fp8": 0.1}}):
        with pytest.raises(ValueError):
            OptimizeRequest(checkpoint=Path("m"), manifest=Path("m"), calibration_dir=Path("c"),
                            validation_dir=Path("v"), out_dir=Path("o"), **bad)  # type: ignore[arg-type]
    ok = OptimizeRequest(checkpoint=Path("m"), manifest=Path("m"), calibration_dir=Path("c"),
                         validation_dir=Path("v"), out_dir=Path("o"),
                         mae_tolerances={"bf16": 0.02})
    assert ok.mae_tolerances == {"bf16": 0.02}
