"""The gateway runs without torch: importing it loads no ML framework, and its tests collect
where torch, ONNX, ONNX Runtime and MONAI cannot be imported (as in the gateway's image).

Both checks run in a fresh interpreter, since this one has long since imported the optimizer's
torch side for other tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "monai")

# Every module of the gateway, the CLI and subcommand that start it, and the model contract.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import services.gateway
import optimizer.contract
names = ["services.cli", "services.commands.gateway"]
for package in (services.gateway, optimizer.contract):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
print(json.dumps({"imported": names, "heavy": heavy}))
"""

# A meta-path finder that makes the heavy packages (argv[1]) unimportable, as if not installed;
# then pytest collects the folders (argv[2:]) in the same interpreter.
_BLOCKED_COLLECT = """
import sys
BLOCKED = sys.argv[1].split(",")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker let torch through")
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, check=False,
                          env=dict(os.environ, PYTHONPATH=path))


def test_importing_the_gateway_loads_no_torch_onnx_or_monai() -> None:
    import json

    proc = _python(_IMPORT_ALL, ",".join(HEAVY))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "services.gateway.app" in report["imported"]  # the composition root
    assert "optimizer.contract.preprocess" in report["imported"]
    assert len(report["imported"]) >= 25, report["imported"]
    assert report["heavy"] == [], report["heavy"]


def test_gateway_tests_collect_with_torch_onnx_and_monai_unimportable() -> None:
    targets = ("tests/gateway", "tests/fuzz", "tests/optimizer/contract")
    proc = _python(_BLOCKED_COLLECT, ",".join(HEAVY), *targets)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    collected = re.search(r"(\d+) tests? collected", out)
    assert collected and int(collected.group(1)) > 0, out[-2000:]
    for target in targets:  # every folder contributed tests
        assert f"{target}/" in out, target
