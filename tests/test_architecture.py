"""The package's layers: imports point one way (docs/architecture.md), with no cycle.

Every import of a layerlab module counts, at the top of a file or inside a function, except those under
``if TYPE_CHECKING:``; a function-level import is a dependency all the same, it only runs later.
"""

import ast
import sys
from pathlib import Path

import layerlab

SRC = Path(layerlab.__file__).parent

# Lower layers first; a module may import its own layer and those below it, never one above.
LAYERS = [
    {"errors", "version", "registry", "defaults", "io", "allocator"},
    {"config", "presets", "recipe"},
    {"norms", "packed", "moe", "mod", "recursive", "msg", "model"},
    {"adapters", "offload"},
    {"tokenizer"},
    {"data"},
    {"evaluate", "generate", "probes"},
    {"analysis"},
    {"compress", "train", "export", "grow"},
    {"report"},
    {"sweep"},
    {"cli", "__main__", ""},  # "" is the package itself (layerlab/__init__.py), the public API
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["layerlab", *parts])] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The layerlab modules that ``name`` imports."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_module_has_a_layer():
    assert sorted(m for m in _graph() if _layer(m) not in RANK) == []


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, deps in _graph().items() for b in deps
                    if RANK[_layer(b)] > RANK[_layer(a)])
    assert upward == [], "imports that point up the layers (docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_cycle():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The parser resolves relative imports: a planted cycle and a planted upward import are found."""
    pkg = tmp_path / "layerlab"
    (pkg / "analysis").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("from .analysis import stats\n")
    (pkg / "analysis" / "__init__.py").write_text("")
    (pkg / "analysis" / "stats.py").write_text("def f():\n    from .. import io\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    graph = _graph()
    assert graph["layerlab.io"] == {"layerlab.analysis.stats"}
    assert graph["layerlab.analysis.stats"] == {"layerlab.io"}
