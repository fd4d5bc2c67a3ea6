"""Issue 15 (7): long steps show progress with an estimate; third-party warnings go to the
log file, not the console."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest

from optimizer.progress import progress
from services.commands.optimize import console_and_file


def test_progress_without_a_terminal_logs_each_item_with_an_estimate(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="optimizer.progress"):
        assert list(progress(["minmax", "percentile"], "INT8 calibration", unit="method")) == [
            "minmax", "percentile"]
    lines = [r.getMessage() for r in caplog.records if r.name == "optimizer.progress"]
    assert len(lines) == 2
    assert lines[0].startswith("INT8 calibration: 1/2 method done (") and "s left)" in lines[0]
    assert lines[1].startswith("INT8 calibration: 2/2 method done (")


def test_third_party_warnings_go_to_the_log_file_not_the_console(tmp_path: Path) -> None:
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)  # as the bedside command configures it
    root.addHandler(handler)
    try:
        with console_and_file(tmp_path / "out" / "optimize.log") as log:
            logging.getLogger("torch.onnx._internal.exporter").warning("torchvision is not "
                                                                        "installed")
            logging.getLogger("nncf").info("statistics collection")
            logging.getLogger("optimizer.pipeline").info("step export_onnx_fp32")
            logging.getLogger("onnxruntime").error("a real failure")
            warnings.warn("an exporter's UserWarning", UserWarning, stacklevel=1)
            logging.getLogger("optimizer.quantize").debug("per-node detail")
    finally:
        root.removeHandler(handler)
        after = root.level
        root.setLevel(before)
    shown = console.getvalue()
    assert "step export_onnx_fp32" in shown and "a real failure" in shown
    for hidden in ("torchvision", "statistics collection", "UserWarning", "per-node detail"):
        assert hidden not in shown
    kept = log.read_text()
    for line in ("torchvision is not installed", "statistics collection",
                 "step export_onnx_fp32", "a real failure", "an exporter's UserWarning",
                 "per-node detail"):
        assert line in kept
    # afterwards the console is as it was
    assert handler.filters == [] and handler.level == logging.NOTSET and after == logging.INFO
    assert not any(getattr(h, "baseFilename", None) == str(log) for h in root.handlers)
