"""The model contract's boundary, read from the source (every import, deferred ones too):
the contract imports only the standard library, numpy, pydicom (and GDCM, a pydicom decoder
backend) and itself; the gateway imports
nothing of the optimizer but the contract."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# gdcm (python-gdcm): a pydicom decoder backend, which optimizer/contract/gdcm_decode.py also
# calls itself (12-bit JPEG Extended, a pydicom plugin), in its helper process only.
CONTRACT_DEPENDENCIES = {"numpy", "pydicom", "gdcm"}


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports are refused)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            names.append(node.module)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_contract_imports_only_the_standard_library_numpy_pydicom_and_itself() -> None:
    files = sorted((ROOT / "optimizer" / "contract").rglob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            allowed = (top in sys.stdlib_module_names or top in CONTRACT_DEPENDENCIES
                       or _within(name, "optimizer.contract"))
            assert allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_gateway_imports_from_the_optimizer_only_the_contract() -> None:
    files = sorted((ROOT / "services" / "gateway").rglob("*.py"))
    assert len(files) >= 20
    seen = 0
    for path in files:
        for name in _imports(path):
            if _within(name, "optimizer"):
                seen += 1
                assert _within(name, "optimizer.contract"), \
                    f"{path.relative_to(ROOT)} imports {name}"
    assert seen > 0  # the gateway does use the contract
