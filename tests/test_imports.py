"""The import graph of loraq has no circles: each module can be read knowing only the ones below it. Every
import counts, those inside functions too (a lazy import only hides a circle)."""

import ast
from pathlib import Path

import loraq

ROOT = Path(loraq.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The loraq modules `path` imports (a package import is its __init__; `from pkg import mod` is mod)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in known and m != name}


def test_no_module_imports_itself_through_others():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: imports(path, set(files)) for name, path in files.items()}
    circles = []

    def visit(node, stack, done):
        if node in stack:
            circles.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
