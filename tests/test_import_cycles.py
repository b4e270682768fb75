"""No module of src/medmoe imports another that imports it back, function-local imports included.

The import graph is read from the source (AST), not from ``sys.modules``, so an import hidden
inside a function counts as much as one at the top of the file. ``from pkg import name`` points
at the module ``pkg.name`` when that is a module, else at the submodule the package's
``__init__`` re-exports ``name`` from (so going through an aggregating ``__init__`` is not a
cycle by itself), else at ``pkg``. The implicit import of a module's parent packages is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "medmoe"


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class ImportGraph:
    """Edges ``module -> imported medmoe module`` of every import statement in the package."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
        self.edges = {name: sorted(self._imports(name)) for name in files}

    def _reexport_source(self, package: str, name: str, seen: frozenset[str]) -> str:
        """The module that defines ``name`` re-exported by ``package/__init__.py``."""
        path = self.files[package]
        for node in ast.walk(self.trees[package]):
            if not isinstance(node, ast.ImportFrom):
                continue
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(package, path, node)
                    return self._target(source, alias.name, seen | {package})
        return package

    def _target(self, module: str, name: str, seen: frozenset[str] = frozenset()) -> str:
        """Where ``from module import name`` leads."""
        if f"{module}.{name}" in self.files:
            return f"{module}.{name}"
        if module in self.files and _is_package(self.files[module]) and module not in seen:
            return self._reexport_source(module, name, seen)
        return module

    def _imports(self, module: str) -> set[str]:
        targets: set[str] = set()
        for node in ast.walk(self.trees[module]):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == ROOT}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, self.files[module], node)
                if source.split(".")[0] == ROOT:
                    targets |= {self._target(source, a.name) for a in node.names}
        return {t for t in targets if t in self.files and t != module}

    def cycles(self) -> list[list[str]]:
        """Every strongly connected component of more than one module (Tarjan), sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in self.edges[node]:
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

        for node in self.edges:
            if node not in index:
                visit(node)
        return sorted(components)


def _graph(sources: dict[str, str], tmp_path: Path) -> ImportGraph:
    files = {}
    for module, text in sources.items():
        is_package = module.count(".") == 0 or module.endswith("/")
        module = module.rstrip("/")
        parts = module.split(".")
        path = (
            tmp_path.joinpath(*parts, "__init__.py")
            if is_package
            else tmp_path.joinpath(*parts[:-1], f"{parts[-1]}.py")
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[module] = path
    return ImportGraph(files)


def test_the_package_has_no_import_cycle() -> None:
    graph = ImportGraph(_module_files())
    assert len(graph.edges) > 50  # the walk saw the package
    cycles = graph.cycles()
    details = [
        " <-> ".join(c)
        + ": "
        + "; ".join(f"{m} -> {[e for e in graph.edges[m] if e in c]}" for m in c)
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_a_function_local_import_cycle_is_found(tmp_path: Path) -> None:
    graph = _graph(
        {
            "medmoe": "",
            "medmoe.pkg/": "from medmoe.pkg.a import f\n",
            "medmoe.pkg.a": "def f():\n    from .b import g\n    return g\n",
            "medmoe.pkg.b": "def g():\n    from medmoe.pkg import f\n    return f\n",
        },
        tmp_path,
    )
    assert graph.edges["medmoe.pkg.b"] == ["medmoe.pkg.a"]  # through the re-export
    assert graph.cycles() == [["medmoe.pkg.a", "medmoe.pkg.b"]]


@pytest.mark.parametrize("statement", ["import medmoe.pkg.a", "from medmoe.pkg import a"])
def test_importing_a_sibling_through_its_package_is_an_edge(tmp_path: Path, statement) -> None:
    graph = _graph(
        {"medmoe": "", "medmoe.pkg/": "", "medmoe.pkg.a": "", "medmoe.pkg.b": statement},
        tmp_path,
    )
    assert graph.edges["medmoe.pkg.b"] == ["medmoe.pkg.a"]
    assert graph.cycles() == []


def test_the_base_model_loader_does_not_reach_into_the_data_package() -> None:
    graph = ImportGraph(_module_files())
    assert graph.edges["medmoe.base_model"] == ["medmoe.assets", "medmoe.errors"]
    assert graph.edges["medmoe.errors"] == []  # a leaf: error wording only
    assert graph.edges["medmoe.assets"] == []
    assert not [e for e in graph.edges["medmoe.data.toy_clinic"] if e.startswith("medmoe.data.tok")]
