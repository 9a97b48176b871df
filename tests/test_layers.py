"""Layering: which part of omni may import which, checked from the source with ``ast`` (nothing imported).

From the bottom up; a layer may import the layers below it, never the ones above:

    omni.errors, omni.io, omni.registry,  leaves: exceptions, atomic files, registries, reading media
    omni.media
    omni.config                           dataclass configs; knows only errors and io
    omni.run                              the training-run convention (schedule, state, checkpoints)
    omni.tokenizers, omni.decoders        components: modality tokenizers (text, image, audio) and
                                          task heads behind routing tokens (<det>, <gen>)
    omni.document, omni.vocab,            core: document types, the unified vocabulary and
    omni.bundle, omni.model, omni.rope,   tokenizer bundle, the decoder and its position encodings,
    omni.checkpoint, omni.chameleon       checkpoints (which hold the heads), the Chameleon import
    omni.data                             raw shards -> packed token datasets, the training stream
    omni.parallel                         process groups, distributed helpers
    omni.train                            the training loop
    omni.generation                       sampling, Jacobi decoding, pages
    omni.eval                             evaluation
    cli                                   omni.cli, omni.__main__, omni.commands.*, omni.demo

omni.toy (offline data makers for the demo, tests and benchmarks) sits beside this stack and
uses only the leaves, config and document types.

Every import of an ``omni...`` module counts: at the top of a file and inside functions (lazy
imports build the same dependency, only later). Imports under ``if TYPE_CHECKING:`` are ignored,
and so is ``omni/__init__.py``, the lazy public facade.

The rules are data (``RULES``, ``NODES``) right below; each rule is one test.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> the import name it installs under (pyproject.toml's `package-dir`).
FOLDERS = {
    "omni": "omni",
    "tokenizers": "omni.tokenizers",
    "decoders": "omni.decoders",
    "parallel": "omni.parallel",
    "eval": "omni.eval",
    "recipes": "omni.recipes",
}

# The layer rules. `sources`: the modules a rule is about (a name covers its submodules).
# `allowed`: the only omni modules they may import; `forbidden`: omni modules they must not import.
RULES = {
    "config": {
        "sources": ["omni.config"],
        "allowed": ["omni.config", "omni.errors", "omni.io"],
        "why": "configs are plain data: they know only the leaves",
    },
    "tokenizers": {
        "sources": ["omni.tokenizers"],
        "forbidden": ["omni.vocab", "omni.bundle", "omni.document", "omni.data", "omni.toy",
                      "omni.generation", "omni.train", "omni.eval"],
        "why": "modality tokenizers sit below the vocabulary, the unified tokenizer, document types, "
               "the data pipeline, the toy world, training, generation and eval",
    },
    "decoders": {
        "sources": ["omni.decoders"],
        "forbidden": ["omni.vocab", "omni.bundle", "omni.document", "omni.model", "omni.checkpoint",
                      "omni.chameleon", "omni.data", "omni.parallel", "omni.toy", "omni.generation", "omni.train",
                      "omni.eval"],
        "why": "task heads are components, like the modality tokenizers: the core (a checkpoint) assembles "
               "them, the trainer and generation call them; they know only configs, the leaves and tokenizers",
    },
    "model": {
        "sources": ["omni.model"],
        "forbidden": ["omni.decoders", "omni.parallel"],
        "why": "the decoder model is core: it knows neither the output decoders nor the parallel layer",
    },
    "toy": {
        "sources": ["omni.toy"],
        "allowed": ["omni.toy", "omni.config", "omni.errors", "omni.io", "omni.media", "omni.document"],
        "why": "the toy world makes offline data from the leaves, config and document types only",
    },
}

# Nodes of the import graph that must have no cycle: every subpackage (omni.config, omni.data,
# omni.tokenizers, ...) and every other top-level module omni/X.py is its own node (the first two
# parts of its name); the command-line layer is ONE node; `omni` itself (the facade) is no node.
CLI_NODE = "cli"
CLI_MODULES = ["omni.cli", "omni.__main__", "omni.commands", "omni.demo"]
FACADE = "omni"


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the scanned root
    line: int
    source: str  # module that imports
    target: str  # omni module imported

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.target}"


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_files(root: Path, folders: dict[str, str]) -> dict[str, Path]:
    """Every module name under the mapped folders -> its file."""
    modules = {}
    for folder, package in folders.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """The omni modules one file imports, anywhere in it but under `if TYPE_CHECKING:`."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # only the `else:` branch runs
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _covers("omni", alias.name):
                self.found.append((node.lineno, alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolve against this file's package
            parts = self.package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        if not _covers("omni", base):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.found.append((node.lineno, sub if sub in self.known else base))


@functools.cache
def scan(root: Path, folders: tuple[tuple[str, str], ...] = tuple(FOLDERS.items())) -> tuple[Import, ...]:
    """Every import of an omni module in the .py files of `folders` under `root` (omni/__init__.py excluded)."""
    modules = _module_files(root, dict(folders))
    known = set(modules)
    imports = []
    for module, path in sorted(modules.items()):
        if module == FACADE:
            continue
        collector = _Collector(module, path.name == "__init__.py", known)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        rel = path.relative_to(root).as_posix()
        imports += [Import(rel, line, module, target) for line, target in dict.fromkeys(collector.found)]
    return tuple(sorted(imports, key=lambda i: (i.file, i.line, i.target)))


def rule_violations(imports: tuple[Import, ...], rule: dict) -> list[Import]:
    """The imports that break one rule of RULES."""
    bad = []
    for imp in imports:
        if not any(_covers(s, imp.source) for s in rule["sources"]):
            continue
        if "allowed" in rule and not any(_covers(a, imp.target) for a in rule["allowed"]):
            bad.append(imp)
        elif any(_covers(f, imp.target) for f in rule.get("forbidden", ())):
            bad.append(imp)
    return bad


def node_of(module: str) -> str | None:
    """The graph node a module belongs to; None for the facade `omni`."""
    if module == FACADE:
        return None
    if any(_covers(c, module) for c in CLI_MODULES):
        return CLI_NODE
    return ".".join(module.split(".")[:2])


def node_graph(imports: tuple[Import, ...]) -> dict[str, dict[str, list[Import]]]:
    """node -> node it imports -> the imports that make that edge (imports within a node are dropped)."""
    graph: dict[str, dict[str, list[Import]]] = {}
    for imp in imports:
        a, b = node_of(imp.source), node_of(imp.target)
        if a is None or b is None or a == b:
            continue
        graph.setdefault(a, {}).setdefault(b, []).append(imp)
        graph.setdefault(b, {})
    return graph


def _strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_path(graph: dict[str, dict], start: str, goal: str, within: set[str]) -> list[str]:
    prev = {start: start}
    queue = [start]
    for v in queue:
        if v == goal:
            break
        for w in sorted(graph[v]):
            if w in within and w not in prev:
                prev[w] = v
                queue.append(w)
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def find_cycles(imports: tuple[Import, ...]) -> list[list[tuple[str, str, Import]]]:
    """Import cycles between nodes: for every edge inside a strongly connected component, the shortest
    cycle through it (deduplicated), each as a list of (from node, to node, one import making the edge)."""
    graph = node_graph(imports)
    cycles: dict[tuple[str, ...], list[tuple[str, str, Import]]] = {}
    for comp in _strongly_connected(graph):
        members = set(comp)
        for a in comp:
            for b in sorted(graph[a]):
                if b not in members:
                    continue
                nodes = [a, *_shortest_path(graph, b, a, members)]  # a -> b -> ... -> a
                ring = nodes[:-1]
                turn = ring.index(min(ring))
                ring = ring[turn:] + ring[:turn]
                key = tuple(ring)
                if key not in cycles:
                    closed = [*ring, ring[0]]
                    cycles[key] = [(u, v, graph[u][v][0]) for u, v in zip(closed, closed[1:])]
    return [cycles[k] for k in sorted(cycles)]


def format_cycle(cycle: list[tuple[str, str, Import]], imports: tuple[Import, ...] = ()) -> str:
    lines = [" -> ".join([cycle[0][0]] + [v for _, v, _ in cycle])]
    graph = node_graph(imports) if imports else {}
    for u, v, imp in cycle:
        more = len(graph.get(u, {}).get(v, [])) - 1
        extra = f" (+{more} more)" if more > 0 else ""
        lines.append(f"    {u} -> {v}: {imp.file}:{imp.line} imports {imp.target}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The rules, on this repository


def _check_rule(name: str) -> None:
    rule = RULES[name]
    imports = scan(ROOT)
    modules = _module_files(ROOT, FOLDERS)
    assert any(_covers(s, m) for s in rule["sources"] for m in modules), (
        f"rule {name!r}: no module matches {rule['sources']}; update RULES after the move")
    bad = rule_violations(imports, rule)
    what = (f"may import only {', '.join(rule['allowed'])}" if "allowed" in rule
            else f"must not import {', '.join(rule['forbidden'])}")
    if bad:
        pytest.fail(f"layer rule {name!r}: {', '.join(rule['sources'])} {what} ({rule['why']}); "
                    f"{len(bad)} violation(s):\n" + "\n".join(f"  {i}" for i in bad), pytrace=False)


def test_config_imports_only_the_leaves():
    _check_rule("config")


def test_tokenizers_stay_below_vocab_documents_data_and_toy():
    _check_rule("tokenizers")


def test_model_knows_neither_decoders_nor_parallel():
    _check_rule("model")


def test_toy_uses_only_leaves_config_and_documents():
    _check_rule("toy")


def test_no_import_cycle_between_nodes():
    imports = scan(ROOT)
    cycles = find_cycles(imports)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) between nodes (subpackages, top-level modules, the cli "
                    f"layer):\n" + "\n".join(format_cycle(c, imports) for c in cycles), pytrace=False)


def test_scan_sees_every_folder_of_pyproject():
    """A folder added to pyproject's package-dir must be scanned too, and the scan must find imports."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {folder: name for name, folder in conf["package-dir"].items()}
    assert mapping == FOLDERS, f"FOLDERS is out of date with pyproject.toml's package-dir: {mapping}"
    files = {i.file.split("/")[0] for i in scan(ROOT)}
    assert {"omni", "tokenizers"} <= files


# ---------------------------------------------------------------------------------------------------
# The checker itself can fail


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_reports_violations_and_cycles(tmp_path):
    root = _write(tmp_path, {
        "omni/__init__.py": "from omni.train import loop\n",  # the facade: ignored
        "omni/errors.py": "",
        "omni/config/__init__.py": "from .base import check\n",  # relative, inside the node
        "omni/config/base.py": "from omni.errors import OmniError\ncheck = 1\n",
        "omni/config/x.py": (
            "from typing import TYPE_CHECKING\n"
            "import omni.toy.shapes\n"
            "if TYPE_CHECKING:\n"
            "    from omni.train import loop\n"  # type-only: not a violation
            "def f():\n"
            "    from omni import vocab\n"  # lazy, and the `from omni import X` form
        ),
        "omni/toy/__init__.py": "",
        "omni/toy/shapes.py": "def g():\n    from omni.config import base\n",
        "omni/vocab.py": "from omni.model import M\n",
        "omni/model.py": "M = 1\ndef h():\n    from omni.vocab import V\n",
        "omni/cli.py": "from omni.commands import run\n",
        "omni/commands/__init__.py": "",
        "omni/commands/run.py": "from omni.cli import main\n",  # within the cli node
        "tokenizers/__init__.py": "",
        "tokenizers/text.py": "from omni.toy import shapes\nfrom omni.errors import OmniError\n",
    })
    folders = (("omni", "omni"), ("tokenizers", "omni.tokenizers"))
    imports = scan(root, folders)
    assert Import("omni/config/__init__.py", 1, "omni.config", "omni.config.base") in imports  # relative

    config_bad = [str(i) for i in rule_violations(imports, RULES["config"])]
    assert config_bad == ["omni/config/x.py:2 imports omni.toy.shapes", "omni/config/x.py:6 imports omni.vocab"]
    tok_bad = [str(i) for i in rule_violations(imports, RULES["tokenizers"])]
    assert tok_bad == ["tokenizers/text.py:1 imports omni.toy.shapes"]
    assert not rule_violations(imports, RULES["toy"])

    cycles = find_cycles(imports)
    text = "\n".join(format_cycle(c, imports) for c in cycles)
    assert [[u for u, _, _ in c] for c in cycles] == [
        ["omni.config", "omni.toy"], ["omni.model", "omni.vocab"]]
    assert "omni.model -> omni.vocab: omni/model.py:3 imports omni.vocab" in text
    assert "omni.vocab -> omni.model: omni/vocab.py:1 imports omni.model" in text
    assert "omni.toy -> omni.config: omni/toy/shapes.py:2 imports omni.config.base" in text
    assert "cli" not in text and "loop" not in text


def test_checker_passes_a_clean_tree(tmp_path):
    root = _write(tmp_path, {
        "omni/errors.py": "",
        "omni/config/__init__.py": "from omni.errors import E\n",
        "omni/model.py": "import omni.config\n",
        "omni/cli.py": "from omni.model import M\n",
    })
    imports = scan(root, (("omni", "omni"),))
    assert len(imports) == 3
    assert not find_cycles(imports)
    assert all(not rule_violations(imports, r) for r in RULES.values())
