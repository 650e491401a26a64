"""The project's import graph, read from the source with ``ast`` (imports at module level and inside
functions alike): no cycle between modules, ``glm_common`` imports no framework, and the two backends
never import each other.
"""
from __future__ import annotations

import ast
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("glm_common", "mindspore_glm", "torch_glm", "convert", "hccl")
FRAMEWORKS = ("torch", "mindspore", "mindformers")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    out[_module_name(path)] = path
    return out


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES.get(mod, "").endswith("__init__.py")
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str) -> set:
    """Every module name ``mod`` imports anywhere in its source (``from a import b`` counts ``a`` and,
    when ``a.b`` is a module of the project, ``a.b``)."""
    tree = ast.parse(open(MODULES[mod], encoding="utf-8").read(), MODULES[mod])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return out


def graph() -> dict:
    """Project module -> the project modules it imports (a package's ``__init__`` counts as the package)."""
    g = {}
    for mod in MODULES:
        deps = set()
        for name in imports_of(mod):
            # ``a.b.c`` depends on the deepest project module among a, a.b, a.b.c
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in MODULES:
                    deps.add(".".join(parts[:i]))
                    break
        deps.discard(mod)
        g[mod] = deps
    return g


def cycles(g: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports():
    """The reader counts an import inside a function (the way cycles used to be hidden)."""
    src = "def f():\n    from glm_common import names\n"
    tree = ast.parse(src)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "glm_common" for n in ast.walk(tree))
    assert any(d.startswith("glm_common") for d in graph()["mindspore_glm.train"])


def test_no_import_cycle():
    """No cycle anywhere in the packages (convert/ and hccl/ included), function-local imports counted."""
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_glm_common_imports_no_framework():
    bad = sorted((m, name) for m in MODULES if m.startswith("glm_common")
                 for name in imports_of(m) if name.split(".")[0] in FRAMEWORKS)
    assert not bad, f"glm_common imports a framework: {bad}"


def test_backends_never_import_each_other():
    bad = []
    for m in MODULES:
        for name in imports_of(m):
            top = name.split(".")[0]
            if m.startswith("mindspore_glm") and top == "torch_glm":
                bad.append((m, name))
            if m.startswith("torch_glm") and top == "mindspore_glm":
                bad.append((m, name))
    assert not bad, f"the backends import each other: {bad}"
