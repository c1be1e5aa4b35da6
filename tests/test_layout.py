"""The layout rules: no first-party import cycle, and no module imports a top-level script (each script is a thin
entry point over the packages, so that code can be imported without running or re-parsing a CLI)."""
import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.conftest import ROOT

SCRIPTS = ('train', 'train_tokenizer', 'sampling', 'gen_img', 'evaluator', 'demo')
SKIP = ('.venv', '.git', 'local_output', 'ckpts')


def first_party_modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of the repository."""
    modules = {}
    for path in sorted(ROOT.rglob('*.py')):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.parts[0].startswith('.'):
            continue
        parts = rel.with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        modules[name] = path
    return modules


def imported_modules(path: Path, name: str, modules: Dict[str, Path]) -> Set[str]:
    """The first-party modules `path` imports anywhere (functions included), resolved to the most specific module:
    `from pkg import mod` names pkg.mod when that is a module, else pkg."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1] if package else []
                base = '.'.join(anchor + ([base] if base else []))
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition('.')[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = first_party_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (iterative depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_find_cycle_detects_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_imports_resolve_to_modules():
    graph = import_graph()
    assert {'training.seeds', 'utils.cli'} <= graph['training.data']   # sanity: the walk sees real imports
    assert 'training.data' in graph['training.loop']


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


def test_no_module_imports_a_script():
    offenders = sorted(f'{name} imports {target}' for name, targets in import_graph().items()
                       for target in targets if target in SCRIPTS)
    assert not offenders, offenders
