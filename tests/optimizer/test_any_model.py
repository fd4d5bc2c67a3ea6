"""Issue 15 (3), (5), (6): models as users have them. Small models built here with random
weights: one returning a tuple, one a dict, a multi-class classifier; a MONAI network needing
an optional package; an INT8 calibration method that fails while the others go on."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from optimizer import checkpoint
from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest
from optimizer.errors import CheckpointError, QuantizationError
from optimizer.outputs import prediction
from optimizer.pipeline import OptimizeRequest, optimize
from tests.conftest import TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH


class TupleNet(torch.nn.Module):
    """Logits and a feature map, as a ViT (logits, hidden states) or deep supervision does."""

    def __init__(self, classes: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.head = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(x))
        return self.head(features.mean(dim=(2, 3))), features


class DictNet(TupleNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits, features = super().forward(x)
        return {"features": features, "logits": logits}


def _scripted(model: torch.nn.Module, folder: Path, manifest: Manifest) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model.eval()), str(folder / "model.pt"))
    manifest.save(folder / "manifest.json")
    return folder


def _request(model: Path, data: Path, out: Path, **kw: object) -> OptimizeRequest:
    return OptimizeRequest(
        checkpoint=model / "model.pt", manifest=model / "manifest.json",
        calibration_dir=data / "calibration", validation_dir=data / "validation",
        out_dir=out, threads=1, bench=QUICK_BENCH, **kw)  # type: ignore[arg-type]


def _with_prediction(key: int | str | None, manifest: Manifest = TINY_MANIFEST) -> Manifest:
    return dataclasses.replace(manifest, output=dataclasses.replace(manifest.output,
                                                                    prediction=key))


def test_a_tuple_output_without_a_prediction_lists_the_outputs(tiny_data: Path,
                                                               tmp_path: Path) -> None:
    model = _scripted(TupleNet(), tmp_path / "m", TINY_MANIFEST)
    with pytest.raises(ManifestError) as err:
        optimize(_request(model, tiny_data, tmp_path / "out"))
    message = str(err.value)
    assert "returns a tuple of 2 outputs" in message
    assert "[0] tensor (2, 1) float32, [1] tensor (2, 4, 16, 16) float32" in message
    assert "manifest.output.prediction" in message


def test_the_prediction_of_a_tuple_is_verified_exported_and_served_alone(
        tiny_data: Path, tmp_path: Path) -> None:
    model = _scripted(TupleNet(), tmp_path / "m", _with_prediction(0))
    result = optimize(_request(model, tiny_data, tmp_path / "out", precisions=("fp32",)))
    [fp32] = result.report["variants"]
    assert fp32["verdict"] == "pass"
    graph = onnx.load(str(tmp_path / "out" / fp32["file"])).graph
    assert [o.name for o in graph.output] == ["logits"]  # only the prediction
    served = json.loads((result.repository / TINY_MANIFEST.name / "manifest.json").read_text())
    assert served["output"]["prediction"] == 0


def test_a_dict_output_is_picked_by_key_and_a_wrong_key_is_named() -> None:
    torch.manual_seed(0)
    net = DictNet().eval()
    picked = prediction(net, _with_prediction("logits"))
    x = torch.zeros((3, 1, 64, 64))
    assert torch.equal(picked(x), net(x)["logits"])
    with pytest.raises(ManifestError, match=r"'scores' is not among the model's outputs: "
                                            r"\{'features': tensor \(2, 4, 16, 16\)"):
        prediction(net, _with_prediction("scores"))
    with pytest.raises(ManifestError, match="returns one tensor"):
        prediction(torch.nn.Conv2d(1, 1, 3), _with_prediction(0))


def test_manifest_prediction_round_trips_and_is_validated() -> None:
    for key in (0, 2, "logits"):
        m = _with_prediction(key)
        assert Manifest.from_dict(m.to_dict()) == m
    assert "prediction" not in TINY_MANIFEST.to_dict()["output"]  # older manifests unchanged
    for bad in (-1, True, "", 1.5, [0]):
        data = TINY_MANIFEST.to_dict()
        data["output"]["prediction"] = bad
        with pytest.raises(ManifestError, match=r"manifest\.output\.prediction"):
            Manifest.from_dict(data)


def test_multi_class_softmax_classifier_with_class_indices(tiny_data: Path,
                                                           tmp_path: Path) -> None:
    """Three classes, labels.csv holding class indices 0..2, softmax scores."""
    data = tmp_path / "data"
    for part in ("calibration", "validation"):
        shutil.copytree(tiny_data / part, data / part)
        lines = (data / part / "labels.csv").read_text().splitlines()
        header, rows = lines[0], lines[1:]
        (data / part / "labels.csv").write_text("\n".join(
            [header] + [f"{row.split(',')[0]},{i % 3}" for i, row in enumerate(rows)]) + "\n")
    three = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
        TINY_MANIFEST.output, labels=("normal", "nodule", "mass"), activation="softmax",
        thresholds=(0.5, 0.5, 0.5), prediction=0))
    model = _scripted(TupleNet(classes=3), tmp_path / "m", three)
    result = optimize(_request(model, data, tmp_path / "out", precisions=("fp32",)))
    assert result.report["validation"]["metric"] == "auc"
    [fp32] = result.report["variants"]
    assert fp32["verdict"] == "pass" and fp32["metric_delta"] == pytest.approx(0.0, abs=1e-6)


VIT = {"in_channels": 1, "img_size": [64, 64], "patch_size": [16, 16], "spatial_dims": 2,
       "classification": True, "num_classes": 1, "hidden_size": 48, "mlp_dim": 96,
       "num_layers": 1, "num_heads": 4}


def test_a_monai_network_missing_its_package_names_it(tiny_data: Path, tmp_path: Path) -> None:
    """MONAI's ViT imports einops; where it is not installed the error names the package and
    how to install it. Where it is, the ViT builds."""
    try:
        import einops  # noqa: F401
    except ImportError:
        has_einops = False
    else:
        has_einops = True
    if has_einops:
        assert isinstance(checkpoint.build("ViT", VIT), torch.nn.Module)
        return
    model = tmp_path / "m"
    model.mkdir()
    torch.save({"format": checkpoint.FORMAT, "architecture": "ViT", "kwargs": VIT,
                "state_dict": {}}, model / "model.pt")
    TINY_MANIFEST.save(model / "manifest.json")
    with pytest.raises(CheckpointError) as err:
        optimize(_request(model, tiny_data, tmp_path / "out"))
    assert str(err.value) == (
        "monai.networks.nets.ViT needs the Python package 'einops', which is not installed "
        "here: pip install einops (for MONAI's networks: pip install 'bedside[monai-nets]')")


def test_missing_module_in_model_code_is_named_faked_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import monai.networks.nets as nets

    class NeedsTimm(torch.nn.Module):
        def __init__(self) -> None:
            raise ModuleNotFoundError("No module named 'timm.layers'", name="timm.layers")

    monkeypatch.setattr(nets, "NeedsTimm", NeedsTimm, raising=False)
    with pytest.raises(CheckpointError, match=r"needs the Python package 'timm'.*pip install "
                                              r"timm"):
        checkpoint.build("NeedsTimm", {})


def test_a_failing_calibration_method_is_recorded_and_the_others_go_on(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Percentile calibration fails as it did on EfficientNet (faked: the message it gave);
    minmax still yields the INT8 variant."""
    from optimizer.quantize import Int8Quantizer

    real = Int8Quantizer.quantize

    def quantize(self: Int8Quantizer, out_path: Path, method: str = "minmax",
                 *args: object, **kwargs: object) -> Path:
        if method == "percentile":
            raise QuantizationError("INT8 quantization (percentile) failed: Too many bins for "
                                    "data range")
        return real(self, out_path, method, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Int8Quantizer, "quantize", quantize)
    model = _scripted(TupleNet(), tmp_path / "m", _with_prediction(0))
    result = optimize(_request(model, tiny_data, tmp_path / "out", precisions=("fp32", "int8"),
                               calibration_methods=("percentile", "minmax"),
                               mae_tolerances={"int8": 10.0}))
    [int8] = [v for v in result.report["variants"] if v["precision"] == "int8"]
    assert int8["name"] == "onnx-int8-minmax"
    trials = {t["calibration_method"]: t for t in int8["details"]["calibration_trials"]}
    assert trials["minmax"]["passed"] and not trials["percentile"]["passed"]
    assert "Too many bins for data range" in trials["percentile"]["error"]
    assert "INT8 calibration methods that failed for onnx-int8-minmax" in \
        result.report_md.read_text()


