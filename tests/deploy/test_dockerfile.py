"""Static checks of the Dockerfile (no Docker engine here to build it): pinned bases, the
targets the chart and README name, non-root final stages, nothing secret or bulky copied."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^FROM (\S+) AS (\S+)$", line)
        if m:
            base = re.sub(r"\$\{(\w+)\}", lambda a: args[a.group(1)], m.group(1))
            current = stages.setdefault(m.group(2), [f"FROM {base}"])
        elif current and line.strip() and not line.startswith("#"):
            current.append(line.strip())
    return stages


def test_targets_exist_and_final_stages_run_as_non_root() -> None:
    stages = _stages()
    assert {"gateway", "optimizer", "triton-cpu"} <= set(stages)
    for target in ("gateway", "optimizer", "triton-cpu"):
        users = [line for line in stages[target] if line.startswith("USER ")]
        assert users, target
        uid = users[-1].split()[1].split(":")[0]
        assert uid not in ("0", "root"), target


def test_base_images_are_pinned() -> None:
    for name, lines in _stages().items():
        base = lines[0].removeprefix("FROM ")
        if base in _stages():  # a stage of this file
            continue
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, f"{name}: {base}"


def test_dockerignore_keeps_environments_and_data_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", ".venv-triton", "bedside-demo", "tests"} <= ignored
