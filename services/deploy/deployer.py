"""Install or upgrade, wait, and roll back when the new revision does not become ready."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from services.deploy.cluster import Cluster, Targets
from services.deploy.errors import DeployError
from services.deploy.helm import Releaser
from services.deploy.release import ModelRelease

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    action: str  # "install" or "upgrade"
    release: str
    model: str
    version: int


def deploy(releaser: Releaser, cluster: Cluster, release: str, namespace: str,
           model: ModelRelease, values: dict[str, Any], timeout_s: float) -> Outcome:
    """Apply the release, then wait for the rollout and the model. On any failure the release
    goes back to where it was (the previous revision, or nothing for a first install) and a
    DeployError says what failed and what was done about it."""
    deadline = time.monotonic() + timeout_s
    previous = releaser.revision(release)
    action = "install" if previous is None else "upgrade"
    LOG.info("%s of release %s: %s version %d", action, release, model.name, model.version)
    try:
        manifest = (releaser.install(release, values) if previous is None
                    else releaser.upgrade(release, values))
        targets = Targets.from_manifest(manifest)
        cluster.wait_rollout(namespace, targets, deadline)
        cluster.wait_model_ready(namespace, targets, model.name, model.version, deadline)
    except DeployError as exc:
        undo = _undo(releaser, release, previous)
        raise DeployError(f"{exc}; {undo}") from exc
    return Outcome(action, release, model.name, model.version)


def _undo(releaser: Releaser, release: str, previous: int | None) -> str:
    try:
        if previous is None:
            releaser.uninstall(release)
            return "the new release was uninstalled"
        releaser.rollback(release, previous)
        return f"rolled back to revision {previous}"
    except DeployError as exc:
        LOG.error("undo failed: %s", exc)
        return f"and undoing it failed too ({exc})"
