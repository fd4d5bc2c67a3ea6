from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.contract.manifest import Manifest
from optimizer.errors import DatasetError
from optimizer.pipeline import OptimizeRequest, optimize
from tests.conftest import TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH


def test_report_has_stable_keys_and_both_variants(optimized: Path) -> None:
    report = json.loads((optimized / "report.json").read_text())
    assert report["report_version"] == 2
    names = [v["name"] for v in report["variants"]]
    assert names[:2] == ["onnx-fp32", "onnx-fp16"] and names[2].startswith("onnx-int8-")
    for v in report["variants"]:
        for key in ("precision", "mae", "metric", "metric_delta", "decision_agreement",
                    "verdict", "latency_ms", "batches", "best_throughput_per_s",
                    "speedup_vs_pytorch", "size_bytes", "peak_memory_mb"):
            assert key in v
        assert v["metric"] == "auc"
        assert v["latency_ms"]["p99"] >= v["latency_ms"]["p95"] >= v["latency_ms"]["p50"] > 0
        assert v["speedup_vs_pytorch"] == pytest.approx(
            report["baseline"]["latency_ms"]["p50"] / v["latency_ms"]["p50"], rel=1e-2)
        assert [b["batch"] for b in v["batches"]][:2] == [1, 2]
    fp32 = report["variants"][0]
    assert fp32["verdict"] == "pass" and fp32["mae"] < 1e-5
    assert report["variants"][1]["mae"] < 1e-3  # FP16 within its rung of the ladder
    passing = [v for v in report["variants"] if v["verdict"] == "pass"]
    fastest = min(passing, key=lambda v: v["latency_ms"]["p50"])
    assert report["selected"] == fastest["name"]  # objective "latency"
    served = optimized / "repository" / TINY_MANIFEST.name / "1" / "model.onnx"
    assert served.read_bytes() == (optimized / fastest["file"]).read_bytes()
    assert set(report["inputs_sha256"]) == {"checkpoint", "manifest", "calibration",
                                            "validation"}
    md = (optimized / "report.md").read_text()
    assert "| onnx-fp32 | fp32 |" in md and "| onnx-int8-" in md and "| onnx-fp16 | fp16 |" in md
    for plot in report["plots"]:
        assert (optimized / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bedside optimize --checkpoint" in (optimized / "reproduce.sh").read_text()


def test_steps_are_recorded(optimized: Path) -> None:
    steps = json.loads((optimized / "steps.json").read_text())
    status = {s["step"]: s["status"] for s in steps}
    assert status["export_onnx_fp32"] == "ok"
    assert status["int8"] == "ok" and status["fp16"] == "ok"
    assert status["tensorrt"] == "skipped"
    assert status["write_report"] == "ok"


def test_repository_layout_and_config(optimized: Path) -> None:
    model_dir = optimized / "repository" / TINY_MANIFEST.name
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.name == TINY_MANIFEST.name and cfg.backend == "python"
    assert cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [1, 64, 64] and cfg.input[0].data_type == mc.TYPE_FP32
    assert cfg.input[0].name == "image" and cfg.output[0].name == "logits"
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert cfg.model_warmup[0].inputs["image"].zero_data
    assert Manifest.load(model_dir / "manifest.json") == TINY_MANIFEST
    assert (model_dir / "1" / "model.onnx").stat().st_size > 0
    assert "TritonPythonModel" in (model_dir / "1" / "model.py").read_text()


def test_failed_step_is_recorded(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels\.csv"):
        optimize(OptimizeRequest(
            checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
            calibration_dir=tiny_data / "calibration", validation_dir=tmp_path,
            out_dir=tmp_path / "out", threads=1, bench=QUICK_BENCH,
        ))
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert steps[-1]["step"] == "load_validation" and steps[-1]["status"] == "failed"


def test_nothing_passing_is_a_selection_error(tiny_model: Path, tiny_data: Path,
                                              tmp_path: Path) -> None:
    from optimizer.errors import SelectionError

    with pytest.raises(SelectionError, match=r"onnx-fp32: MAE .* >= tolerance 0"):
        optimize(OptimizeRequest(
            checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
            calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
            out_dir=tmp_path, threads=1, precisions=("fp32",),
            mae_tolerances={"fp32": 0.0}, bench=QUICK_BENCH,
        ))
    steps = json.loads((tmp_path / "steps.json").read_text())
    # the select step failed, and the report was still written after it (issue 15)
    assert [s["step"] for s in steps[-2:]] == ["select", "write_report"]
    assert steps[-2]["status"] == "failed" and steps[-2]["detail"].startswith("SelectionError")
    assert steps[-1]["status"] == "ok"
    assert not (tmp_path / "repository").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["selected"] is None and report["repository"] is None
    assert "onnx-fp32: MAE" in report["selection_error"]
    [fp32] = report["variants"]
    assert fp32["verdict"] == "fail"
    assert fp32["reasons"] == [f"MAE {fp32['mae']:.3g} >= tolerance 0"]
    assert fp32["latency_ms"]["p50"] > 0 and report["baseline"]["latency_ms"]["p50"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "Selected: **none**" in md and "Why variants failed:" in md


def test_output_shape_must_match_the_manifest(tiny_model: Path, tiny_data: Path,
                                              tmp_path: Path) -> None:
    import dataclasses

    from optimizer.contract.errors import ManifestError

    three = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
        TINY_MANIFEST.output, labels=("a", "b", "c"), activation="softmax",
        thresholds=(0.5, 0.5, 0.5)))
    three.save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"outputs \(1,\) per item"):
        optimize(OptimizeRequest(
            checkpoint=tiny_model / "model.pt", manifest=tmp_path / "manifest.json",
            calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
            out_dir=tmp_path / "out", threads=1, bench=QUICK_BENCH))


def test_request_validation() -> None:
    for bad in ({"mae_tolerances": {"int4": 0.1}}, {"threads": 0},
                {"recovery_max_fraction": 0.0}, {"precisions": ("fp16",)}):
        with pytest.raises(ValueError):
            OptimizeRequest(checkpoint=Path("m"), manifest=Path("m"), calibration_dir=Path("c"),
                            validation_dir=Path("v"), out_dir=Path("o"), **bad)  # type: ignore[arg-type]
