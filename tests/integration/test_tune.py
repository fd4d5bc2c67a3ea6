"""``bedside tune`` against a real Triton in explicit model-control mode."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.errors import TuneError
from optimizer.tune import Grid, tune
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env

pytestmark = pytest.mark.integration
GRID = Grid(queue_delays_us=(0, 2000), preferred_batch_sizes=((),), instances=(1,),
            concurrencies=(1, 3))


@pytest.fixture()
def explicit_triton(optimized: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    repo = tmp_path / "repo"
    shutil.copytree(optimized / "repository", repo)
    triton = TritonServer(TritonInstall.discover(triton_env()), repo, tmp_path / "triton",
                          TritonPorts(free_port(), free_port(), free_port()),
                          explicit_models=True)
    triton.start()
    try:
        yield repo, triton.grpc_url
    finally:
        triton.stop()


def test_tune_sweeps_and_writes_the_best_config(explicit_triton: tuple[Path, str],
                                                tmp_path: Path) -> None:
    repo, url = explicit_triton
    result = tune(url, repo, TINY_MANIFEST.name, GRID, duration_s=0.5, budget_ms=1000.0,
                  out_dir=tmp_path / "tune")
    rows = result["sweep"]
    assert len(rows) == 4 and all(r["requests"] > 0 and r["errors"] == 0 for r in rows)
    best = max(rows, key=lambda r: r["throughput"])
    assert result["best"] == best
    cfg = text_format.Parse((repo / TINY_MANIFEST.name / "config.pbtxt").read_text(),
                            mc.ModelConfig())
    assert cfg.dynamic_batching.max_queue_delay_microseconds == best["max_queue_delay_us"]
    assert cfg.backend == "python" and cfg.input[0].name == "image"  # the rest is kept
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert saved["chosen"]["max_queue_delay_us"] == best["max_queue_delay_us"]
    assert "| 2000 |" in (tmp_path / "tune" / "tune.md").read_text()
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:  # the server itself now runs the chosen configuration
        live = client.get_model_config(TINY_MANIFEST.name, as_json=True)["config"]
        assert client.is_model_ready(TINY_MANIFEST.name)
    finally:
        client.close()
    delay = int(live.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0))
    assert delay == best["max_queue_delay_us"]
    png = (tmp_path / "tune" / "throughput_vs_concurrency.png").read_bytes()
    assert png[:4] == b"\x89PNG"


def test_impossible_budget_is_a_tune_error(explicit_triton: tuple[Path, str],
                                           tmp_path: Path) -> None:
    repo, url = explicit_triton
    before = (repo / TINY_MANIFEST.name / "config.pbtxt").read_text()
    grid = Grid(queue_delays_us=(0,), preferred_batch_sizes=((),), instances=(1,),
                concurrencies=(1,))
    with pytest.raises(TuneError, match=r"no configuration kept p95 within 0\.001 ms"):
        tune(url, repo, TINY_MANIFEST.name, grid, duration_s=0.3, budget_ms=0.001,
             out_dir=tmp_path / "tune")
    assert (repo / TINY_MANIFEST.name / "config.pbtxt").read_text() == before
