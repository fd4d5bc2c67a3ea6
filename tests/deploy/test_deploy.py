"""`bedside deploy`: the model read from the optimizer's repository, values assembly, the
offline dry run, the Kubernetes waits against a fake API server, and rollback decisions."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from services.cli import main
from services.deploy.cluster import KubeCluster, Targets, rollout_complete
from services.deploy.deployer import deploy
from services.deploy.errors import DeployError, RepositoryError, RolloutTimeout
from services.deploy.release import ModelRelease, release_values
from tests.deploy.fake_apiserver import ApiState, fake_apiserver, workload

TARGETS = Targets(workloads=(("Deployment", "demo-bedside-triton"),
                             ("StatefulSet", "demo-bedside-gateway")),
                  triton_service=("demo-bedside-triton", 8000), inference_service=None)
MODEL = ModelRelease(name="cxr", version=3, manifest={"name": "cxr"}, target="gpu")


def test_model_release_from_the_optimizers_output(optimized: Path) -> None:
    model = ModelRelease.from_repository(optimized)  # the --out folder works
    manifest = json.loads((optimized / "repository" / model.name / "manifest.json").read_text())
    assert (model.name, model.version) == (manifest["name"], manifest["version"])
    assert model.manifest == manifest
    assert model.target == "cpu"
    assert ModelRelease.from_repository(optimized / "repository", model.name) == model


def test_model_release_errors(tmp_path: Path, optimized: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        ModelRelease.from_repository(tmp_path / "nope")
    with pytest.raises(RepositoryError, match="holds 0 models"):
        ModelRelease.from_repository(tmp_path)
    repo = tmp_path / "repo"
    shutil.copytree(optimized / "repository", repo)
    name = next(p.name for p in repo.iterdir())
    shutil.copytree(repo / name, repo / "second")
    with pytest.raises(RepositoryError, match="holds 2 models"):
        ModelRelease.from_repository(repo)
    with pytest.raises(RepositoryError, match="no model 'third'"):
        ModelRelease.from_repository(repo, "third")
    version = json.loads((repo / name / "manifest.json").read_text())["version"]
    (repo / name / str(version) / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"has no model\.onnx"):
        ModelRelease.from_repository(repo, name)


def test_release_values_put_the_model_on_top_of_user_values() -> None:
    user: dict[str, Any] = {"model": {"name": "stale", "repository": {"source": "oci"}},
            "gateway": {"aeTitle": "X"}}
    values = release_values(MODEL, user)
    assert values["model"] == {"name": "cxr", "version": 3, "manifest": {"name": "cxr"},
                               "repository": {"source": "oci"}}
    assert values["gateway"] == {"aeTitle": "X"}
    assert "triton" not in values  # a GPU model keeps the chart's GPU default
    cpu = release_values(ModelRelease("cxr", 3, {}, "cpu"), {})
    assert cpu["triton"]["gpu"]["enabled"] is False
    assert user["model"]["name"] == "stale"  # inputs are not modified


@pytest.fixture(scope="module")
def openvino_repository(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The optimizer's repository with a newer version written by the OpenVINO writer (the IR
    read from the served ONNX), as `bedside optimize` leaves it when OpenVINO is selected."""
    from optimizer import ov_runtime
    from optimizer.contract.manifest import Manifest
    from optimizer.ov_options import OvOptions
    from optimizer.ov_repository import write_openvino_repository
    from optimizer.repository import ServingOptions

    repo = tmp_path_factory.mktemp("ov-deploy") / "repository"
    shutil.copytree(optimized / "repository", repo)
    (model_dir,) = [p for p in repo.iterdir() if (p / "manifest.json").is_file()]
    manifest = Manifest.load(model_dir / "manifest.json")
    xml = ov_runtime.save(ov_runtime.read(model_dir / str(manifest.version) / "model.onnx"),
                          repo.parent / "ir")
    params = {k: str(v) for k, v in OvOptions(threads=2).properties("fp32").items()}
    write_openvino_repository(repo, manifest, xml, "fp32", ServingOptions(), params)
    return repo


def test_model_release_of_an_openvino_repository(openvino_repository: Path,
                                                 tmp_path: Path) -> None:
    from optimizer.ov_repository import CLUSTER_CONFIG_NAME

    model = ModelRelease.from_repository(openvino_repository)
    assert (model.runtime, model.target) == ("openvino", "cpu")
    version_dir = openvino_repository / model.name / str(model.version)
    assert (version_dir / "model.xml").is_file() and not (version_dir / "model.onnx").exists()
    # the name deploy passes is the file the optimizer wrote
    assert model.model_config_name == CLUSTER_CONFIG_NAME
    assert (openvino_repository / model.name / "configs" /
            f"{model.model_config_name}.pbtxt").is_file()
    assert ModelRelease.from_repository(openvino_repository.parent).runtime == "openvino"
    broken = tmp_path / "repository"
    shutil.copytree(openvino_repository, broken)
    (broken / model.name / "configs" / "openvino.pbtxt").unlink()
    with pytest.raises(RepositoryError, match=r"configs/openvino\.pbtxt.*missing"):
        ModelRelease.from_repository(broken)


