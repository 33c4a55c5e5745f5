"""The package's import graph (module-level and function-level imports, read with ast): no cycles, and every
import points down the layers below, in the direction the data flows (data -> select -> train -> infer ->
report), with the shared pieces (config, plotting, metrics) at the bottom and the commands at the top."""
from __future__ import annotations

import sys

from smt.pipeline import ROOT, import_graph

# Bottom to top. A module belongs to the layer of its longest matching prefix; it may import its own layer and
# the layers below. The one home of the layer order.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("smt", "smt.config", "smt.distributed", "smt.metrics", "smt.figures", "smt.files", "smt.seeds")),
    ("stage graph", ("smt.pipeline",)),  # the stage list and code deps: reads params and source files only
    ("data", ("smt.data", "smt.evaluate")),
    ("select", ("smt.select",)),
    ("kernels", ("smt.kernels",)),
    ("models", ("smt.models",)),  # architectures and the one loader of a trained model
    ("train", ("smt.train",)),
    ("infer", ("smt.infer", "smt.export")),
    ("ablations", ("smt.ablations",)),
    ("report", ("smt.report",)),
    ("commands", ("smt.stages", "smt.profile", "smt.benchmark", "smt.smoke", "smt.rehearse", "smt.__main__")),
]


def layer_of(module: str) -> int:
    best, level = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            # "smt" itself names the package's __init__ only, so a new module must be given a layer
            if (module == p or (p != "smt" and module.startswith(p + "."))) and len(p) > len(best):
                best, level = p, i
    assert level is not None, f"{module}: in no layer of tests/test_import_graph.py LAYERS; add it"
    return level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def against_the_flow(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def describe(graph: dict[str, set[str]]) -> str:
    """The layers with their modules, for the closing note of a structural change."""
    lines = []
    for i, (name, _) in enumerate(LAYERS):
        lines.append(f"{i}. {name}: " + ", ".join(sorted(m for m in graph if layer_of(m) == i)))
    return "\n".join(lines)


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_layer_check_flags_an_upward_import():
    assert against_the_flow({"smt.data.images": {"smt.report.index"}, "smt.report.index": {"smt.data.images"}}) == \
        ["smt.data.images (data) imports smt.report.index (report)"]


def test_the_walker_sees_function_level_imports():
    graph = import_graph(ROOT)
    # smt/stages.py imports smt.pipeline inside functions only
    assert "smt.pipeline" in graph["smt.stages"]


def test_package_has_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_every_import_follows_the_layers():
    assert against_the_flow(import_graph(ROOT)) == []
