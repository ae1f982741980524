"""The code base stays easy to change: no import cycles, small functions, no copied blocks.

These read the source with `ast` (nothing is imported), so they also see imports made inside functions.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cbir", "indexer", "webui")
MAX_LINES = 50
MAX_POSITIONAL = 6
PARSER_SETUP = {"build_parser"}  # argparse set-up is a list of declarations, not logic


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, module: str, is_package: bool, level: int) -> str:
    if level == 0:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body); `from pkg import mod` counts as pkg.mod."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", name, is_package, node.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import cbir.encoders.base` -> that module; a name -> its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    graph = import_graph()
    assert "cbir.index" in graph["indexer.run"] or "cbir.layout" in graph["indexer.run"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _functions():
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{name}.{node.name}:{node.lineno}", node


def test_functions_are_short() -> None:
    long = [f"{where} ({node.end_lineno - node.lineno + 1} lines)" for where, node in _functions()
            if node.name not in PARSER_SETUP and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "functions over 50 lines: " + ", ".join(long)


def test_few_positional_parameters() -> None:
    many = []
    for where, node in _functions():
        args = [a.arg for a in (*node.args.posonlyargs, *node.args.args) if a.arg not in ("self", "cls")]
        if len(args) > MAX_POSITIONAL:
            many.append(f"{where} ({len(args)})")
    assert not many, "functions with more than 6 positional parameters: " + ", ".join(many)


def _normalised_lines(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"\s+", " ", line.split("#", 1)[0]).strip()
        if text and not text.startswith(("from ", "import ", '"""', "@")) and text not in (")", "]", "}", "):"):
            out.append((n, text))
    return out


def test_no_copied_blocks() -> None:
    """No run of 6 meaningful lines appears twice in the library (a copy to merge into one helper)."""
    window = 6
    seen: dict[tuple[str, ...], str] = {}
    copies = []
    for name, path in _modules().items():
        lines = _normalised_lines(path)
        for i in range(len(lines) - window + 1):
            block = tuple(t for _, t in lines[i:i + window])
            where = f"{name}:{lines[i][0]}"
            if block in seen and seen[block].split(":")[0] != name or block in seen and \
                    abs(int(seen[block].split(":")[1]) - lines[i][0]) >= window:
                copies.append(f"{seen[block]} = {where}")
            seen.setdefault(block, where)
    assert not copies, "copied blocks: " + ", ".join(copies[:10])
