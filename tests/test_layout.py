"""The package's architecture holds: no import cycles, `core/` stands alone, small modules, no private imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "kangaroo_hf"
# Old module paths kept for one release: each only re-exports its new home.
DEPRECATED_SHIMS = {
    "backbone", "bench_methods", "bench_report", "commands", "compat", "configuration", "data", "distillation",
    "features", "generation", "model_card", "modeling", "peft_support", "profiling", "remote_code", "tune", "version",
}  # fmt: skip
MAX_LINES = 640


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "pretrained":  # generated remote-code copies beside the shipped adapter
            continue
        parts = ["kangaroo_hf", *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported package module, imported names, line) for every import of `name`, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            found += [(sub, [], node.lineno) for sub in submodules] or [(target, names, node.lineno)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kangaroo_hf"):
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("kangaroo_hf")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _, _ in _imports(name, path, modules) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    monkeypatch.setitem(globals(), "_graph", lambda: graph)
    try:
        test_no_import_cycles()
    except AssertionError as error:
        assert "a -> b -> c -> a" in str(error)
    else:
        raise AssertionError("a three-module cycle went unnoticed")


def test_core_imports_nothing_outside_itself():
    modules = _modules()
    outside = [
        f"{name} imports {target} (line {line})"
        for name, path in modules.items()
        if name.startswith("kangaroo_hf.core")
        for target, _, line in _imports(name, path, modules)
        if not target.startswith("kangaroo_hf.core")
    ]
    assert not outside, outside


def test_no_module_is_too_long():
    long = {
        name: lines for name, path in _modules().items() if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [
        f"{name} imports {target}.{imported} (line {line})"
        for name, path in modules.items()
        for target, names, line in _imports(name, path, modules)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert not private, private


def test_old_module_paths_still_work_with_a_warning():
    import importlib
    import sys
    import warnings

    import kangaroo_hf

    for old in sorted(DEPRECATED_SHIMS):
        sys.modules.pop(f"kangaroo_hf.{old}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"kangaroo_hf.{old}")
        assert any("will be removed in the next release" in str(w.message) for w in caught), old
        assert module.__dict__.keys() - {"warn_moved"}, old
    from kangaroo_hf.generation import KangarooCandidateGenerator, KangarooStats

    assert KangarooCandidateGenerator is kangaroo_hf.KangarooCandidateGenerator
    assert KangarooStats is kangaroo_hf.KangarooStats