def test_release_values_select_the_openvino_config_for_an_openvino_release() -> None:
    ov = ModelRelease("cxr", 4, {}, "cpu", runtime="openvino")
    user: dict[str, Any] = {"triton": {"modelConfigName": "other", "replicas": 2}}
    values = release_values(ov, user)
    assert values["triton"] == {"modelConfigName": "openvino", "replicas": 2,
                                "gpu": {"enabled": False}}
    assert user["triton"]["modelConfigName"] == "other"  # inputs are not modified
    onnx = release_values(ModelRelease("cxr", 3, {}, "cpu"), {})
    assert "modelConfigName" not in onnx["triton"]  # the chart's default: config.pbtxt


def test_dry_run_of_an_openvino_repository_serves_it_on_the_stock_image(
        openvino_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    assert main(["deploy", "--repository", str(openvino_repository), "--dry-run",
                 "--out", str(out)]) == 0
    triton = (out / "bedside" / "templates" / "triton-deployment.yaml").read_text()
    assert "- --model-config-name=openvino" in triton
    assert "image: nvcr.io/nvidia/tritonserver:24.10-py3" in triton
    assert "nvidia.com/gpu" not in triton


def test_dry_run_renders_the_model_from_the_repository(optimized: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("gateway:\n  aeTitle: RADIOLOGY\n", encoding="utf-8")
    out = tmp_path / "rendered"
    # two gateway replicas need the PostgreSQL job table and one shared spool (the schema)
    shared = ["--set", "gateway.jobTable.backend=postgresql",
              "--set", "gateway.jobTable.postgresql.host=jobs.db.svc",
              "--set", "gateway.spool.shared.enabled=true"]
    code = main(["deploy", "--repository", str(optimized), "--release", "pilot", "--namespace",
                 "radiology", "-f", str(values), "--set", "gateway.replicas=2", *shared,
                 "--dry-run", "--out", str(out)])
    assert code == 0
    assert "rendered" in capsys.readouterr().out
    model = ModelRelease.from_repository(optimized)
    templates = out / "bedside" / "templates"
    cm = (templates / "gateway-configmap.yaml").read_text()
    assert "pilot-bedside-gateway-model" in cm
    sts = (templates / "gateway-statefulset.yaml").read_text()
    assert f"--model={model.name}" in sts and "--ae-title=RADIOLOGY" in sts
    assert "replicas: 2" in sts and "--job-db=postgresql://bedside@jobs.db.svc:5432/bedside" in sts
    assert "pilot-bedside-triton.radiology.svc:8001" in sts
    assert "nvidia.com/gpu" not in (templates / "triton-deployment.yaml").read_text()


def test_deploy_errors_are_one_line(tmp_path: Path, optimized: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--repository", str(tmp_path), "--dry-run"]) == 2
    assert "holds 0 models" in capsys.readouterr().err
    assert main(["deploy", "--repository", str(optimized), "--dry-run",
                 "--set", "triton.image.tag=latest"]) == 2
    assert "does not render" in capsys.readouterr().err
    assert main(["deploy", "--repository", str(optimized), "--dry-run",
                 "--set", "gateway.replicas=2"]) == 2  # per-pod SQLite would split studies
    assert "gateway/jobTable/backend" in capsys.readouterr().err


def test_rollout_rule() -> None:
    assert rollout_complete(workload("Deployment", "d", 2, 2))
    assert not rollout_complete(workload("Deployment", "d", 2, 1))
    assert not rollout_complete(workload("Deployment", "d", 2, 2, generation=3, observed=2))
    assert rollout_complete(workload("StatefulSet", "s", 1, 1))
    assert not rollout_complete(workload("StatefulSet", "s", 2, 1))


def test_waits_for_rollout_and_model_with_fake_apiserver() -> None:
    state = ApiState(
        workloads={("Deployment", "demo-bedside-triton"): [
            workload("Deployment", "demo-bedside-triton", 1, 0),
            workload("Deployment", "demo-bedside-triton", 1, 0),
            workload("Deployment", "demo-bedside-triton", 1, 1)],
            ("StatefulSet", "demo-bedside-gateway"): [
            workload("StatefulSet", "demo-bedside-gateway", 1, 1)]},
        model_ready=[False, True])
    with fake_apiserver(state) as api:
        cluster = KubeCluster(api_client=api, poll_s=0.01)
        deadline = time.monotonic() + 10
        cluster.wait_rollout("bedside", TARGETS, deadline)
        cluster.wait_model_ready("bedside", TARGETS, "cxr", 3, deadline)
    reads = [r for r in state.requests if r.endswith("/deployments/demo-bedside-triton")]
    assert len(reads) == 3
    proxied = [r for r in state.requests if "/proxy/" in r]
    assert proxied == ["/api/v1/namespaces/bedside/services/demo-bedside-triton:8000/proxy/"
                       "v2/models/cxr/versions/3/ready"] * 2


def test_rollout_timeout_with_fake_apiserver() -> None:
    state = ApiState(workloads={("Deployment", "demo-bedside-triton"): [
        workload("Deployment", "demo-bedside-triton", 1, 0)]})
    with fake_apiserver(state) as api:
        cluster = KubeCluster(api_client=api, poll_s=0.01)
        with pytest.raises(RolloutTimeout, match="Deployment demo-bedside-triton"):
            cluster.wait_rollout("bedside", TARGETS, time.monotonic() + 0.3)


class FakeReleaser:
    """Stands in for Helm; records what the deployer asked for."""

    def __init__(self, revision: int | None, manifest: str, fail: bool = False) -> None:
        self._revision = revision
        self._manifest = manifest
        self._fail = fail
        self.calls: list[tuple[Any, ...]] = []

    def revision(self, name: str) -> int | None:
        return self._revision

    def install(self, name: str, values: dict[str, Any]) -> str:
        self.calls.append(("install", name))
        if self._fail:
            raise DeployError("helm install failed: quota exceeded")
        return self._manifest

    def upgrade(self, name: str, values: dict[str, Any]) -> str:
        self.calls.append(("upgrade", name))
        return self._manifest

    def rollback(self, name: str, revision: int) -> None:
        self.calls.append(("rollback", name, revision))

    def uninstall(self, name: str) -> None:
        self.calls.append(("uninstall", name))


MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo-bedside-triton, labels: {app.kubernetes.io/component: triton}}
---
apiVersion: v1
kind: Service
metadata: {name: demo-bedside-triton, labels: {app.kubernetes.io/component: triton}}
spec: {ports: [{name: http, port: 8000}, {name: grpc, port: 8001}]}
"""


def test_targets_from_manifest() -> None:
    targets = Targets.from_manifest(MANIFEST)
    assert targets.workloads == (("Deployment", "demo-bedside-triton"),)
    assert targets.triton_service == ("demo-bedside-triton", 8000)


def test_upgrade_rolls_back_when_the_model_never_gets_ready_with_fake_apiserver() -> None:
    state = ApiState(workloads={("Deployment", "demo-bedside-triton"): [
        workload("Deployment", "demo-bedside-triton", 1, 1)]}, model_ready=[False])
    releaser = FakeReleaser(revision=4, manifest=MANIFEST)
    with fake_apiserver(state) as api:
        cluster = KubeCluster(api_client=api, poll_s=0.01)
        with pytest.raises(DeployError, match="rolled back to revision 4"):
            deploy(releaser, cluster, "demo", "bedside", MODEL, {}, timeout_s=0.3)
    assert releaser.calls == [("upgrade", "demo"), ("rollback", "demo", 4)]


def test_first_install_is_uninstalled_on_failure_with_fake_releaser() -> None:
    releaser = FakeReleaser(revision=None, manifest=MANIFEST, fail=True)
    with pytest.raises(DeployError, match="quota exceeded; the new release was uninstalled"):
        deploy(releaser, KubeCluster(api_client=object()), "demo", "bedside", MODEL, {}, 5)
    assert releaser.calls == [("install", "demo"), ("uninstall", "demo")]


def test_successful_install_with_fake_apiserver() -> None:
    state = ApiState(workloads={("Deployment", "demo-bedside-triton"): [
        workload("Deployment", "demo-bedside-triton", 1, 1)]})
    releaser = FakeReleaser(revision=None, manifest=MANIFEST)
    with fake_apiserver(state) as api:
        outcome = deploy(releaser, KubeCluster(api_client=api, poll_s=0.01), "demo", "bedside",
                         MODEL, {}, timeout_s=10)
    assert (outcome.action, outcome.model, outcome.version) == ("install", "cxr", 3)
    assert releaser.calls == [("install", "demo")]


def test_release_values_carry_the_manifests_of_the_other_served_models(
        tmp_path: Path, optimized: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(optimized / "repository", repo)
    name = next(p.name for p in repo.iterdir())
    second = json.loads((repo / name / "manifest.json").read_text())
    second["name"] = "ct-seg"
    (repo / "ct-seg").mkdir()
    (repo / "ct-seg" / "manifest.json").write_text(json.dumps(second))
    model = ModelRelease.from_repository(repo, name)
    assert [m["name"] for m in model.others] == ["ct-seg"]
    served = release_values(model, {"gateway": {"models": ["ct-seg"]}})
    assert [m["name"] for m in served["model"]["others"]] == ["ct-seg"]
    assert "others" not in release_values(model, {})["model"]  # not served: not mounted
    assert [m["name"] for m in release_values(
        model, {"gateway": {"models": ["*"]}})["model"]["others"]] == ["ct-seg"]
    second["task"] = "regression"
    (repo / "ct-seg" / "manifest.json").write_text(json.dumps(second))
    with pytest.raises(RepositoryError, match=r"ct-seg.manifest\.json: manifest\.task"):
        ModelRelease.from_repository(repo, name)
