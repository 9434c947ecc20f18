"""The package's module graph: no import cycle anywhere in solver/, the checkpointing package
knows no solver, and the framework does not import a task."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'solver'


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(path: Path) -> set[str]:
    """The solver modules `path` imports at module level (imports inside functions are lazy)."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([node.module] if node.module else []))
            found |= {f'{base}.{alias.name}' for alias in node.names} | {base}
    return {m for m in found if m.split('.')[0] == 'solver'}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    # A module's own packages are loaded before it (`from . import x` does not import them again).
    return {name: {m for m in imports(path) if m in modules and m != name and not name.startswith(m + '.')}
            for name, path in modules.items()}


def test_the_module_graph_is_read_from_the_sources():
    edges = graph()
    assert 'solver.checkpointing.manager' in edges['solver.base']
    assert 'solver.errors' in edges['solver.checkpointing.format']


def test_no_import_cycle_in_the_package():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in sorted(edges[node]):
            if state.get(child) == 1:
                cycles.append(path[path.index(child):] + [child] if child in path else [node, child])
            elif child not in state:
                visit(child, path + [child])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checkpointing_package_knows_no_solver():
    allowed = {'solver', 'solver.distrib', 'solver.errors'}
    for name, targets in graph().items():
        if name.startswith('solver.checkpointing'):
            outside = {t for t in targets if not t.startswith('solver.checkpointing')} - allowed
            assert outside == set(), name


def test_the_framework_does_not_import_a_task():
    for name, targets in graph().items():
        if not name.startswith(('solver.drums', 'solver.regression')):
            assert not any(t.startswith(('solver.drums', 'solver.regression')) for t in targets), name
