"""The ``gpu-torch`` target: refusal without a GPU, the repository it writes, the runner on the
CPU, and (marked ``gpu``, skipped without CUDA) the whole optimization on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from optimizer import checkpoint
from optimizer.errors import ExportError
from optimizer.gpu_torch import TargetUnavailable, trace, variants
from optimizer.pipeline import OptimizeRequest, optimize
from optimizer.repository import ServingOptions, write_repository
from optimizer.triton_backend.torch_runner import TorchRunner, buckets, load_torchscript
from services.cli import main
from tests.conftest import TINY_MANIFEST
from tests.optimizer.quick_bench import QUICK_BENCH

HAS_CUDA = torch.cuda.is_available()


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class _DataDependent(nn.Module):
    """Takes a branch by the input's values: tracing freezes one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return -x.mean(dim=(1, 2, 3)).unsqueeze(1) * 3


def _request(tiny_model: Path, tiny_data: Path, out: Path, **kw: object) -> OptimizeRequest:
    return OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=out, bench=QUICK_BENCH, **kw)  # type: ignore[arg-type]


def test_variants_put_fp32_eager_first_and_pair_each_precision_with_graphs() -> None:
    names = [v.name for v in variants(("fp32", "fp16", "bf16"))]
    assert names[0] == "torch-cuda-fp32"
    assert names == ["torch-cuda-fp32", "torch-cuda-fp32-graphs", "torch-cuda-fp16",
                     "torch-cuda-fp16-graphs", "torch-cuda-bf16", "torch-cuda-bf16-graphs"]
    assert [v.name for v in variants(("fp32",))] == ["torch-cuda-fp32", "torch-cuda-fp32-graphs"]


def test_graph_buckets_cover_every_batch_up_to_the_maximum() -> None:
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    for m in (1, 3, 8, 32):
        assert all(any(b >= n for b in buckets(m)) for n in range(1, m + 1))


def test_gpu_torch_refuses_int8() -> None:
    with pytest.raises(ValueError, match="INT8 on a GPU needs TensorRT"):
        OptimizeRequest(checkpoint=Path("m.pt"), manifest=Path("m.json"),
                        calibration_dir=Path("c"), validation_dir=Path("v"), out_dir=Path("o"),
                        target="gpu-torch", precisions=("fp32", "int8"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_gpu_torch_is_refused_up_front_without_a_gpu(tiny_model: Path, tiny_data: Path,
                                                     tmp_path: Path) -> None:
    req = _request(tiny_model, tiny_data, tmp_path / "out", target="gpu-torch",
                   precisions=("fp32", "fp16", "bf16"))
    with pytest.raises(TargetUnavailable, match="needs a CUDA GPU"):
        optimize(req)
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["require_cuda"]  # nothing loaded before refusing
    assert steps[0]["status"] == "failed"


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_cli_gpu_torch_without_gpu_says_why(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", "--checkpoint", str(tiny_model / "model.pt"),
                 "--manifest", str(tiny_model / "manifest.json"),
                 "--calibration", str(tiny_data / "calibration"),
                 "--validation", str(tiny_data / "validation"),
                 "--out", str(tmp_path / "out"), "--target", "gpu-torch"])
    assert code != 0
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--target cpu" in err


def test_trace_keeps_the_batch_axis_free(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Small().eval()
    path = trace(model, TINY_MANIFEST, tmp_path / "model.pt")
    loaded = load_torchscript(str(path), "cpu")
    x = torch.randn(5, *TINY_MANIFEST.input.shape)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_trace_refuses_a_model_whose_trace_disagrees(tmp_path: Path) -> None:
    torch.manual_seed(3)
    with pytest.raises(ExportError, match="disagrees"):
        # inputs of both signs: one of the two checks takes the branch the trace did not
        for _ in range(8):
            trace(_DataDependent(), TINY_MANIFEST, tmp_path / "model.pt")


def test_runner_on_cpu_matches_the_module_and_keeps_io_fp32() -> None:
    torch.manual_seed(1)
    model = _Small().eval()
    x = torch.randn(3, *TINY_MANIFEST.input.shape)
    with torch.inference_mode():
        ref = model(x)
    fp32 = TorchRunner(model, TINY_MANIFEST.input.shape, "fp32", device="cpu")
    out = fp32(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    bf16 = TorchRunner(_Small().eval().requires_grad_(False), TINY_MANIFEST.input.shape, "bf16",
                       device="cpu")
    assert bf16(x).dtype == torch.float32
    with pytest.raises(ValueError, match="expected input"):
        fp32(torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchRunner(model, TINY_MANIFEST.input.shape, "fp16", device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="precision"):
        TorchRunner(model, TINY_MANIFEST.input.shape, "int8", device="cpu")


def test_repository_for_gpu_torch_runs_the_verified_variant(tmp_path: Path) -> None:
    torchscript = trace(_Small().eval(), TINY_MANIFEST, tmp_path / "model.pt")
    opts = ServingOptions(max_batch_size=32, preferred_batch_sizes=(8, 16, 32))
    model_dir, version = write_repository(tmp_path / "repo", TINY_MANIFEST, torchscript, "fp16",
                                          opts, target="gpu-torch", cuda_graphs=True)
    vdir = model_dir / str(version)
    assert sorted(p.name for p in vdir.iterdir()) == ["model.pt", "model.py", "torch_runner.py"]
    assert "from_dlpack" in (vdir / "model.py").read_text()  # the torch backend, not ORT's
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.backend == "python" and cfg.max_batch_size == 32
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg.parameters["bedside_precision"].string_value == "fp16"
    assert cfg.parameters["cuda_graphs"].string_value == "true"
    assert cfg.parameters["torch_file"].string_value == "model.pt"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    _, v2 = write_repository(tmp_path / "repo", TINY_MANIFEST, torchscript, "bf16", opts,
                             target="gpu-torch", cuda_graphs=False)
    assert v2 == version + 1
    cfg2 = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg2.parameters["cuda_graphs"].string_value == "false"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_runner_graphs_match_eager_on_gpu() -> None:
    torch.manual_seed(2)
    model = checkpoint.build("DenseNet121", {"spatial_dims": 2, "in_channels": 1,
                                             "out_channels": 1}).eval()
    shape = (1, 64, 64)
    eager = TorchRunner(model, shape, "fp32", device="cuda", max_batch=8)
    graphs = TorchRunner(model, shape, "fp32", device="cuda", cuda_graphs=True, max_batch=8)
    for n in (1, 3, 8, 11):  # inside a bucket, padded, exact, and over the largest graph
        x = torch.randn(n, *shape)
        a, b = eager(x), graphs(x)
        assert b.shape == (n, 1) and b.device.type == "cpu"
        assert torch.allclose(a, b, atol=1e-5), (n, float((a - b).abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_optimize_gpu_torch_end_to_end(tiny_model: Path, tiny_data: Path,
                                       tmp_path: Path) -> None:
    result = optimize(_request(tiny_model, tiny_data, tmp_path / "out", target="gpu-torch",
                               precisions=("fp32", "fp16", "bf16")))
    report = result.report
    assert report["baseline"]["runtime"] == "torch-cuda"
    assert report["machine"]["device"]["gpu"]
    names = [v["name"] for v in report["variants"]]
    assert names[0] == "torch-cuda-fp32"
    fp32 = report["variants"][0]
    assert fp32["verdict"] == "pass" and fp32["mae"] < 1e-5
    assert report["selected"] in names
    cfg = (result.repository / TINY_MANIFEST.name / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "KIND_GPU" in cfg
    assert np.isfinite([v["latency_ms"]["p50"] for v in report["variants"]]).all()
