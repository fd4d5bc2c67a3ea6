"""Shared, torch-free test helpers: the tiny model's manifest and the Triton environment.

The gateway's tests must collect and run where torch is not installed, as in the gateway's
image, so nothing here imports torch, ONNX Runtime or MONAI (tests/gateway/test_torch_free.py
collects tests/gateway with them blocked). The fixtures that train, export or optimize a model
(``tiny_data``, ``tiny_model``, ``optimized``) live with the optimizer's tests in
``tests/optimizer/fixtures.py``; registering them here as a plugin keeps them session-wide (one
optimizer run per session, shared by the optimizer, deploy, load and integration tests), and
that module imports the optimizer's torch side only inside its fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimizer.contract.manifest import AccuracyBudget, InputSpec, Manifest, Normalize, OutputSpec

pytest_plugins = ("tests.optimizer.fixtures", "tests.postgres")

ROOT = Path(__file__).resolve().parents[1]

TINY_MANIFEST = Manifest(
    name="tiny-cxr",
    version=1,
    task="classification",
    input=InputSpec(name="image", modalities=("CR", "DX"), height=64, width=64, channels=1,
                    window=None, normalize=Normalize(mean=0.4, std=0.2)),
    output=OutputSpec(name="logits", labels=("lesion",), activation="sigmoid",
                      thresholds=(0.5,)),
    accuracy_budget=AccuracyBudget(max_auc_drop=1.0, min_agreement=0.0),
    latency_slo_ms=50.0,
)


def triton_env() -> Path:
    """Triton's environment as scripts/dev.sh makes it; its absence is a failure, not a skip."""
    env = Path(os.environ.get("BEDSIDE_TRITON_ENV", ROOT / ".venv-triton"))
    if not (env / "bin" / "python").exists():
        pytest.fail(f"no Triton environment at {env}: run scripts/dev.sh setup")
    return env
