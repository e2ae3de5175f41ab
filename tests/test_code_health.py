"""Structural limits of the library code (`sdarts/`, `retrain/`, `launcher/`), read with `ast`:
no import cycle between modules (function-local imports included), no module over 400 lines, no
function or method over 80 lines. The checker itself is tested on a small synthetic package."""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdarts", "retrain", "launcher")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level packages."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of `if TYPE_CHECKING:` (imports for annotations only: never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `module` imports anywhere in its body (module level and inside functions).
    `import a.b.c` imports a, a.b and a.b.c (each package's __init__ runs); `from p import name`
    imports p, and p.name too when that is a submodule. The packages above `module` are running
    already when it runs, so reaching them on the way to a submodule is no edge; naming one as the
    target (`from sdarts.data import make_loader` inside sdarts/data/) is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    parts = module.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    found: set[str] = set()

    def add(dotted: str, *, target: bool = True) -> None:
        bits = dotted.split(".")
        for i in range(1, len(bits) + 1):
            name = ".".join(bits[:i])
            last = i == len(bits)
            if name in known and (name not in ancestors or (last and target)):
                found.add(name)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            add(base, target=len(subs) < len(node.names))
            for sub in subs:
                add(sub)
    found.discard(module)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    known = set(files)
    return {mod: imports_of(mod, path, known) for mod, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, as closed paths a -> ... -> a: in each strongly connected component of more
    than one module (Tarjan's algorithm, iterative), a shortest cycle through each of its modules, each
    cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
    cycles: list[list[str]] = []
    for comp in sorted(components):
        for start in comp:
            cycle = _cycle_through(graph, set(comp), start)
            if not any(set(cycle) == set(c) and len(cycle) == len(c) for c in cycles):
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest closed path from `start` back to it inside its component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & comp):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return sorted(comp)


def long_modules(root: Path, limit: int = MAX_MODULE_LINES, packages=PACKAGES) -> list[str]:
    out = []
    for mod, path in module_files(root, packages).items():
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)} ({n} lines)")
    return out


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES, packages=PACKAGES) -> list[str]:
    """Functions and methods longer than `limit` lines, decorators and docstring included."""
    out = []
    for mod, path in module_files(root, packages).items():
        tree = ast.parse(path.read_text(), filename=str(path))
        qual: dict[ast.AST, str] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual[child] = f"{qual[node]}.{child.name}" if node in qual else child.name
        for node, name in qual.items():
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > limit:
                    out.append(f"{path.relative_to(root)}::{name} ({n} lines)")
    return sorted(out)


# ---- the checker, on a synthetic package -------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_a_planted_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "def f():\n    from pkg import c  # a lazy import of a submodule\n    return c\n",
        "pkg/c.py": "import os\nfrom . import a\n",
        "pkg/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.e"] == set()  # annotations only
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_checker_counts_package_init_and_accepts_acyclic(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.x import y\nVERSION = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "y = 1\n",
        "pkg/z.py": "import pkg.sub\nfrom pkg import sub\n",  # pkg runs already: no edge to it
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.x"}
    assert graph["pkg.z"] == {"pkg.sub"}
    assert find_cycles(graph) == []
    # a name from the package's __init__ is an edge to it: pkg -> pkg.sub.x -> pkg
    _write(tmp_path, {"pkg/sub/x.py": "def f():\n    from pkg import VERSION\n    return VERSION\ny = 1\n"})
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg", "pkg.sub.x", "pkg"]]


def test_checker_measures_modules_and_functions(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/m.py": f"class C:\n    @staticmethod\n    def long():\n{body}\n\n\ndef short():\n    pass\n",
    })
    assert long_functions(tmp_path, limit=6, packages=("pkg",)) == ["pkg/m.py::C.long (7 lines)"]
    assert long_functions(tmp_path, limit=7, packages=("pkg",)) == []
    assert long_modules(tmp_path, limit=10, packages=("pkg",)) == ["pkg/m.py (12 lines)"]


# ---- the library ---------------------------------------------------------------------------------------

def test_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_400_lines():
    offenders = long_modules(ROOT)
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_over_80_lines():
    offenders = long_functions(ROOT)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


if __name__ == "__main__":  # the report, without pytest
    for c in find_cycles(import_graph(ROOT)):
        print("cycle:", " -> ".join(c))
    for line in long_modules(ROOT) + long_functions(ROOT):
        print("long:", line)
