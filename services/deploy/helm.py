"""The Helm side of a deployment, through the Helm v4 SDK (helm-python-sdk): render, install,
upgrade, roll back. No helm binary is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from services.deploy.errors import DeployError


def helm_sdk() -> Any:
    try:
        import helm_python
    except ImportError as exc:  # the deploy extra is not installed
        raise DeployError("bedside deploy needs the Helm SDK: pip install 'bedside[deploy]'") \
            from exc
    return helm_python


class Releaser(Protocol):
    """What the deployer needs from Helm."""

    def revision(self, name: str) -> int | None: ...

    def install(self, name: str, values: dict[str, Any]) -> str: ...

    def upgrade(self, name: str, values: dict[str, Any]) -> str: ...

    def rollback(self, name: str, revision: int) -> None: ...

    def uninstall(self, name: str) -> None: ...


def render(chart: Path, values: dict[str, Any], name: str, namespace: str) -> dict[str, str]:
    """Every template of the chart (hooks included) rendered offline, keyed by template path;
    the chart's values.schema.json is enforced."""
    helm = helm_sdk()
    try:
        with helm.Chart.load(str(chart)) as loaded:
            rendered: dict[str, str] = loaded.render(values, name=name, namespace=namespace)
    except helm.HelmError as exc:
        raise DeployError(f"chart {chart} does not render: {exc}") from exc
    return {path: text for path, text in rendered.items() if text.strip()}


class HelmReleaser:
    """Releases in one namespace of the cluster the kubeconfig names."""

    def __init__(self, chart: Path, namespace: str, timeout_s: int,
                 kubeconfig: Path | None = None, context: str | None = None) -> None:
        self._helm = helm_sdk()
        self._chart = str(chart)
        self._timeout_s = timeout_s
        self._config = self._helm.Config(
            kubeconfig_path=None if kubeconfig is None else str(kubeconfig),
            kube_context=context, namespace=namespace)

    def close(self) -> None:
        self._config.close()

    def revision(self, name: str) -> int | None:
        try:
            status = self._config.status(name)
        except self._helm.HelmNotFoundError:
            return None
        except self._helm.HelmError as exc:
            raise DeployError(f"cannot read release {name!r}: {exc}") from exc
        return int(status["revision"])

    def install(self, name: str, values: dict[str, Any]) -> str:
        return self._write("install", name, values)

    def upgrade(self, name: str, values: dict[str, Any]) -> str:
        return self._write("upgrade", name, values)

    def _write(self, action: str, name: str, values: dict[str, Any]) -> str:
        # Helm applies and returns; readiness is checked by the deployer with the kubernetes
        # client (rollout, then the model), which also decides about rolling back.
        try:
            release = getattr(self._config, action)(self._chart, name, values,
                                                    timeout=self._timeout_s)
        except self._helm.HelmError as exc:
            raise DeployError(f"helm {action} of {name!r} failed: {exc}") from exc
        return str(release.get("manifest", ""))

    def rollback(self, name: str, revision: int) -> None:
        try:
            self._config.rollback(name, version=revision, timeout=self._timeout_s)
        except self._helm.HelmError as exc:
            raise DeployError(f"helm rollback of {name!r} to {revision} failed: {exc}") from exc

    def uninstall(self, name: str) -> None:
        try:
            self._config.uninstall(name, ignore_not_found=True, timeout=self._timeout_s)
        except self._helm.HelmError as exc:
            raise DeployError(f"helm uninstall of {name!r} failed: {exc}") from exc
