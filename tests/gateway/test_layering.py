"""The gateway's import direction, as each sub-package's docstring declares it, holds for every
import in every gateway module; and the checker that says so fails on synthetic violations."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.layering import find_cycle, read_layout, unit_imports, violations

GATEWAY = Path(__file__).resolve().parents[2] / "services" / "gateway"
PREFIX = "services.gateway"


def test_every_gateway_import_keeps_the_declared_direction() -> None:
    assert violations(GATEWAY, PREFIX) == []


def test_the_declarations_say_what_the_issue_asks() -> None:
    layout = read_layout(GATEWAY)
    assert set(layout.packages) == {"edges", "security", "intake", "processing", "inference",
                                    "store", "delivery", "dicom"}
    assert layout.root == {"app", "outbox_cli"}
    assert {"errors", "status", "phi", "metrics", "config"} <= layout.leaves
    for pkg, allowed in layout.packages.items():
        assert "edges" not in allowed, f"{pkg} may import edges: only the composition root may"
    assert not layout.packages["store"] & {"inference", "edges", "processing", "delivery"}
    assert "delivery" not in layout.packages["processing"]  # the worker gets a sink


def test_only_the_composition_root_imports_edges() -> None:
    importers = {unit for unit, targets in unit_imports(GATEWAY, PREFIX).items()
                 if "edges" in targets}
    assert importers == {"app"}


def test_store_imports_no_inference_core() -> None:
    """spool and jobs used to import the inference core for ``uid_hash`` alone."""
    assert unit_imports(GATEWAY, PREFIX)["store"] <= {"phi", "errors", "metrics", "config"}


# The checker itself, on small synthetic trees (pkg is the synthetic prefix).

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    base = tmp_path / "pkg"
    for name, text in {"__init__.py": '"""Synthetic gateway."""\n', **files}.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return base


CLEAN = {
    "app.py": "from pkg.edges import http\nfrom pkg.store.files import Files\n",
    "errors.py": "class Oops(Exception):\n    pass\n",
    "edges/__init__.py": '"""Edges.\n\nMay import: store\n"""\n',
    "edges/http.py": "from pkg.errors import Oops\nfrom pkg.store import files\n",
    "store/__init__.py": '"""Store.\n\nMay import: (leaves only)\n"""\n',
    "store/files.py": "from pkg import errors\n\nclass Files:\n    pass\n",
}


def test_checker_passes_a_tree_that_keeps_its_declarations(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path, CLEAN), "pkg") == []


def test_checker_finds_a_forbidden_package_import(tmp_path: Path) -> None:
    base = _tree(tmp_path, {**CLEAN, "store/files.py": "from pkg.edges.http import x\n"})
    found = violations(base, "pkg")
    assert "package store imports edges, which it may not" in found
    assert any(v.startswith("import cycle: ") for v in found)  # edges -> store -> edges


def test_checker_finds_deferred_and_type_checking_imports(tmp_path: Path) -> None:
    deferred = ("from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    import pkg.edges.http\n")
    in_function = "def f() -> None:\n    from pkg.edges import http  # noqa\n"
    for text in (deferred, in_function):
        base = _tree(tmp_path, {**CLEAN, "store/files.py": text})
        assert violations(base, "pkg") == ["package store imports edges, which it may not",
                                           "import cycle: edges -> store -> edges"]


def test_checker_finds_a_leaf_importing_a_package(tmp_path: Path) -> None:
    base = _tree(tmp_path, {**CLEAN, "errors.py": "from pkg.store import files\n"})
    assert violations(base, "pkg") == ["leaf errors imports store, which it may not"]


def test_checker_finds_relative_imports(tmp_path: Path) -> None:
    base = _tree(tmp_path, {**CLEAN, "store/files.py": "from ..edges import http\n"})
    assert "package store imports edges, which it may not" in violations(base, "pkg")


def test_checker_finds_a_declared_cycle(tmp_path: Path) -> None:
    base = _tree(tmp_path, {**CLEAN,
                            "store/__init__.py": '"""Store.\n\nMay import: edges\n"""\n'})
    assert violations(base, "pkg") == ["declared cycle: edges -> store -> edges"]


def test_checker_refuses_a_package_without_a_declaration(tmp_path: Path) -> None:
    base = _tree(tmp_path, {**CLEAN, "store/__init__.py": '"""Store."""\n'})
    with pytest.raises(AssertionError, match="no 'May import:' line"):
        violations(base, "pkg")


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
