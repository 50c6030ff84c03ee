"""The package's folders are its layers, and imports only go down.

Read with `ast` (no import is executed), so a function-level import counts as much as one at the
top of a file: a circle hidden inside a function is still a circle.

    ops, reference (0)  <-  methods (1)  <-  integrations (2)  <-  evaluation (3)  <-  top (4)

`python tests/test_layering.py [package folder]` prints the import levels and circles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "tasksieve"
ROOT = Path(__file__).resolve().parents[1] / "python" / PACKAGE

# The public facade and entry points: they may reach any layer (the CLI runs the evaluation).
TOP = {"tasksieve", "tasksieve.__main__", "tasksieve.cli", "tasksieve.premoe", "tasksieve.info",
       "tasksieve.bench"}
LAYERS = {"ops": 0, "reference": 0, "methods": 1, "integrations": 2, "evaluation": 3}
TOP_LAYER = 4
# Op-layer modules at the package root: setup.py writes the build info and the extension there, and
# the version is read by every layer.
ROOT_OPS = {"tasksieve._build_info", "tasksieve._C", "tasksieve._version"}
NO_TRANSFORMERS = {"ops", "reference", "methods"}


def module_name(path: Path, root: Path) -> str:
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_pkg: bool) -> set[tuple[str, str]]:
    """Every import in `source`, at any depth of the file, as (submodule, module) pairs:
    `from a import b` is `a.b` when that is a module, else the name b of module `a`."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update((alias.name, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_pkg)
            out.update((f"{target}.{alias.name}", target) for alias in node.names)
    return out


def read_package(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the module names it imports} for each .py file under `root`."""
    found = {module_name(p, root): (p, p.name == "__init__.py") for p in sorted(root.rglob("*.py"))}
    known = set(found) | ROOT_OPS
    return {m: {sub if sub in known else mod
                for sub, mod in imports_of(p.read_text(), m, is_pkg)}
            for m, (p, is_pkg) in found.items()}


def internal_graph(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between the package's own .py modules (self-edges dropped)."""
    return {m: {t for t in names if t in imports and t != m} for m, names in imports.items()}


def layer_of(module: str) -> int:
    if module in TOP:
        return TOP_LAYER
    if module in ROOT_OPS:
        return 0
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    raise AssertionError(f"{module} sits in no layer: put it under ops/, reference/, methods/, "
                         "integrations/ or evaluation/, or add it to TOP if it is a facade")


def family(module: str) -> str:
    if module in ROOT_OPS:
        return "ops"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def see_through_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the subpackages' ``__init__`` modules: importing a package is importing what its
    ``__init__`` re-exports (a re-export is not a level of work). The root facade stays a module."""
    pkgs = {m for m in graph if "." in m and any(o.startswith(m + ".") for o in graph)}

    def expand(t, seen):
        if t not in pkgs:
            return {t}
        return set().union(set(), *(expand(u, seen | {t}) for u in graph[t] if u not in seen))

    return {m: set().union(set(), *(expand(t, {m}) for t in ts)) for m, ts in graph.items() if m not in pkgs}


def import_levels(graph: dict[str, set[str]]) -> int:
    """Modules on the longest import chain, each circle counted as one module, package re-exports seen
    through (:func:`see_through_packages`)."""
    graph = see_through_packages(graph)
    comp = {m: m for m in graph}
    for c in circles(graph):
        for m in c:
            comp[m] = c[0]
    dag = {}
    for m, ts in graph.items():
        dag.setdefault(comp[m], set()).update(comp[t] for t in ts if comp[t] != comp[m])
    depth = {}

    def level(v):
        if v not in depth:
            depth[v] = 1 + max((level(w) for w in dag.get(v, ())), default=0)
        return depth[v]

    return max((level(v) for v in dag), default=0)


def violations(imports: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layering, as readable lines."""
    graph = internal_graph(imports)
    bad = []
    for c in circles(graph):
        bad.append("import circle: " + " <-> ".join(c))
    for m, targets in sorted(graph.items()):
        lm, fm = layer_of(m), family(m)
        for t in sorted(targets):
            lt, ft = layer_of(t), family(t)
            if lt > lm:
                bad.append(f"{m} imports {t}: up from layer {lm} to {lt}")
            elif fm == "reference" and ft != "reference":
                bad.append(f"{m} imports {t}: the reference imports nothing of the package")
            elif ft == "reference" and fm != "reference":
                bad.append(f"{m} imports {t}: only tests and benchmarks use the reference")
            elif fm != ft and {fm, ft} == {"ops", "reference"}:
                bad.append(f"{m} imports {t}: ops and reference are kept apart")
    for m, names in sorted(imports.items()):
        if family(m) in NO_TRANSFORMERS and m in graph:
            hits = sorted(n for n in names if n == "transformers" or n.startswith("transformers."))
            if hits:
                bad.append(f"{m} imports {hits[0]}: {family(m)} must not need transformers")
    return bad


def report(root: Path = ROOT) -> dict:
    graph = internal_graph(read_package(root))
    return {"modules": len(graph), "import_levels": import_levels(graph), "circles": circles(graph)}


# --- the package ------------------------------------------------------------------------------


def test_package_layers_hold():
    bad = violations(read_package())
    assert not bad, "layering broken:\n  " + "\n  ".join(bad)


def test_package_has_no_circle_and_few_levels():
    r = report()
    print(f"\n{r['modules']} modules, {r['import_levels']} import levels, "
          f"{len(r['circles'])} circles")
    assert r["circles"] == []
    # top -> evaluation -> integrations -> methods -> ops, a few modules deep in each: keep it shallow
    assert r["import_levels"] <= 10, "the import chain grew deeper: flatten it before adding a level"


# --- the checker can fail ---------------------------------------------------------------------


def _fake(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_sees_circles_upward_imports_and_transformers(tmp_path):
    root = _fake(tmp_path, {
        "__init__.py": "from .methods import a\n",
        "ops/__init__.py": "",
        "methods/__init__.py": "",
        # the circle and the upward import are hidden inside functions, on purpose
        "methods/a.py": "def f():\n    from . import b\n",
        "methods/b.py": "def g():\n    from .a import f\n    from ..integrations import hf\n",
        "integrations/__init__.py": "",
        "integrations/hf.py": "from ..evaluation import niah\nimport transformers\n",
        "evaluation/__init__.py": "",
        "evaluation/niah.py": "",
        "reference/__init__.py": "from ..ops import x\n",
        "ops/x.py": "from transformers.cache_utils import DynamicLayer\n",
    })
    bad = violations(read_package(root))
    text = "\n".join(bad)
    assert "import circle: tasksieve.methods.a <-> tasksieve.methods.b" in text
    assert "tasksieve.methods.b imports tasksieve.integrations.hf: up from layer 1 to 2" in text
    assert "tasksieve.integrations.hf imports tasksieve.evaluation.niah: up" in text
    assert "tasksieve.reference imports tasksieve.ops.x: the reference imports nothing" in text
    assert "tasksieve.ops.x imports transformers.cache_utils" in text
    assert not any(line.startswith("tasksieve.integrations.hf imports transformers")
                   for line in bad)
    r = report(root)
    assert r["circles"] == [["tasksieve.methods.a", "tasksieve.methods.b"]]
    # __init__ -> {a, b} (one circle) -> integrations.hf -> evaluation.niah
    assert r["import_levels"] == 4


def test_checker_resolves_relative_imports():
    assert imports_of("from ..ops import window_scores\n", "tasksieve.methods.flexprefill",
                      False) == {("tasksieve.ops.window_scores", "tasksieve.ops")}
    assert ("tasksieve.methods.windowkv.state.PressState", "tasksieve.methods.windowkv.state") in \
        imports_of("from .state import PressState\n", "tasksieve.methods.windowkv", True)
    assert ("tasksieve.ops._loader", "tasksieve.ops") in imports_of(
        "def f():\n    from . import _loader\n", "tasksieve.ops", True)


if __name__ == "__main__":
    r = report(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print(f"{r['modules']} modules, {r['import_levels']} import levels, "
          f"{len(r['circles'])} circles")
    for c in r["circles"]:
        print("  circle: " + " <-> ".join(c))
