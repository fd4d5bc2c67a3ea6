"""The chart's engines.sh (TensorRT engine build and staging), run with bash against fake
trtexec and nvidia-smi executables (no TensorRT or GPU here): cache keys, skip when cached,
staging swaps in the plan config only where a plan matches the node."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "bedside" / "files" / "engines.sh"


def _fake_tools(bin_dir: Path, gpu: str, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{gpu}'\n")
    # trtexec: record the call; write the plan named by --saveEngine=
    (bin_dir / "trtexec").write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" >> {log}\n"
        "for a in \"$@\"; do case $a in --saveEngine=*) echo plan > \"${a#--saveEngine=}\";; "
        "esac; done\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def _repository(root: Path) -> Path:
    """A repository as `bedside optimize --target gpu` writes it (two versions)."""
    model = root / "models" / "cxr"
    for version in ("1", "2"):
        (model / version).mkdir(parents=True)
        (model / version / "model.onnx").write_text(f"onnx v{version}")
    (model / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    (model / "config.tensorrt_plan.pbtxt").write_text('platform: "tensorrt_plan"\n')
    (model / "build_tensorrt_engines.sh").write_text(
        '#!/bin/sh\nset -e\nV=$1\ntrtexec --onnx="$V/model.onnx" --fp16 '
        '--saveEngine="$V/model.plan"\n')
    other = root / "models" / "no-trt"  # a model without an engine script is left alone
    (other / "1").mkdir(parents=True)
    (other / "config.pbtxt").write_text('backend: "python"\n')
    return root / "models"


def _run(mode: str, root: Path, gpu: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{root / ('bin-' + gpu.split()[-1])}:{os.environ['PATH']}",
           "TRT_VERSION": "10.5.0"}
    script = SCRIPT.read_text(encoding="utf-8")
    for mount in ("/models", "/engine-cache", "/served"):  # the pod's mounts, here
        script = script.replace(mount, str(root / mount.strip("/")))
    return subprocess.run(["bash", "-c", script, "engines.sh", mode], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    _repository(tmp_path)
    (tmp_path / "engine-cache").mkdir()
    for gpu in ("NVIDIA H100", "NVIDIA L4"):
        _fake_tools(tmp_path / f"bin-{gpu.split()[-1]}", gpu, tmp_path / "trtexec.log")
    return tmp_path


def test_build_then_cached_with_fake_trtexec(root: Path) -> None:
    first = _run("build", root, "NVIDIA H100")
    assert first.returncode == 0, first.stderr
    plan = root / "engine-cache" / "trt-10.5.0" / "NVIDIA_H100" / "cxr" / "2" / "model.plan"
    assert plan.read_text() == "plan\n"
    assert not (plan.parent / "model.onnx").exists()  # the link to the ONNX is not kept
    assert "cxr v2: built" in first.stdout
    second = _run("build", root, "NVIDIA H100")
    assert "cxr v2: cached" in second.stdout
    assert (root / "trtexec.log").read_text().count("--saveEngine") == 1
    # another GPU model is another cache key: built again
    _run("build", root, "NVIDIA L4")
    assert (root / "engine-cache" / "trt-10.5.0" / "NVIDIA_L4" / "cxr" / "2" /
            "model.plan").is_file()


def test_stage_uses_a_plan_only_for_a_matching_node_with_fake_tools(root: Path) -> None:
    assert _run("build", root, "NVIDIA H100").returncode == 0
    (root / "served").mkdir()
    staged = _run("stage", root, "NVIDIA H100")
    assert staged.returncode == 0, staged.stderr
    served = root / "served" / "cxr"
    assert (served / "2" / "model.plan").read_text() == "plan\n"
    assert (served / "config.pbtxt").read_text() == 'platform: "tensorrt_plan"\n'
    assert (root / "served" / "no-trt" / "config.pbtxt").read_text() == 'backend: "python"\n'
    # an L4 node has no plan yet: it serves the ONNX config
    shutil.rmtree(root / "served")
    (root / "served").mkdir()
    other = _run("stage", root, "NVIDIA L4")
    assert "no plan for trt-10.5.0/NVIDIA_L4" in other.stdout
    assert (served / "config.pbtxt").read_text() == 'backend: "onnxruntime"\n'
    assert not (served / "2" / "model.plan").exists()


def test_bad_mode_is_refused(root: Path) -> None:
    out = _run("explode", root, "NVIDIA H100")
    assert out.returncode == 2
    assert "usage" in out.stderr
