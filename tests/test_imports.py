"""The package imports cleanly: every module of ``connmix_tx`` imports on its own, and no module
takes part in an import cycle among the package's own modules.

The cycle check reads the source (``ast``), not ``sys.modules``: an edge A -> B is an import of B
that runs when A is imported (module level, including ``try`` / ``if`` blocks, but not
``if TYPE_CHECKING:`` and not imports inside functions, which run later).  ``from P import N``
is an edge to ``P.N`` when that is a module of the package, else to ``P`` itself.  A package's
``__init__`` importing its own submodules is not a cycle (Python imports the package first).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "connmix_tx"
ROOT = REPO / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package (namespace folders included): dotted name -> file."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += _module_level_imports(node.body)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                edges |= {t for t in targets if t in modules}
                continue
            if node.level:
                base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    edges.add(submodule)
                elif base in modules:
                    edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete circle through ``component``, for the failure message (a -> b -> a)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        step = sorted(t for t in graph[path[-1]] if t in members)
        back = [t for t in step if t == start]
        if back and len(path) > 1:
            return " -> ".join(path + [start])
        fresh = [t for t in step if t not in seen]
        if not fresh:
            return " -> ".join(path + [step[0]]) if step else " <-> ".join(component)
        path.append(fresh[0])
        seen.add(fresh[0])


MODULES = module_files()


def test_the_module_list_covers_the_package() -> None:
    # Namespace folders (no __init__.py) count too, and the split rooms are there.
    assert {"connmix_tx", "connmix_tx.engine.api", "connmix_tx.engine.api_wire", "connmix_tx.client",
            "connmix_tx.client.cluster", "connmix_tx.later", "connmix_tx.names"} <= set(MODULES)


def test_the_graph_reads_absolute_relative_and_from_imports(tmp_path: Path) -> None:
    """The checker itself: it finds a planted cycle and ignores lazy and TYPE_CHECKING imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")  # relative, back to a: a circle
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n"
        "def later():\n    from pkg import e\n")
    (pkg / "e.py").write_text("try:\n    from pkg import d\nexcept ImportError:\n    d = None\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == set()
    assert graph["pkg.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert _cycle_path(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"


def test_no_module_of_the_package_takes_part_in_an_import_cycle() -> None:
    graph = import_graph(MODULES)
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(_cycle_path(graph, c) for c in found)


def test_every_module_imports_on_its_own() -> None:
    """Each module imports first in a fresh interpreter state (order-dependent circles show as
    ImportError there); one subprocess for all, which forgets the package between modules."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'connmix_tx' or m.startswith('connmix_tx.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("name", ["connmix_tx.engine.api_server", "connmix_tx.client", "connmix_tx.engine.api"])
def test_the_split_rooms_import_first(name: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_package_folder_is_installed() -> None:
    """setup.py lists its packages by hand (some folders are namespace packages): a folder of
    modules missing there would be missing from an installed wheel (``connmix_tx.client``)."""
    listed = set(re.findall(r'"(connmix_tx(?:\.\w+)*)"', (REPO / "setup.py").read_text(encoding="utf-8")))
    folders = {name.rpartition(".")[0] if path.name != "__init__.py" else name for name, path in MODULES.items()}
    assert folders - listed == set(), "packages missing from setup.py"
