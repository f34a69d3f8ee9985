"""The package's import graph: no cycles, no imports of the package root, layers import downward.

Read from the source with `ast` (module-level and function-level imports alike), so a cycle
hidden behind a deferred import is found too; then every module is imported in a fresh
interpreter in dependency order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxbar"

#: Layer of each module (by longest matching prefix): a module may import its own layer and
#: the ones below it.
LAYERS = {
    "jaxbar.version": 0, "jaxbar.measured_devices": 0, "jaxbar.config": 1,
    "jaxbar.core": 2, "jaxbar.calibration": 3, "jaxbar.nn": 4, "jaxbar.data": 4,
    "jaxbar.study.engine": 5, "jaxbar.study.montecarlo": 5, "jaxbar.train": 5,
    "jaxbar.study": 6, "jaxbar.cli_options": 7, "jaxbar.train.cli": 7,
    "jaxbar.study.cli_sweep": 7, "jaxbar.cli": 8, "jaxbar": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The jaxbar modules `name` imports (a `from a import b` of submodule b counts as a.b)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "jaxbar"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "jaxbar":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    found.discard(name)
    return found


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_import_cycles():
    _, graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downward_and_never_the_root():
    _, graph = _graph()
    bad = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
           if m != "jaxbar" and (d == "jaxbar" or _layer(d) > _layer(m))]
    assert not bad, "\n".join(bad)


def test_every_module_imports_alone_in_dependency_order():
    _, graph = _graph()
    order, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        order.append(m)

    for m in sorted(graph):
        visit(m)
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr[-3000:]
