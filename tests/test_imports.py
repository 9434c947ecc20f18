"""The package's module graph: no import cycle anywhere in solver/ (imports inside functions
count: they defer a cycle, they do not remove it), the checkpointing package knows no solver,
and the framework does not import a task."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'solver'


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _import_statements(tree: ast.AST, typing_only: bool = False):
    """Every import statement in `tree`, at any depth, with whether it runs only for type checkers."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                yield from _import_statements(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _import_statements(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _import_statements(node, typing_only)


def imports(path: Path, typing_only: bool = False) -> set[str]:
    """The solver modules `path` imports anywhere (module level, functions, methods).

    With `typing_only`, the imports under `if TYPE_CHECKING:` instead, which never run."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node, for_typing in _import_statements(ast.parse(path.read_text())):
        if for_typing != typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        else:
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([node.module] if node.module else []))
            found |= {f'{base}.{alias.name}' for alias in node.names} | {base}
    return {m for m in found if m.split('.')[0] == 'solver'}


def graph(typing_only: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    # A module's own packages are loaded before it (`from . import x` does not import them again).
    return {name: {m for m in imports(path, typing_only)
                   if m in modules and m != name and not name.startswith(m + '.')}
            for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(edges.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_module_graph_is_read_from_the_sources():
    edges = graph()
    assert 'solver.checkpointing.manager' in edges['solver.base']
    assert 'solver.errors' in edges['solver.checkpointing.fs']


def test_imports_inside_functions_are_seen(tmp_path):
    source = tmp_path / 'solver' / 'mod.py'
    source.parent.mkdir()
    source.write_text('import typing as tp\n'
                      'def f():\n    from . import lazy\n'
                      'class C:\n    def m(self):\n        import solver.deep\n'
                      'if tp.TYPE_CHECKING:\n    from .hinted import T\n')
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / 'solver'
    try:
        assert imports(source) == {'solver', 'solver.lazy', 'solver.deep'}
        assert imports(source, typing_only=True) == {'solver.hinted', 'solver.hinted.T'}
    finally:
        PACKAGE = saved


def test_a_cycle_is_found_however_long():
    edges = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': {'e2'}, 'e2': set()}
    assert cycles(edges) == [['a', 'b', 'c']]


def test_no_import_cycle_in_the_package():
    assert cycles(graph()) == []


def test_the_checkpointing_package_knows_no_solver():
    """It imports nothing of solver. outside itself but the one base of user errors, not even for
    type hints: ranks, collectives and locks reach it as arguments."""
    allowed = {'solver.errors'}
    for typing_only in (False, True):
        for name, targets in graph(typing_only).items():
            if name.startswith('solver.checkpointing'):
                outside = {t for t in targets if not t.startswith('solver.checkpointing')} - allowed
                assert outside == set(), name


def test_the_framework_does_not_import_a_task():
    for name, targets in graph().items():
        if not name.startswith(('solver.drums', 'solver.regression')):
            assert not any(t.startswith(('solver.drums', 'solver.regression')) for t in targets), name
