"""The package's floors: no import circle, the benchmarks apart, no file too long to read.

Read from the source (`ast`), nothing imported: every import of a `pipeline` module counts,
at the top of a file, under `TYPE_CHECKING` or inside a function alike, so a circle cannot hide
behind an import made late.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "pipeline"
BENCH = "pipeline.bench"
MAX_LINES = 600


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name is in: itself, else the nearest enclosing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that `module` imports anywhere in its file, with a line of each."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pipeline import store`: the submodule; `from pipeline.x import f`: pipeline.x
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.setdefault(target, node.lineno)
    return out


def _graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    modules = _modules(package)
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _said(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    ties = [
        f"{a} -> {b} (line {graph[a][b]})" for a in circle for b in sorted(graph[a]) if b in circle
    ]
    return "; ".join(ties)


def test_no_module_of_the_package_imports_itself_round_a_circle():
    graph = _graph()
    assert "pipeline.api" in graph and graph["pipeline"], "the package was not read"
    circles = _circles(graph)
    assert not circles, "import circles: " + " | ".join(_said(graph, c) for c in circles)


def test_the_circle_check_sees_an_import_made_inside_a_function(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pipeline import a\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = _graph(pkg)
    assert graph["pipeline.c"] == {"pipeline.a": 1}
    assert _circles(graph) == [["pipeline.a", "pipeline.sub.b"]]


def test_nothing_but_the_benchmarks_imports_the_benchmarks():
    graph = _graph()
    assert BENCH in graph, "the benchmarks are a subpackage"
    inside = {m for m in graph if m == BENCH or m.startswith(BENCH + ".")}
    users = [
        f"{m} (line {graph[m][t]}) -> {t}"
        for m in sorted(set(graph) - inside)
        for t in sorted(graph[m])
        if t in inside
    ]
    assert not users, "the product imports the benchmarks: " + "; ".join(users)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_file_of_the_product_is_over_600_lines():
    """A file is read whole by whoever changes it; the benchmarks (pipeline/bench/) are exempt."""
    bench = PACKAGE / "bench"
    sizes = {
        p.relative_to(ROOT).as_posix(): _lines(p)
        for p in PACKAGE.rglob("*.py")
        if bench not in p.parents
    }
    over = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines: {over}"
