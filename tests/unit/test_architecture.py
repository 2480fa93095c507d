"""The shape of the code, held by tests (issue 22): imports run one way (no cycle between the
modules of engine/, model/ and common/, counting imports inside functions and under
TYPE_CHECKING), every import names something that exists, no engine source file passes 700
lines, launchers stay thin, and no module but the data kinds' and the stages' own declarations
branches on a data kind or a stage by name."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "model", "engine")
MAX_LINES = 700


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every import statement of a file, wherever it stands (module
    level, inside a function, under `if TYPE_CHECKING:`), kept to the project's own modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. `from package import module` is an edge to the
    module; importing a package's module also runs the package's __init__, an edge to it too."""
    modules = sources()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, module, names in imported(path, modules):
            targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules} or {module}
            for target in targets:
                parts = target.split(".")
                graph[name] |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
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


def test_no_import_cycle_function_level_imports_included():
    # A package's __init__ is imported before any of its modules: only docstrings live there, so
    # an edge into a package never drags its modules in (checked here too).
    graph = import_graph()
    for name, path in sources().items():
        if path.name == "__init__.py":
            assert not graph[name], f"{path} imports {sorted(graph[name])}: keep package __init__ files to a docstring"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_names_a_module_and_names_that_exist():
    """Lazy imports inside functions run only when called: a moved module would otherwise break
    at the first call, not at start-up."""
    missing = []
    for name, path in sources().items():
        for line, module, names in imported(path, sources()):
            try:
                target = importlib.import_module(module)
            except ImportError as e:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {module} ({e})")
                continue
            for n in names:
                if not hasattr(target, n) and f"{module}.{n}" not in sources():
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {module} has no {n}")
    assert not missing, "\n".join(missing)


def test_no_engine_source_file_is_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "engine").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_launchers_are_thin_and_name_one_stage():
    for path in sorted((ROOT / "launcher").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 15, path
        assert re.search(rf"^    run\({path.stem.upper()}\)$", text, re.M), path


# Where data kinds and stages are declared, and so may be named: the data package's kind modules
# and registry, and each stage's own objective module.
DECLARED_IN = {"engine/data", "engine/objectives"}


@pytest.mark.parametrize("pattern", [r"""kind\s*[!=]=\s*["'](pretrain|sft|pref|prompt)["']""",
                                     r"""stage(\.name)?\s*[!=]=\s*["'](pretrain|sft|dpo|distill|grpo|reward)["']""",
                                     r"""\.data_kind\b"""])
def test_nothing_outside_the_declarations_branches_on_a_kind_or_stage_by_name(pattern):
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "engine").rglob("*.py"))
                 if not any(str(p.relative_to(ROOT)).startswith(d) for d in DECLARED_IN)
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not offenders, offenders
