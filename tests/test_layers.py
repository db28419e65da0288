"""The walls between layers, checked on every import statement (module level and inside functions).

- `pipeline/` never imports `jobs/` (entry points depend on the library, not the other way round);
- the pure logic (heads, templating, batching, packing, pairing, metrics, objectives, units) never
  imports Ray, so it runs and is tested without a cluster;
- curation reads only the Parquet contract and generic storage, never `pipeline.labeling`;
- `heads/` is tensor naming and math: it never imports `pipeline.embed` (backbones, checkpoints).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"

PURE = [
    "pipeline/heads",
    "pipeline/embed/templating.py",
    "pipeline/embed/batching.py",
    "pipeline/embed/packing.py",
    "pipeline/curation/pairs.py",
    "pipeline/curation/rerank.py",
    "pipeline/curation/thresholds.py",
    "pipeline/metrics.py",
    "pipeline/objectives.py",
    "pipeline/units.py",
]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def files_under(rel: str) -> list[Path]:
    p = REPO / rel
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def offenders(rels: list[str], forbidden: str) -> dict[str, list[str]]:
    found = {}
    for rel in rels:
        for path in files_under(rel):
            bad = sorted(m for m in imported_modules(path) if m == forbidden or m.startswith(forbidden + "."))
            if bad:
                found[str(path.relative_to(REPO))] = bad
    return found


def test_the_import_scanner_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pipeline" / "curation"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def g():\n    import ray.data\n    from ..labeling import manifest\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert {"ray.data", "pipeline.labeling", "pipeline.labeling.manifest"} <= imported_modules(f)


@pytest.mark.parametrize(
    "rels, forbidden",
    [
        (["pipeline"], "jobs"),
        (PURE, "ray"),
        (["pipeline/curation"], "pipeline.labeling"),
        (["pipeline/heads"], "pipeline.embed"),
    ],
    ids=["pipeline-not-jobs", "pure-logic-not-ray", "curation-not-labeling", "heads-not-embed"],
)
def test_layer_walls(rels, forbidden):
    assert all((REPO / rel).exists() for rel in rels), "a walled path moved: update this test"
    assert offenders(rels, forbidden) == {}


def module_graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (anywhere in the file). `from pkg import
    name` is an edge to the submodule pkg.name when there is one, else to pkg itself."""
    modules = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        imported = imported_modules(path)
        # a package named only because a submodule is imported from it (`from pkg import sub`)
        named_for_sub = {m for m in imported if any(o.startswith(m + ".") and o in modules for o in imported)}
        graph[name] = {t for m in imported - named_for_sub if (t := target(m)) and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_pipeline_modules():
    """Counting function-level imports: a cycle hidden inside a function is still a cycle."""
    graph = module_graph()
    assert "pipeline.labeling.run" in graph["pipeline.training"]  # the scanner sees real edges
    assert cycles(graph) == []


def test_labeling_never_imports_training():
    """Training orchestration depends on the labeling job, never the other way round."""
    assert offenders(["pipeline/labeling"], "pipeline.training") == {}
