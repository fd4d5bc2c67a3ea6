"""The import-direction checker behind test_layering.py, separate so that it can be tested on a
synthetic tree.

The rules are the gateway's own declarations: each sub-package's ``__init__`` docstring has a
``May import:`` line naming the sub-packages it may import ("(leaves only)" for none). Modules
at the top level are either the composition root (``ROOT_MODULES``, which may import anything)
or leaves (which may import only other leaves; every sub-package may import them). Every
import statement counts, including deferred ones inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT_MODULES = frozenset({"app", "outbox_cli"})
MAY_IMPORT = re.compile(r"^May import:\s*(.*)$", re.M)


@dataclass(frozen=True)
class Layout:
    """What a gateway tree declares: its sub-packages with the packages each may import, its
    composition-root modules and its leaf modules."""

    packages: Mapping[str, frozenset[str]]
    root: frozenset[str]
    leaves: frozenset[str]


def read_layout(base: Path, root_modules: Iterable[str] = ROOT_MODULES) -> Layout:
    """The declarations of the gateway tree at ``base`` (the ``services/gateway`` folder)."""
    packages: dict[str, frozenset[str]] = {}
    for init in sorted(base.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        found = MAY_IMPORT.search(doc)
        if found is None:
            raise AssertionError(f"{init}: the docstring has no 'May import:' line")
        value = found.group(1).strip()
        allowed = [] if value.startswith("(") else [p.strip() for p in value.split(",")]
        packages[init.parent.name] = frozenset(p for p in allowed if p)
    top = {p.stem for p in base.glob("*.py") if p.stem != "__init__"}
    root = frozenset(top & set(root_modules))
    return Layout(packages=packages, root=root, leaves=frozenset(top - root))


def _unit_of(dotted: str, prefix: str) -> str | None:
    """``services.gateway.store.spool`` -> ``store``; outside the gateway -> None."""
    if dotted == prefix:
        return ""
    if not dotted.startswith(prefix + "."):
        return None
    return dotted[len(prefix) + 1:].split(".")[0]


def imported_units(path: Path, module: str, prefix: str) -> set[str]:
    """The gateway units (sub-package or top-level module names) that the file at ``path``,
    the module ``module``, imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    units: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            targets = [base] if base != prefix else [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            unit = _unit_of(target, prefix)
            if unit:
                units.add(unit)
    return units


def unit_imports(base: Path, prefix: str) -> dict[str, set[str]]:
    """Per unit of the tree at ``base`` (module ``prefix``), the other units it imports."""
    edges: dict[str, set[str]] = {}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if not parts:
            continue  # the gateway's own __init__: a docstring
        module = ".".join([prefix, *parts])
        unit = parts[0]
        edges.setdefault(unit, set()).update(imported_units(path, module, prefix) - {unit})
    return edges


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def violations(base: Path, prefix: str, root_modules: Iterable[str] = ROOT_MODULES) -> list[str]:
    """Every import in the tree at ``base`` that breaks its declared direction, and every
    cycle between packages; empty when the tree keeps its declarations."""
    layout = read_layout(base, root_modules)
    found: list[str] = []
    for pkg, allowed in sorted(layout.packages.items()):
        unknown = allowed - set(layout.packages)
        if unknown:
            found.append(f"{pkg}: declares unknown packages {sorted(unknown)}")
    actual = unit_imports(base, prefix)
    for unit, targets in sorted(actual.items()):
        if unit in layout.root:
            continue
        if unit in layout.leaves:
            allowed = set(layout.leaves)
        elif unit in layout.packages:
            allowed = set(layout.packages[unit]) | set(layout.leaves)
        else:
            found.append(f"{unit}: neither a declared package nor a module at the top")
            continue
        for target in sorted(targets - allowed):
            kind = "leaf" if unit in layout.leaves else "package"
            found.append(f"{kind} {unit} imports {target}, which it may not")
    declared_cycle = find_cycle(layout.packages)
    if declared_cycle:
        found.append("declared cycle: " + " -> ".join(declared_cycle))
    package_graph = {u: t & set(layout.packages) for u, t in actual.items()
                     if u in layout.packages}
    actual_cycle = find_cycle(package_graph)
    if actual_cycle:
        found.append("import cycle: " + " -> ".join(actual_cycle))
    return found
