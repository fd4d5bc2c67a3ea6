"""What gets deployed: the model (from the optimizer's repository) and the chart values."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.contract.errors import ManifestError
from optimizer.contract.manifest import Manifest
from services.deploy.errors import RepositoryError

MANIFEST_FILE = "manifest.json"
# The custom Triton config an OpenVINO version carries for the openvino backend of the stock NGC
# image (optimizer.ov_repository writes <model>/configs/openvino.pbtxt beside config.pbtxt).
OPENVINO_CONFIG_NAME = "openvino"


@dataclass(frozen=True)
class ModelRelease:
    """A model version that a Triton model repository holds, ready to be served."""

    name: str
    version: int
    manifest: dict[str, Any]
    target: str  # "cpu" (python backend) or "gpu" (onnxruntime + TensorRT)
    # "onnxruntime" (model.onnx) or "openvino" (model.xml + configs/openvino.pbtxt)
    runtime: str = "onnxruntime"
    # The manifests of the repository's other models (the chart's model.others, for a
    # gateway that serves several: gateway.models), by name.
    others: tuple[dict[str, Any], ...] = ()

    @property
    def model_config_name(self) -> str:
        """Triton's --model-config-name for this version in a cluster ("" = config.pbtxt)."""
        return OPENVINO_CONFIG_NAME if self.runtime == "openvino" else ""

    @classmethod
    def from_repository(cls, repository: Path, model: str | None = None) -> ModelRelease:
        """Read ``<repository>/<model>/manifest.json``; ``model`` may be omitted when the
        repository holds exactly one model. The optimizer's ``--out`` folder works too."""
        if (repository / "repository").is_dir():
            repository = repository / "repository"
        if not repository.is_dir():
            raise RepositoryError(f"model repository {repository} does not exist")
        models = sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILE).is_file())
        if model is None:
            if len(models) != 1:
                found = ", ".join(models) or "none"
                raise RepositoryError(
                    f"{repository} holds {len(models)} models ({found}): name one with --model")
            model = models[0]
        model_dir = repository / model
        if model not in models:
            raise RepositoryError(f"no model {model!r} with a {MANIFEST_FILE} in {repository}")
        try:
            manifest = Manifest.load(model_dir / MANIFEST_FILE)
        except ManifestError as exc:
            raise RepositoryError(f"{model_dir / MANIFEST_FILE}: {exc}") from exc
        version_dir = model_dir / str(manifest.version)
        runtime = "openvino" if (version_dir / "model.xml").is_file() else "onnxruntime"
        if runtime == "onnxruntime" and not (version_dir / "model.onnx").is_file():
            raise RepositoryError(f"version {manifest.version} of {model!r} has no model.onnx "
                                  f"(or OpenVINO model.xml) in {version_dir}")
        if not (model_dir / "config.pbtxt").is_file():
            raise RepositoryError(f"{model_dir} has no config.pbtxt")
        cluster_config = model_dir / "configs" / f"{OPENVINO_CONFIG_NAME}.pbtxt"
        if runtime == "openvino" and not cluster_config.is_file():
            raise RepositoryError(f"version {manifest.version} of {model!r} is OpenVINO IR but "
                                  f"{cluster_config} (the openvino backend's config) is missing")
        target = "cpu" if (version_dir / "model.py").is_file() else "gpu"
        others = []
        for name in models:
            if name != model:
                try:
                    others.append(Manifest.load(repository / name / MANIFEST_FILE).to_dict())
                except ManifestError as exc:
                    raise RepositoryError(f"{repository / name / MANIFEST_FILE}: {exc}") from exc
        return cls(name=manifest.name, version=manifest.version,
                   manifest=manifest.to_dict(), target=target, runtime=runtime,
                   others=tuple(others))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge: mappings merge key by key, anything else in ``override`` replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def release_values(model: ModelRelease, user_values: Mapping[str, Any]) -> dict[str, Any]:
    """The user's values with the model's name, version and manifest on top: the chart always
    serves exactly what the repository holds, with the Triton config that serves it (an
    OpenVINO version: configs/openvino.pbtxt, the stock image's openvino backend)."""
    overlay: dict[str, Any] = {"model": {"name": model.name, "version": model.version,
                                         "manifest": model.manifest}}
    # A gateway serving more of the repository's models (gateway.models, "*": all) gets their
    # manifests from the repository too.
    served = user_values.get("gateway", {}).get("models") or []
    others = [m for m in model.others if "*" in served or m["name"] in served]
    if others:
        overlay["model"]["others"] = others
    triton: dict[str, Any] = {}
    if model.target == "cpu":
        # The python-backend (CPU) variant needs no GPU; keep the user's choice otherwise.
        triton["gpu"] = {"enabled": bool(
            user_values.get("triton", {}).get("gpu", {}).get("enabled", False))}
    if model.model_config_name:
        # A user's other name would load config.pbtxt (the python backend) on an image that
        # may lack OpenVINO; a version without configs/ falls back to config.pbtxt by itself.
        triton["modelConfigName"] = model.model_config_name
    if triton:
        overlay["triton"] = triton
    return deep_merge(user_values, overlay)


def load_values_file(path: Path) -> dict[str, Any]:
    """A values file (YAML, like ``helm -f``)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RepositoryError(f"values file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RepositoryError(f"values file {path}: the top level must be a mapping")
    return data
