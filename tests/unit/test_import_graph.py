"""The package layering of issue #10, checked on the source with ``ast`` (function-level imports
count too: hiding an edge inside a function does not remove it).

* no cycles among raggen's top-level packages and modules;
* only the application layer (``raggen.app``, ``raggen.cli``) and ``raggen.config`` itself read the
  config; library packages never import ``raggen.config`` or ``raggen.app``;
* ``serve`` imports neither ``train`` nor ``config``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "raggen"
APPLICATION = {"app", "cli"}  # the only nodes that may import the config (and each other)
LIBRARIES = {"corpus", "models", "objectives", "index", "train", "serve", "decoding", "storage", "errors", "names", "retrieval",
             "devices", "ray_utils", "settings_util"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every raggen module ``path`` imports, at any depth of the file (relative imports resolved)."""
    name, is_package = module_name(path), path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + int(is_package)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from raggen import config`
    return {m for m in found if m == "raggen" or m.startswith("raggen.")}


def node_of(module: str) -> str | None:
    """The top-level node a module belongs to: ``raggen.train.loop`` -> ``train``; ``raggen`` -> None."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    top = parts[1]
    return top if (PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file() else None


def node_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        src = node_of(module_name(path))
        if src is None:
            continue
        for module in imported_modules(path):
            dst = node_of(module)
            if dst is not None and dst != src:
                graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "raggen" / "serve"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    mod = src / "x.py"
    mod.write_text("def f():\n    from raggen.train import loop\n    from ..config import load_config\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "raggen"
    try:
        assert {"raggen.train", "raggen.train.loop", "raggen.config"} <= imported_modules(mod)
    finally:
        PACKAGE = saved


def test_find_cycle_finds_a_planted_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_cycles_among_raggen_packages():
    cycle = find_cycle(node_graph())
    assert cycle is None, "import cycle among raggen packages: " + " -> ".join(cycle or [])


def test_library_packages_do_not_read_the_config():
    graph = node_graph()
    missing = [lib for lib in LIBRARIES if node_of(f"raggen.{lib}") is None]
    assert not missing, f"no such package or module (update LIBRARIES): {missing}"
    bad = {
        lib: sorted(graph[lib] & ({"config"} | APPLICATION))
        for lib in LIBRARIES
        if graph[lib] & ({"config"} | APPLICATION)
    }
    assert not bad, f"library packages importing the config or the application layer: {bad}"


def test_serve_imports_neither_train_nor_config():
    edges = node_graph()["serve"]
    assert not edges & {"train", "config", "app"}, sorted(edges)


#: Processes that hold no model, and the modules they import: a shard actor, the HTTP replica, the
#: index build's tokenise tasks (they unpickle an ``EncoderSpec`` and call the tokenizer) and the
#: Ray Train controller (it unpickles a ``TrainJob``); ``raggen.config`` is read by every job driver.
MODEL_FREE_MODULES = [
    "raggen.index.actors",
    "raggen.index.shard_server",
    "raggen.serve.ingress",
    "raggen.index.passage_tokens",
    "raggen.models.specs",
    "raggen.train.job",
    "raggen.config",
]


@pytest.mark.parametrize("module", MODEL_FREE_MODULES)
def test_processes_without_a_model_import_neither_torch_nor_transformers_models(module):
    """torch and transformers' model code there would add ~400 MB and seconds of start-up to every
    such process (measured with ``PYTHONPROFILEIMPORTTIME`` in a dry run: 8-10 s per tokenise
    worker under load, four of them per index build); package names load on first use (PEP 562),
    settings live in torch-free modules (``raggen.models.specs``), the Ingress imports ``Hit`` for
    typing only. A tokenizer alone may load transformers' tokenization code, not its models."""
    code = (
        f"import sys, pickle, {module}; from raggen.models.specs import EncoderSpec; pickle.loads(pickle.dumps(EncoderSpec()));"
        " print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('transformers.models')"
        " or m == 'transformers.modeling_utils'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
