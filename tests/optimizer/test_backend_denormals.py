"""The served CPU backends flush subnormal floats as the optimizer benchmarked them.

These unit tests load the Triton python-backend models with a fake
``triton_python_backend_utils`` (the real one exists only inside Triton's stub) and record
the options each runtime is given."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from optimizer.repository import ServingOptions, model_config
from tests.conftest import TINY_MANIFEST

BACKENDS = Path(__file__).resolve().parents[2] / "optimizer" / "triton_backend"


def _load_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location(f"served_{name}", BACKENDS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path: Path, parameters: dict[str, str]) -> dict[str, str]:
    (tmp_path / "1").mkdir(exist_ok=True)
    config = {"input": [{"name": "input"}], "output": [{"name": "output"}],
              "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {"model_config": json.dumps(config), "model_repository": str(tmp_path),
            "model_version": "1"}


def test_cpu_repository_config_asks_for_flushed_denormals() -> None:
    cfg = model_config(TINY_MANIFEST, ServingOptions(), "fp32", "cpu")
    assert cfg.parameters["denormals_as_zero"].string_value == "1"


@pytest.mark.parametrize("flag", ["1", None])
def test_onnx_runtime_backend_flushes_when_configured_fake_stub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None) -> None:
    backend = _load_backend("model", monkeypatch)
    seen: list[Any] = []
    monkeypatch.setattr(backend.ort, "InferenceSession",
                        lambda path, opts, providers: seen.append(opts))
    params = {"onnx_file": "model.onnx"} | ({"denormals_as_zero": flag} if flag else {})
    backend.TritonPythonModel().initialize(_args(tmp_path, params))
    entry = seen[0].get_session_config_entry("session.set_denormal_as_zero") if flag else None
    assert entry == flag


@pytest.mark.parametrize("flag", ["1", None])
def test_openvino_backend_flushes_when_configured_fake_stub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None) -> None:
    pytest.importorskip("openvino")
    backend = _load_backend("openvino_model", monkeypatch)
    seen: dict[str, Any] = {}

    class RecordingCore:
        def read_model(self, path: str) -> str:
            return path

        def compile_model(self, model: str, device: str, properties: dict[str, Any]) -> Any:
            seen.update(properties)
            return types.SimpleNamespace(create_infer_request=lambda: None)

    monkeypatch.setattr(backend.ov, "Core", RecordingCore)
    params = {"openvino_file": "model.xml"} | ({"denormals_as_zero": flag} if flag else {})
    backend.TritonPythonModel().initialize(_args(tmp_path, params))
    assert seen.get("CPU_DENORMALS_OPTIMIZATION") is (True if flag else None)
