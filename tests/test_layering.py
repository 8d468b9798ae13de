"""The package's import graph: no cycles, and no import against the layer order.

Every module under ``engine/`` is read with :mod:`ast` (nothing is imported). Every ``import`` and
``from ... import`` counts, at module level and inside functions alike (the lazy imports too: a
lazy import against the order is still an upward dependency, and a lazy cycle still ties two
modules together). Relative imports are resolved; ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when that module exists, else to ``pkg``. An import of ``a.b.c`` is an edge
to ``a.b.c`` only, not to the packages above it, so a package ``__init__`` must stay light (each is
checked as a module of its own). Imports under ``if TYPE_CHECKING:`` are skipped: they never run.

``LAYERS`` is the order documented in ``docs/architecture.md``; keep the two in step. A module
belongs to the layer of the longest prefix that names it, and may import only its own layer or a
lower one. A new module that no prefix names fails the test until it is given a layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "engine"

# Lowest first; a module may import only from its own layer or a lower one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("engine.errors", "engine.logs", "engine.plan", "engine.device.spec", "engine.device.host"),
    ("engine.config", "engine.config_parse", "engine.models", "engine.sampling",
     "engine.checkpoint"),
    ("engine.runtime",),
    ("engine.estimate",),
    ("engine.planner",),
    ("engine.device",),
    ("engine.pipeline", "engine.integrations"),
    ("engine.batch",),
    ("engine.commands", "engine.cli", "engine.web", "engine.__init__", "engine.__main__"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
                (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")):
            skipped |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return skipped


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``engine`` modules that module ``name`` (at ``path``) imports, resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = _type_checking_blocks(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def _layer(name: str) -> int | None:
    name = "engine.__init__" if name == "engine" else name  # the root package, not a prefix
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, (f"modules {missing} belong to no layer; add their package to `LAYERS` "
                         "in tests/test_layering.py and to docs/architecture.md.")


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, ("import cycles (lazy imports included): "
                        + "; ".join(" <-> ".join(c) for c in cycles)
                        + "; move what both need into a lower module.")


def test_imports_follow_the_layer_order():
    graph = _graph()
    bad = sorted(f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
                 for src, dsts in graph.items() for dst in dsts
                 if _layer(src) is not None and _layer(dst) is not None
                 and _layer(dst) > _layer(src))
    assert not bad, ("imports against the layer order in docs/architecture.md: "
                     + "; ".join(bad) + "; move the shared code down a layer.")


@pytest.mark.parametrize("source, expected", [
    ("from .b import c", {"engine.x.b"}),
    ("from . import b", {"engine.x.b"}),
    ("from .. import y", {"engine.y"}),
    ("def f():\n    import engine.x.b\n", {"engine.x.b"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import c\n", set()),
])
def test_import_resolution(tmp_path, source, expected):
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {"engine.x.a", "engine.x.b", "engine.x", "engine.y", "engine"}
    assert _imports("engine.x.a", path, known) == expected


def test_layer_lookup():
    assert _layer("engine") == len(LAYERS) - 1  # the root package is the top, not a prefix
    assert _layer("engine.device.spec") == 0 < _layer("engine.device.probe")
    assert _layer("engine.estimate.vae.memory") == _layer("engine.estimate")
    assert _layer("engine.somewhere_new") is None
