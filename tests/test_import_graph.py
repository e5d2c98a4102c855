"""Every module of the package imports on its own in a fresh interpreter, and the package's own imports
(module level and inside functions) form no cycle."""
from __future__ import annotations

import ast
import concurrent.futures
import os
import multiprocessing
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dsvl_jax"


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file under dsvl_jax/ (packages under their own name)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def test_module_list_is_the_package():
    # The walk finds the package, its subpackages and leaf modules (guards against an empty parametrisation).
    assert {PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.runtime", f"{PACKAGE}.train.trainer",
            f"{PACKAGE}.generation.engine", f"{PACKAGE}.convert.export"} <= set(MODULES)
    assert len(MODULES) > 50


# Third-party libraries the package imports, loaded once by the fork server: every child starts from that
# process with no project module loaded, so it sees exactly what a fresh interpreter sees of dsvl_jax while
# skipping the ~1 s of jax/flax/orbax imports per module. Names that fail to import are skipped by the server.
_PRELOAD = ["numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain", "ml_collections",
            "PIL.Image", "tqdm", "ml_dtypes"]


def _import_in_child(module: str) -> tuple[str, str]:
    import importlib
    import traceback
    leaked = sorted(m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + "."))
    if leaked:  # the child must start with no project module, or the check would prove nothing
        return module, f"child started with project modules loaded: {leaked}"
    try:
        importlib.import_module(module)
    except BaseException:
        return module, traceback.format_exc()[-2000:]
    return module, ""


@pytest.mark.heavy  # ~20 s of fresh interpreters; the static graph and cycle tests above run in make test
def test_every_module_imports_in_a_fresh_interpreter():
    # One process per module (max_tasks_per_child=1): an import that only works after some other module was
    # imported first (an order-dependent cycle, a missing import hidden by a sibling) fails here.
    os.environ["JAX_PLATFORMS"] = "cpu"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 2), mp_context=ctx,
                                                max_tasks_per_child=1) as pool:
        results = list(pool.map(_import_in_child, sorted(MODULES)))
    failed = {m: err for m, err in results if err}
    assert len(results) == len(MODULES)
    assert not failed, "\n\n".join(f"import {m} failed:\n{err}" for m, err in failed.items())


def test_a_child_sees_no_project_module():
    # The guard above is real: a module imported in the child is reported, an order dependence would be too.
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        assert pool.submit(_import_in_child, "dsvl_jax.no_such_module").result()[1].rstrip().endswith(
            "No module named 'dsvl_jax.no_such_module'")


# ---- the import graph, from the source -------------------------------------------------------------
def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str) -> set[str]:
    """The package modules `module` imports anywhere in its body (module level, functions, methods).

    `import a.b.c` and `from a.b import c` (c a submodule) give an edge to a.b.c; `from a.b import name`
    gives a.b. Parent packages that Python initialises on the way are not edges: they would make every
    package whose __init__ re-exports a submodule look like a cycle through itself."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != module}


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m, p) for m, p in MODULES.items()}


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan): the modules on some cycle."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle through each strongly connected component."""
    cycles = []
    for comp in _components(graph):  # a concrete cycle inside the component, by walking edges that stay in it
        start = min(comp)
        path, seen, v = [start], {start}, start
        while True:
            v = min(w for w in graph[v] if w in comp)
            if v in seen:
                cycles.append(path[path.index(v):] + [v])
                break
            path.append(v)
            seen.add(v)
    return cycles


def test_graph_reads_imports_at_every_level(tmp_path):
    g = _graph()
    # module level, absolute
    assert "dsvl_jax.models.vlm" in g["dsvl_jax.runtime"]
    # relative imports of a package __init__
    assert "dsvl_jax.tasks.suite" in g["dsvl_jax.tasks"]
    # inside a function: the package has none left, so a module written here has one
    path = tmp_path / "lazy.py"
    path.write_text("def f():\n    from dsvl_jax.generation import engine\n    return engine\n")
    assert "dsvl_jax.generation.engine" in _imports("dsvl_jax.lazy", str(path))


def test_cycle_finder_finds_a_known_cycle_and_none_in_a_chain():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_package_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_project_imports_are_at_module_level():
    # Imports inside functions hid the old cycles; the graph above only stays honest if every project import
    # is at the top of its module (third-party ones may be lazy: torch, transformers, libtpu are optional).
    lazy = []
    for module, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                    lazy.append(f"{path}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name.startswith(PACKAGE) for a in node.names):
                    lazy.append(f"{path}:{node.lineno}")
    assert not lazy, "project imports inside functions:\n" + "\n".join(lazy)
