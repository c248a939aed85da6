"""The layers' direction (docs/design.md section 5): no import cycle in din_ext, lazy imports included, and the kernel
layer knows nothing of the glue above it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"din_ext": ROOT / "din_ext", "din_ext.kernels": ROOT / "kernels"}  # kernels/ installs as din_ext.kernels


def modules() -> Dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> Dict[str, Set[str]]:
    """module -> the din_ext modules it imports anywhere in its body (function-level imports too)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    if alias.name == "_C":  # the compiled extension module, not the package's namespace
                        continue
                    sub = f"{source}.{alias.name}"
                    deps.add(sub if sub in known else source)
        graph[name] = {d for d in deps if d in known and d != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    """The check itself can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_din_ext():
    graph = import_graph()
    assert {"din_ext.cli", "din_ext.training", "din_ext.ops.attention", "din_ext.kernels.attention"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_kernels_import_no_glue_and_no_other_op():
    graph = import_graph()
    for name, deps in graph.items():
        if not name.startswith("din_ext.kernels."):
            continue
        for dep in deps:
            assert not dep.startswith("din_ext.ops"), f"{name} imports {dep}"
            if dep.startswith("din_ext.kernels."):
                assert dep == "din_ext.kernels.common", f"{name} imports {dep}"


def test_lower_layers_never_import_higher_ones():
    """cli -> training -> model -> modules -> ops -> (reference | compiled ops | kernels)."""
    order = ["din_ext.cli", "din_ext.training", "din_ext.model", "din_ext.modules", "din_ext.ops"]
    graph = import_graph()
    for name, deps in graph.items():
        for dep in deps:
            for low, high in [(order[j], order[i]) for i in range(len(order)) for j in range(i + 1, len(order))]:
                if name == low or name.startswith(low + "."):
                    assert not (dep == high or dep.startswith(high + ".")), f"{name} imports {dep}"