def test_every_calibration_method_failing_leaves_int8_out_with_the_reasons(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.quantize import Int8Quantizer

    def broken(self: Int8Quantizer, out_path: Path, method: str = "minmax",
               *args: object, **kwargs: object) -> Path:
        raise QuantizationError(f"INT8 quantization ({method}) failed: simulated")

    monkeypatch.setattr(Int8Quantizer, "quantize", broken)
    model = _scripted(TupleNet(), tmp_path / "m", _with_prediction(0))
    result = optimize(_request(model, tiny_data, tmp_path / "out", precisions=("fp32", "int8"),
                               calibration_methods=("percentile", "minmax")))
    assert [v["name"] for v in result.report["variants"]] == ["onnx-fp32"]
    [int8] = [s for s in result.report["not_built"] if s["name"] == "int8"]
    assert "every INT8 calibration method failed" in int8["reason"]
    assert "percentile" in int8["reason"] and "minmax" in int8["reason"]


BUILDER = '''
import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def build():
    return Net()
'''


def _state_dict_and_builder(folder: Path) -> tuple[torch.nn.Module, Path, str]:
    """A research checkpoint: the weights of a trained (here: seeded) network, and the file
    with the code that builds it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nets.py").write_text(BUILDER)
    torch.manual_seed(7)
    trained = checkpoint.builder_function(f"{folder / 'nets.py'}:build")()  # type: ignore[operator]
    assert isinstance(trained, torch.nn.Module)
    # DataParallel's prefix, under "state_dict", as many training scripts save it
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                          for k, v in trained.state_dict().items()}},
               folder / "weights.pt")
    TINY_MANIFEST.save(folder / "manifest.json")
    return trained.eval(), folder / "weights.pt", f"{folder / 'nets.py'}:build"


def test_a_state_dict_with_its_builder_loads_the_trained_weights(tmp_path: Path) -> None:
    trained, weights, builder = _state_dict_and_builder(tmp_path)
    loaded = checkpoint.load(weights, builder)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), trained(x))
    assert checkpoint.format_of(weights, builder) == "state-dict"


def test_a_state_dict_without_a_builder_says_to_give_one(tmp_path: Path) -> None:
    _, weights, _ = _state_dict_and_builder(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a state dict .* --builder"):
        checkpoint.load(weights)


def test_builder_errors_name_the_problem(tmp_path: Path) -> None:
    _, weights, _ = _state_dict_and_builder(tmp_path)
    cases = {
        f"{tmp_path / 'nets.py'}:missing": "has no function 'missing'",
        f"{tmp_path / 'none.py'}:build": "builder file not found",
        "no_such_package_here.nets:build": "builder module 'no_such_package_here.nets' not found",
    }
    for spec, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(weights, spec)
    (tmp_path / "wrong.py").write_text("import torch\ndef build():\n"
                                       "    return torch.nn.Linear(3, 3)\n")
    with pytest.raises(CheckpointError, match="do not fit the network"):
        checkpoint.load(weights, f"{tmp_path / 'wrong.py'}:build")
    (tmp_path / "needs.py").write_text("import einops_not_installed_here\ndef build(): pass\n")
    with pytest.raises(CheckpointError, match=r"needs the Python package "
                                              r"'einops_not_installed_here'"):
        checkpoint.load(weights, f"{tmp_path / 'needs.py'}:build")


def test_optimize_takes_a_state_dict_and_a_builder(tiny_data: Path, tmp_path: Path) -> None:
    _, weights, builder = _state_dict_and_builder(tmp_path / "m")
    result = optimize(OptimizeRequest(
        checkpoint=weights, manifest=tmp_path / "m" / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path / "out", threads=1, bench=QUICK_BENCH, precisions=("fp32",),
        builder=builder))
    assert result.report["variants"][0]["verdict"] == "pass"
    assert result.report["baseline"]["name"] == "pytorch-eager"
    assert f"--builder {builder}" in (tmp_path / "out" / "reproduce.sh").read_text()


def test_a_npy_patch_with_a_batch_axis_is_refused_with_the_fix(tmp_path: Path) -> None:
    import numpy as np

    from optimizer.dataset import load_inputs
    from optimizer.errors import DatasetError

    patch3d = dataclasses.replace(TINY_MANIFEST, input=dataclasses.replace(
        TINY_MANIFEST.input, height=16, width=16, depth=16))
    np.save(tmp_path / "p.npy", np.zeros((1, 1, 16, 16, 16), np.float32))
    with pytest.raises(DatasetError, match=r"drop the batch axis.*used as they are"):
        load_inputs(tmp_path, patch3d)
    np.save(tmp_path / "p.npy", np.zeros((1, 16, 16, 16), np.float32))
    assert load_inputs(tmp_path, patch3d).shape == (1, 1, 16, 16, 16)
