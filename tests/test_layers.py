"""The house plan, enforced: a layer imports only the layers below it (docs/architecture.md).

Every import in the package (top-level and inside functions, ``TYPE_CHECKING`` included) is
read with :mod:`ast`; nothing is imported, so a broken rule is named with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "safelora_ray"

#: What each layer may import besides itself (and ``safelora_ray._version``). Execution
#: knows nothing of storage, formats or pipelines; no pipeline imports another.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "storage": {"core"},
    "formats": {"core", "storage"},
    "planning": {"core", "storage", "formats"},
    "execution": {"core"},
    "reports": {"core", "storage", "formats", "planning"},
    "pipelines": {"core", "storage", "formats", "planning", "execution", "reports"},
    "cli": {"core", "storage", "formats", "planning", "execution", "reports", "pipelines"},
}


def _layer(module: str) -> str | None:
    """``safelora_ray.pipelines.build.driver`` → ``pipelines.build``; a top-level module → None."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("__init__", "__main__", "_version"):
        return None
    if parts[0] == "pipelines" and len(parts) > 1 and parts[1] != "__init__":
        return f"pipelines.{parts[1]}"
    return parts[0]


def _module_of(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from safelora_ray.x import y`` may name a module y
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if (package.parent / f"{node.module}.{a.name}".replace(".", "/")).exists()
                      or (package.parent / (f"{node.module}.{a.name}".replace(".", "/")
                                            + ".py")).exists()]
    return [(line, m) for line, m in found if m == "safelora_ray" or m.startswith("safelora_ray.")]


def _allowed(src: str, dst: str) -> bool:
    if dst == src:
        return True
    top_src, top_dst = src.split(".")[0], dst.split(".")[0]
    if top_src == "pipelines" and top_dst == "pipelines":
        return False  # no pipeline imports another (a shared piece goes down a layer)
    return top_dst in ALLOWED[top_src]


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        src = _layer(_module_of(path, package))
        if src is None:
            continue
        for line, target in _imports(path, package):
            dst = _layer(target)
            if dst is None or _allowed(src, dst):
                continue
            out.append(f"{path.relative_to(package.parent)}:{line}: {src} imports {target}")
    return out


def test_every_module_is_in_a_layer() -> None:
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    layers = {f"{name}" for name in ALLOWED} | {"__init__.py", "__main__.py", "_version.py"}
    assert top <= layers, f"not in a layer: {sorted(top - layers)}"


def test_a_layer_imports_only_layers_below_it() -> None:
    found = violations()
    assert not found, "imports against the house plan:\n" + "\n".join(found)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_of(path).removesuffix(".__init__")
        graph[mod] = {t for _, t in _imports(path)}
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    modules = set(graph)
    edges = {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}
    # A package's __init__ re-exporting its own modules is not a circle through them.
    for m in edges:
        edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if seen.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in seen and (cycle := visit(t)):
                return cycle
        stack.pop()
        seen[m] = 2
        return None

    for m in sorted(edges):
        if m not in seen and (cycle := visit(m)):
            pytest.fail("import circle: " + " → ".join(cycle))


def test_the_checker_sees_a_broken_rule(tmp_path: Path) -> None:
    """The walk is not vacuous: a copy of the package with three planted breaks (execution
    importing storage inside a function, a pipeline importing another, core importing
    formats through ``from safelora_ray.formats import ...``) are found, and nothing else."""
    import shutil

    copy = tmp_path / "safelora_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(copy) == []
    (copy / "execution" / "planted.py").write_text(
        "def f():\n    from safelora_ray.storage import open_storage\n")
    (copy / "pipelines" / "build" / "planted.py").write_text(
        "import safelora_ray.pipelines.sanitize.driver\n")
    (copy / "core" / "planted.py").write_text("from safelora_ray.formats import safetensors\n")
    found = violations(copy)
    assert {v.split(":")[0] for v in found} == {
        "safelora_ray/execution/planted.py", "safelora_ray/pipelines/build/planted.py",
        "safelora_ray/core/planted.py"}, found
    assert any("execution/planted.py:2: execution imports safelora_ray.storage" in v
               for v in found)
    assert any("pipelines.build imports safelora_ray.pipelines.sanitize" in v for v in found)
    assert any("core/planted.py:1: core imports safelora_ray.formats" in v for v in found)
