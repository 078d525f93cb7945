"""The package's import graph: no circle, and no module reaches up into a daemon (node, router) for
its constants. Computed from the source (ast), counting imports at module level and inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "entrypoint" / "sglang_fleet"
DAEMONS = {"node", "router"}
# Only the command line starts a daemon; the Consul names everybody shares are in contract.py.
MAY_IMPORT_DAEMONS = {"cli", "__main__"}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`import sglang_fleet.x`, `from sglang_fleet[.x] import y`,
    relative imports), wherever the import statement stands."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in modules:
        edges: set[str] = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "sglang_fleet" if node.level else (node.module or "")
                if node.level and node.module:
                    base += "." + node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == "sglang_fleet" and len(parts) > 1 and parts[1] in modules:
                    edges.add(parts[1])
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"config": {"validation"}, "validation": {"config"}}) == ["config", "validation", "config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_reads_every_kind_of_import(tmp_path):
    (tmp_path / "a.py").write_text("from sglang_fleet import b\ndef f():\n    from sglang_fleet.c import X\n")
    (tmp_path / "b.py").write_text("import sglang_fleet.c\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    assert import_graph(tmp_path) == {"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle == [], f"import circle: {' -> '.join(cycle)}"


def test_no_upward_import_of_a_daemon_module():
    upward = {(mod, dep) for mod, deps in import_graph().items() for dep in deps & DAEMONS
              if mod not in MAY_IMPORT_DAEMONS}
    assert upward == set(), "import the constants from a module below the daemons instead"
