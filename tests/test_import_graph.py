"""The house's import graph: no import circles (function-level imports included: grimp sees
every import statement), and argparse's ``Namespace`` only in ``launch/``, the border where
flags become specs."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1] / "tokenmill"


def import_cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def edges(module: str) -> list[str]:
        found = graph.find_modules_directly_imported_by(module)
        return sorted(m for m in found if m == package or m.startswith(package + "."))

    for root in sorted(graph.modules):
        if root in index or not root.startswith(package):
            continue
        work = [(root, iter(edges(root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges(child))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.b", imported="p.c")
    assert import_cycles(graph, "p") == [["p.a", "p.b"]]


def test_no_import_cycles():
    assert import_cycles(grimp.build_graph("tokenmill"), "tokenmill") == []


def test_argparse_namespace_only_in_launch():
    pattern = re.compile(r"\bargparse\b|\bNamespace\b")
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "launch":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # jinja's template ``namespace()`` object (core/chat_template.py) is not argparse's
            if pattern.search(line) and "jinja2.utils.Namespace" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
