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
    """module -> the project modules it imports (anywhere in its body); `from pkg import mod` counts as pkg.mod,
    and so does a module named in a string to `import_module` or in a dict (a table of lazy re-exports)."""
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
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module" or isinstance(node, ast.Dict):
                named = node.args if isinstance(node, ast.Call) else node.values
                targets = [a.value for a in named if isinstance(a, ast.Constant) and a.value in modules]
            for t in targets:
                while t and t not in modules:  # `import cbir.encoders.base` -> that module; a name -> its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def package_of(module: str) -> str:
    """The unit a package cycle is counted in: a subpackage as a whole (cbir.encoders, indexer), a module of the
    top-level cbir package on its own (cbir.index)."""
    modules = _modules()
    parts = module.split(".")
    is_package = modules[module].name == "__init__.py"
    package = parts if is_package else parts[:-1]
    return ".".join(package) if len(package) > 1 or package[0] != "cbir" else module


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, targets in import_graph().items():
        for b in targets:
            if package_of(a) != package_of(b):
                graph[package_of(a)].add(package_of(b))
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


# The layers, lowest first. A module may import its own layer and the layers below it, never one above: the storage
# layer knows nothing of encoders, the pipeline nothing of the Python API, the library nothing of the web app.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("cbir.errors", "cbir.version", "cbir.files", "cbir.layout", "cbir.cache", "cbir.preprocess",
              "cbir.metrics", "cbir.formats", "cbir.images", "cbir.metadata", "cbir.edits", "cbir.words",
              "cbir.local_features")),
    ("storage", ("cbir.search",)),  # the vectors file plus FAISS
    ("models", ("cbir.encoders",)),  # encoders and their runtime
    ("training", ("cbir.training",)),
    ("pipeline", ("indexer",)),
    ("api", ("cbir", "cbir.index", "cbir.copies", "cbir.review", "cbir.duplicates", "cbir.bench", "cbir.watch")),
    ("app", ("webui",)),
    ("command", ("cbir.cli", "cbir.__main__", "cbir.samples")),
]


def layer_of(module: str) -> int:
    """The layer whose most specific prefix matches `module` (cbir.search.store -> storage; cbir -> api)."""
    best, depth = -1, -1
    for n, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth and \
                    (module == prefix or prefix != "cbir"):
                best, depth = n, prefix.count(".")
    assert best >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return best


def test_the_checker_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    graph = import_graph()
    assert "cbir.index" in graph["indexer.run"] or "cbir.layout" in graph["indexer.run"]
    assert "cbir.encoders._factory" in graph["cbir.encoders"]  # a lazy re-export, named in a string
    assert package_of("cbir.encoders._registry") == "cbir.encoders" and package_of("cbir.index") == "cbir.index"
    assert layer_of("cbir.search.store") == 1 and layer_of("cbir") == 5 and layer_of("cbir.cli") == 7


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_cycles() -> None:
    """Two packages that import each other (cbir.encoders and cbir.training once did) are one package in two."""
    cycle = find_cycle(package_graph())
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "imports of a higher layer: " + ", ".join(upward)


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


def _own_callables() -> set[str]:
    """Names of the classes and functions the project defines (calls into other libraries are theirs to shape)."""
    names = set()
    for _, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def test_calls_name_their_many_arguments() -> None:
    """A call of our own with more than 6 positional arguments builds a record by position: name them."""
    own = _own_callables()
    many = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if callee in own and len(positional) > MAX_POSITIONAL:
                many.append(f"{name}:{node.lineno} {callee} ({len(positional)})")
    assert not many, "calls with more than 6 positional arguments: " + ", ".join(many)


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
