"""The import graph: one way, from leaves up to the CLI, with no cycle and no hidden imports in functions."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# leaves: they import no tinyswin module (layers: the model's layers, beneath it)
LEAVES = {"tinyswin.errors", "tinyswin.layers", "tinyswin.paths", "tinyswin.seeding", "tinyswin.version"}
# the only imports allowed inside function bodies: optional dependencies and the CLI's per-command imports
LAZY_ALLOWED = {("tinyswin.rundir", "torch.utils.tensorboard")}
LAZY_MODULES = {"tinyswin.cli"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted((SRC / "tinyswin").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imported(node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The tinyswin modules an import statement loads (a submodule named in `from X import Y` counts)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = node.module or ""
    names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return names or ([base] if base in known else [])


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Module-level tinyswin imports per module, and (module, imported) for imports inside functions."""
    modules = _modules()
    known = set(modules)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    lazy = []
    for name, tree in modules.items():
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name] |= set(_imported(node, known))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.Import):
                        lazy += [(name, a.name) for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        lazy.append((name, node.module or ""))
    return edges, lazy


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """A cycle of the graph as a list of modules, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_import_graph_has_no_cycle() -> None:
    edges, _ = _graph()
    assert len(edges) > 20 and sum(map(len, edges.values())) > 40  # the graph was read
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check sees cycles
    assert _cycle(edges) == []


def test_imports_run_one_way() -> None:
    edges, _ = _graph()
    for leaf in LEAVES:
        assert edges[leaf] == set(), leaf
    assert edges["tinyswin.model"] <= LEAVES
    above_data = {"tinyswin.model", "tinyswin.train", "tinyswin.config", "tinyswin.interop", "tinyswin"}
    for name, imported in edges.items():
        if name.startswith("tinyswin.data"):
            assert not imported & above_data, (name, imported & above_data)
    above_train = {"tinyswin.cli", "tinyswin.tune"}  # a study runs trainings
    assert "tinyswin.train" not in set().union(*(edges[m] for m in edges if m not in above_train))


def test_no_imports_inside_functions_but_optional_ones_and_the_cli() -> None:
    _, lazy = _graph()
    assert ("tinyswin.cli", "tinyswin.train") in lazy  # the walk finds function-body imports
    hidden = [(m, i) for m, i in lazy if m not in LAZY_MODULES and (m, i) not in LAZY_ALLOWED]
    assert hidden == []


def test_the_data_layer_loads_without_the_model_or_the_training() -> None:
    code = (
        "import sys, tinyswin.data, tinyswin.data.sources\n"
        "print(sorted(m for m in sys.modules if m.startswith('tinyswin')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert "tinyswin.data.augment" in loaded and "tinyswin.data.cache" in loaded
    for name in ("tinyswin.model", "tinyswin.train", "tinyswin.config", "tinyswin.interop"):
        assert name not in loaded, name


def test_the_command_line_parser_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "from tinyswin.cli import build_parser\n"
        "build_parser().parse_args(['prepare', 'x', '--out', 'y'])\n"
        "print(sorted(m for m in ('torch', 'tinyswin.model', 'tinyswin.config') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == []
