"""Session fixtures that need the optimizer's torch side: synthetic labelled data, a tiny demo
DenseNet checkpoint, and the optimizer's output folder for it.

Registered as a plugin by tests/conftest.py so that every test directory shares one instance of
each per session. The module itself imports no torch, ONNX Runtime or MONAI (only inside the
fixtures), so registering it costs the gateway's tests nothing and works without torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizer.synthetic import write_labelled_set
from tests.conftest import TINY_MANIFEST


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

    from optimizer import checkpoint
    from optimizer.train import DEMO_ARCHITECTURE, DEMO_KWARGS

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
    from tests.optimizer.quick_bench import QUICK_BENCH

    out = tmp_path_factory.mktemp("optimized")
    optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=out, threads=1, bench=QUICK_BENCH, calibration_methods=("minmax", "percentile"),
        # the random model's outputs barely vary (std 0.007): INT8 misses its scale-aware rung,
        # and the tests here are about the pipeline's mechanics, so INT8 is judged absolutely
        mae_tolerances={"int8": 0.05},
    ))
    yield out
