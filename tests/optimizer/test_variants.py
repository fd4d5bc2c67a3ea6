"""FP16, INT8 calibration choice and accuracy recovery, selection, repository targets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer import checkpoint
from optimizer.benchmark import BatchPoint, Latency, Profile, onnx_session, run_onnx, run_torch
from optimizer.errors import SelectionError
from optimizer.export import export_onnx
from optimizer.fp16 import convert_fp16
from optimizer.pipeline import OptimizeRequest, optimize, select
from optimizer.quantize import Int8Quantizer
from optimizer.report import VariantResult
from optimizer.repository import ServingOptions, model_config, write_repository
from optimizer.verify import Verification
from tests.conftest import TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH


@pytest.fixture(scope="module")
def fp32(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = checkpoint.load(tiny_model / "model.pt")
    return export_onnx(model, TINY_MANIFEST, tmp_path_factory.mktemp("v") / "m.onnx")


def test_fp16_keeps_fp32_io_and_stays_close(fp32: Path, tmp_path: Path) -> None:
    half = convert_fp16(fp32, tmp_path / "m.fp16.onnx")
    model = onnx.load(str(half))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    a, b = run_onnx(onnx_session(fp32, 1), x), run_onnx(onnx_session(half, 1), x)
    assert not np.array_equal(a, b)
    assert float(np.abs(a - b).mean()) < 1e-2


def test_rank_groups_bound_the_number_of_probes(fp32: Path, tmp_path: Path) -> None:
    calib = np.random.default_rng(2).normal(size=(2, 1, 64, 64)).astype(np.float32)
    q = Int8Quantizer(fp32, tmp_path, "image", calib)
    calls: list[Path] = []

    def run(p: Path, x: np.ndarray) -> np.ndarray:
        calls.append(p)
        return run_onnx(onnx_session(p, 1), x)

    ranked = q.rank_nodes("minmax", calib, np.zeros((2, 1), np.float32), run, max_probes=8)
    assert len(calls) <= 8 and len(ranked) <= 8
    assert max(len(r.nodes) for r in ranked) == -(-len(q.nodes) // 8)


def test_rank_nodes_orders_by_error(fp32: Path, tiny_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(6, 1, 64, 64)).astype(np.float32)
    q = Int8Quantizer(fp32, tmp_path, "image", calib)
    golden = run_torch(checkpoint.load(tiny_model / "model.pt"), calib[:4])
    ranked = q.rank_nodes("minmax", calib[:4], golden,
                          lambda p, x: run_onnx(onnx_session(p, 1), x))
    assert ranked and all(a.mae >= b.mae for a, b in itertools.pairwise(ranked))
    assert {n for r in ranked for n in r.nodes} <= {name for name, _ in q.nodes}
    assert ranked[0].mae > ranked[-1].mae
    # the recorded figure is what quantizing that group alone does to the output
    alone = q.quantize(tmp_path / "alone.onnx", "minmax", only=list(ranked[0].nodes))
    err = float(np.abs(run_onnx(onnx_session(alone, 1), calib[:4]) - golden).mean())
    assert err == pytest.approx(ranked[0].mae, rel=1e-5)


def _int8_mae(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> float:
    out = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path, threads=1, precisions=("fp32", "int8"),
        calibration_methods=("minmax",), recovery=False, bench=QUICK_BENCH))
    return float(out.report["variants"][1]["mae"])


def test_int8_recovery_turns_a_failing_variant_into_a_passing_one(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    plain_mae = _int8_mae(tiny_model, tiny_data, tmp_path / "plain")
    result = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path / "rec", threads=1, precisions=("fp32", "int8"),
        calibration_methods=("minmax",), mae_tolerances={"int8": plain_mae * 0.7},
        bench=QUICK_BENCH))
    int8 = result.report["variants"][1]
    assert int8["name"] == "onnx-int8-minmax-recovered"
    assert int8["verdict"] == "pass" and int8["mae"] < plain_mae * 0.7
    kept = int8["details"]["fp32_nodes"]
    assert len(kept) >= 1 and int8["details"]["recovery"][-1]["passed"]
    assert any("MAE" in r for r in int8["details"]["plain_int8_reasons"])
    assert "nodes kept in FP32" in result.report_md.read_text()


def test_int8_recovery_bound_is_respected(tiny_model: Path, tiny_data: Path,
                                          tmp_path: Path) -> None:
    result = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path, threads=1, precisions=("fp32", "int8"),
        calibration_methods=("minmax",), mae_tolerances={"int8": 1e-12},
        recovery_max_fraction=0.02, bench=QUICK_BENCH))
    int8 = result.report["variants"][1]
    assert int8["verdict"] == "fail"
    # bound: 2% of ~70 nodes is one node
    assert all(a["fp32_nodes"] <= 1 for a in int8["details"]["recovery"])
    assert len(int8["details"]["recovery"]) <= 1 and len(int8["details"]["fp32_nodes"]) <= 1
    assert "MAE" in int8["reasons"][0]
    assert result.report["selected"] == "onnx-fp32"


def _variant(name: str, passed: bool, lat_ms: list[float]) -> VariantResult:
    points = tuple(
        BatchPoint(batch=2**i, latency=Latency(ms, ms * 1.1, ms * 1.2, ms, 10),
                   throughput=2**i * 1000.0 / ms) for i, ms in enumerate(lat_ms))
    check = Verification("fp32", 0.0, 0.0, 1e-5, "auc", 0.9, 0.9, 0.0, 1.0, passed,
                         () if passed else ("x",))
    return VariantResult(name, "fp32", "ort", "f", 1, check, Profile(points, None), 1.0)


def test_selection_objectives() -> None:
    fast = _variant("fast-b1", True, [1.0, 1.9, 3.8])  # best latency, poor scaling
    wide = _variant("wide", True, [2.0, 2.2, 2.4])  # best throughput, batch 4 at 2.4 ms
    broken = _variant("broken", False, [0.1, 0.1, 0.1])
    assert select([fast, wide, broken], "latency", 100).name == "fast-b1"
    assert select([fast, wide, broken], "throughput", 100).name == "wide"
    # p95 budget 3 ms: wide reaches batch 4 (1667/s), fast-b1 only batch 2 (1053/s)
    assert select([fast, wide], "throughput-within-slo", 3.0).name == "wide"
    # p95 budget 2.5 ms: wide stops at batch 2 (909/s), fast-b1 still does 1053/s
    assert select([fast, wide], "throughput-within-slo", 2.5).name == "fast-b1"
    with pytest.raises(SelectionError, match="p95"):
        select([fast, wide], "throughput-within-slo", 0.5)
    with pytest.raises(SelectionError, match="broken: x"):
        select([broken], "latency", 100)


def test_gpu_target_config_and_new_versions(fp32: Path, tmp_path: Path) -> None:
    cfg = model_config(TINY_MANIFEST, ServingOptions(), "int8", target="gpu")
    parsed = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert parsed.backend == "onnxruntime"
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    trt = parsed.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "INT8"
    for precision in ("fp32", "fp16"):  # run in the precision that was verified
        cfg = model_config(TINY_MANIFEST, ServingOptions(), precision, target="gpu")
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accel.parameters["precision_mode"] == precision.upper()
    _, v1 = write_repository(tmp_path, TINY_MANIFEST, fp32, "fp32", ServingOptions())
    _, v2 = write_repository(tmp_path, TINY_MANIFEST, fp32, "fp32", ServingOptions(), "gpu")
    model_dir = tmp_path / TINY_MANIFEST.name
    assert (v1, v2) == (1, 2) and (model_dir / "1" / "model.py").exists()
    assert not (model_dir / "2" / "model.py").exists()  # gpu: onnxruntime backend, no python
    assert json.loads((model_dir / "manifest.json").read_text())["version"] == 2
    script = (model_dir / "build_tensorrt_engines.sh").read_text()
    assert "trtexec" in script and "--maxShapes=image:8x1x64x64" in script
    assert "--int8" not in script  # an fp32 selection builds an FP16 plan, not INT8
    plan = text_format.Parse((model_dir / "config.tensorrt_plan.pbtxt").read_text(),
                             mc.ModelConfig())
    assert plan.platform == "tensorrt_plan" and plan.default_model_filename == "model.plan"
    write_repository(tmp_path, TINY_MANIFEST, fp32, "int8", ServingOptions(), "gpu")
    assert "--int8" in (model_dir / "build_tensorrt_engines.sh").read_text()


def test_calibration_cache_is_never_reused(fp32: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    small = rng.normal(0, 1, (4, 1, 64, 64)).astype(np.float32)
    first = Int8Quantizer(fp32, tmp_path / "w", "image", small).quantize(tmp_path / "a.onnx")
    second = Int8Quantizer(fp32, tmp_path / "w", "image", small * 50).quantize(
        tmp_path / "b.onnx")
    assert first.read_bytes() != second.read_bytes()


def test_recovery_schedule_doubles_then_tries_the_bound() -> None:
    from optimizer.pipeline import _schedule
    from optimizer.quantize import NodeSensitivity

    groups = [NodeSensitivity(nodes=("a", "b"), op_types=("Conv", "Relu"), mae=1.0)] * 20
    assert _schedule(groups, limit=21) == [1, 2, 4, 8, 10]  # 10 groups of 2 fit 21 nodes
    assert _schedule(groups, limit=1) == []  # not even one group fits
    assert _schedule(groups, limit=100) == [1, 2, 4, 8, 16, 20]


def test_a_variant_that_cannot_be_built_is_left_out(tiny_model: Path, tiny_data: Path,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer import pipeline
    from optimizer.errors import QuantizationError

    def broken(*args: object, **kwargs: object) -> Path:
        raise QuantizationError("simulated converter failure")

    monkeypatch.setattr(pipeline, "convert_fp16", broken)
    result = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path, threads=1, precisions=("fp32", "fp16"), bench=QUICK_BENCH))
    assert [v["name"] for v in result.report["variants"]] == ["onnx-fp32"]
    [fp16] = [s for s in result.report["not_built"] if s["name"] == "fp16"]
    assert fp16["status"] == "failed" and "simulated converter failure" in fp16["reason"]
    assert "Not built: " in result.report_md.read_text()
