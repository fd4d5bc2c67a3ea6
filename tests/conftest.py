"""Shared fixtures: small synthetic data sets, a tiny optimized model repository, real peers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizer import checkpoint
from optimizer.benchmark import BenchOptions
from optimizer.manifest import AccuracyBudget, InputSpec, Manifest, Normalize, OutputSpec
from optimizer.synthetic import write_labelled_set
from optimizer.train import DEMO_ARCHITECTURE, DEMO_KWARGS

ROOT = Path(__file__).resolve().parents[1]
# Benchmarks in tests check the mechanics, not the figures: a few runs per point.
QUICK_BENCH = BenchOptions(warmup=2, min_runs=5, min_seconds=0.02, max_batch=4)

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration and validation folders of 64x64-bound synthetic CR instances."""
    root = tmp_path_factory.mktemp("data")
    write_labelled_set(root / "calibration", 12, seed=11)
    write_labelled_set(root / "validation", 24, seed=12)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised demo DenseNet checkpoint with its manifest beside it."""
    import torch

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = checkpoint.build(DEMO_ARCHITECTURE, DEMO_KWARGS).eval()
    checkpoint.save(root / "model.pt", DEMO_ARCHITECTURE, DEMO_KWARGS, model)
    TINY_MANIFEST.save(root / "manifest.json")
    return root


@pytest.fixture(scope="session")
def optimized(tiny_model: Path, tiny_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The optimizer's output folder (report, variants, repository) for the tiny model."""
    from optimizer.pipeline import OptimizeRequest, optimize

    out = tmp_path_factory.mktemp("optimized")
    optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=out, threads=1, bench=QUICK_BENCH, calibration_methods=("minmax", "percentile"),
    ))
    yield out
