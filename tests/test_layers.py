"""The import layering of the project: every module imports only from its own layer or lower
ones (lazy imports inside functions included), and no modules import each other in a cycle.

    utils <- dataset, tokenizer <- entropy_model <- autoregressive.models
          <- autoregressive.train, autoregressive.sample <- evaluations, benchmarks, entropy_tools
          <- demo, the command-line scripts at the root and in scripts/
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("utils",),
    ("dataset", "tokenizer"),
    ("entropy_model",),
    ("autoregressive.models",),
    ("autoregressive", "autoregressive.train", "autoregressive.sample"),
    ("evaluations", "benchmarks", "entropy_tools"),
    ("demo", "scripts", "extract_codes", "train_c2i", "sample_c2i", "export_release"),
]
PACKAGES = ("utils", "dataset", "tokenizer", "entropy_model", "autoregressive", "evaluations", "benchmarks",
            "entropy_tools", "demo", "scripts")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict:
    """{dotted name: path} of every project module (tests excluded)."""
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + sorted(ROOT.glob("*.py"))
    return {module_name(p): p for p in paths if p.name != "conftest.py"}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names a group holding `module`."""
    best, best_len = None, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} belongs to no layer; add it to LAYERS")
    return best


def imported_modules(path: Path, modules: dict) -> set:
    """Project modules that the file imports anywhere (top level, functions, conditionals)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a package path: the deepest module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict:
    modules = project_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # module -> 1 while on the DFS stack, 2 when done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_checker_sees_lazy_imports_cycles_and_upward_imports(tmp_path):
    """Preconditions: the helpers find an import inside a function, a cycle and a layer breach."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from autoregressive.models import build_model\n    return build_model\n")
    assert imported_modules(lazy, {"autoregressive.models": None}) == {"autoregressive.models"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer_of("utils.checkpoint") < layer_of("autoregressive.models.gpt") < layer_of("autoregressive.train.loop")
    assert layer_of("entropy_model.patching") < layer_of("entropy_tools.score") == layer_of("benchmarks.benchmark")


def test_imports_point_down_only():
    graph = import_graph()
    assert len(graph) > 60 and "utils.checkpoint" in graph and "autoregressive.train.loop" in graph
    upward = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
