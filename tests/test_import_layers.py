"""The package's imports only go down its layers, with no cycle between files or packages.

Layers, lowest first (a module may import its own layer and the ones below):
  models, parallel, data          the modules, the mesh and sharding rules, the data layer
  checkpoints                     storage: safetensors, HF name tables, orbax
  workdir                         run-directory facts and atomic file writes
  engine, sampling                the stage-agnostic trainer, loading, the KV-cache sampler
  eval (graders)                  scoring answers: parsers, judges, held-out QA
  sft, feedback, rm, ppo, inference   one package per stage
  eval.run, eval.agreement        runners over the stages' outputs
  stages                          the registry of stages
  main_job                        the chain, the controls, the held-out table
  api, report, rlaif_jax          the public surface
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlaif_jax")
LAYERS = (
    ("models", "parallel", "data"),
    ("checkpoints",),
    ("workdir",),
    ("engine", "sampling"),
    ("eval",),
    ("sft", "feedback", "rm", "ppo", "inference"),
    ("eval.run", "eval.agreement"),
    ("stages",),
    ("main_job",),
    ("api", "report", ""),
)
# Heavy or optional libraries a function may import lazily (each such import has a comment).
LAZY_OK = ("transformers", "torch", "tensorflow", "tensorflow_datasets", "orbax", "decord", "av",
           "matplotlib", "apache_beam", "tensorboardX", "array_record", "gguf")
MAX_FUNCTION_IMPORTS = 15


def modules(root: str = ROOT) -> dict[str, str]:
    """'rlaif_jax.x.y' -> file path, for every module of the package."""
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports(path: str, module: str, known: set) -> list[tuple[str, int, bool]]:
    """(imported rlaif_jax module, line, at module level) of a file; `from pkg import name`
    counts as importing pkg.name when that is a module."""
    tree = ast.parse(open(path).read())
    top = set(map(id, tree.body))
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            out.append((name, node.lineno, id(node) in top))
    return out


def layer_of(module: str) -> int:
    """The layer of a module: the most specific name of LAYERS that is it or its package."""
    rel = module.removeprefix("rlaif_jax").removeprefix(".")
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (rel == name or rel.startswith(name + ".") or name == "") and len(name) > best_len:
                if name == "" and rel:
                    continue
                best, best_len = index, len(name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it")
    return best


def graph(root: str = ROOT) -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules(root)
    known = set(mods)
    return {m: [(n, line, t) for n, line, t in imports(p, m, known)
                if n == "rlaif_jax" or n.startswith("rlaif_jax.")]
            for m, p in mods.items()}


def upward_imports(root: str = ROOT) -> list[str]:
    bad = []
    for module, edges in graph(root).items():
        for name, line, _ in edges:
            if module == "rlaif_jax" or name == "rlaif_jax":
                if name == "rlaif_jax" and module != "rlaif_jax":
                    bad.append(f"{module}:{line} imports the package root (the public surface)")
                continue
            target = name if name in modules(root) else name.rpartition(".")[0]
            if layer_of(target) > layer_of(module):
                bad.append(f"{module}:{line} imports {name} from a higher layer")
    return bad


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def file_cycles(root: str = ROOT) -> list[list[str]]:
    mods = set(modules(root))
    edges = {m: {n if n in mods else n.rpartition(".")[0] for n, _, _ in e} - {m, "rlaif_jax"}
             for m, e in graph(root).items() if m != "rlaif_jax"}
    return cycles(edges)


def package_cycles(root: str = ROOT) -> list[list[str]]:
    def top(module):
        return module.split(".")[1] if module.count(".") else module

    edges: dict[str, set] = {}
    for module, e in graph(root).items():
        if module == "rlaif_jax":
            continue
        edges.setdefault(top(module), set()).update(
            top(n) for n, _, _ in e if n != "rlaif_jax" and top(n) != top(module))
    return cycles(edges)


def function_level_imports(root: str = ROOT) -> list[str]:
    out = []
    for module, path in modules(root).items():
        for name, line, at_top in imports(path, module, set()):
            if not at_top and name.split(".")[0] not in LAZY_OK:
                out.append(f"{module}:{line} {name}")
    return out


def test_no_upward_import():
    assert upward_imports() == []


def test_no_cycle_between_files_or_packages():
    assert file_cycles() == [] and package_cycles() == []


def test_few_function_level_imports():
    found = function_level_imports()
    assert len(found) <= MAX_FUNCTION_IMPORTS, "\n".join(found)


def test_the_library_never_reads_the_configs():
    pattern = re.compile(r"^\s*(from|import)\s+configs\b|[\"']configs\.\w", re.M)
    offenders = [path for path in modules().values() if pattern.search(open(path).read())]
    assert offenders == []


@pytest.mark.parametrize("planted, expected", [
    ("from rlaif_jax.ppo.stage import run\n", "imports rlaif_jax.ppo.stage from a higher layer"),
    ("import rlaif_jax.main_job\n", "imports rlaif_jax.main_job from a higher layer"),
])
def test_a_planted_upward_import_is_caught(tmp_path, planted, expected):
    import shutil
    copy = tmp_path / "rlaif_jax"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "models" / "heads.py"
    target.write_text(target.read_text() + "\n" + planted)
    assert any(expected in line and line.startswith("rlaif_jax.models.heads")
               for line in upward_imports(str(copy)))


def test_a_planted_cycle_is_caught(tmp_path):
    import shutil
    copy = tmp_path / "rlaif_jax"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "parallel" / "mesh.py"
    target.write_text(target.read_text() + "\nfrom rlaif_jax.data import pipeline\n")
    assert any("rlaif_jax.parallel.mesh" in c for c in file_cycles(str(copy)))
    assert ["data", "parallel"] in package_cycles(str(copy))
