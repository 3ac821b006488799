"""Generate the remote-code files (`modeling/*.py`) from `kangaroo_hf/core/`, so that one source of truth exists.

`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` imports `modeling_kangaroo.py` from the repo
without `kangaroo_hf` installed. That file is the concatenation of the `core/` modules the model needs, in import
order; `configuration_kangaroo.py` is `version` + `compat` + `configuration`. Relative imports between concatenated
modules are removed, imports of the other generated file become `from .configuration_kangaroo import ...`
(transformers copies relatively imported files along), and a core module importing anything outside `core/` is an
error. Like transformers' `modular_*.py` files, the output carries a do-not-edit header, and a test fails when any
generated copy drifts (`modeling/`, the shipped adapter's folder, the `hub_cards/` mirror).

Regenerate:

    python -m kangaroo_hf.hub.remote_code           # write every generated file under the repository root
    python -m kangaroo_hf.hub.remote_code --check   # print a diff of each stale file and exit 1
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import logging
import re
import sys
from pathlib import Path

from ..core.version import __version__
from .settings_table import with_settings_table

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parents[1]
CORE_DIR = PACKAGE_DIR / "core"
# Generated file -> the package modules it starts from. Every module these import (at the top or inside a function)
# is concatenated too, each after the modules it imports at the top; the configuration file's modules are imported
# from it rather than copied.
REMOTE_CODE_ROOTS = {
    "configuration_kangaroo.py": ("version", "compat", "configuration"),
    "modeling_kangaroo.py": ("layers", "kernels", "adapter", "stats", "drafting", "modeling", "checkpoint"),
}
# Checkpoint folders shipped inside the package: each carries a copy of the remote code.
SHIPPED_CHECKPOINTS = "pretrained"
# Documents with a table of the settings, and whether it gives each setting's whole description.
SETTINGS_TABLES = {"README.md": False, "docs/usage.md": True}
REMOTE_CODE_DIR = "modeling"
CARDS_DIR = "hub_cards"
LINE_LENGTH = 119  # the project's ruff line length: generated files are formatted as the sources
_SHARED_NAMES = {"logger", "__all__"}  # defined identically by several modules


def _relative_imports(module: str, top_level_only: bool) -> list[str]:
    """Package modules imported by `module` (`from .x import y`), at the top of the file or anywhere."""
    tree = ast.parse((CORE_DIR / f"{module}.py").read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = [node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]
    return list(dict.fromkeys(found))


def module_order(roots: tuple[str, ...], provided: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`roots` and every package module they import, transitively, minus `provided`; imports first."""
    modules = list(roots)
    for module in modules:  # grows while iterating: a breadth-first closure
        for imported in _relative_imports(module, top_level_only=False):
            if imported not in modules and imported not in provided:
                modules.append(imported)
    order: list[str] = []
    while len(order) < len(modules):
        ready = [
            module
            for module in modules
            if module not in order
            and all(dep in order or dep in provided for dep in _relative_imports(module, top_level_only=True))
        ]
        if not ready:
            raise ValueError(f"Circular top-level imports among {sorted(set(modules) - set(order))}.")
        order.append(ready[0])
    return tuple(order)


def remote_code_sources() -> dict[str, tuple[str, ...]]:
    """Generated file name -> the package modules concatenated into it, in order."""
    config_name, model_name = REMOTE_CODE_ROOTS
    config_modules = module_order(REMOTE_CODE_ROOTS[config_name])
    return {config_name: config_modules, model_name: module_order(REMOTE_CODE_ROOTS[model_name], config_modules)}


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names - _SHARED_NAMES


def _lines(node: ast.AST) -> set[int]:
    return set(range(node.lineno, node.end_lineno + 1))


def _transform(module: str, text: str, here: tuple[str, ...], elsewhere: dict[str, str]):
    """Source of `module` without its docstring, `__future__`/package-relative imports and `__all__`.

    Returns the kept text, the names imported from the other generated file (by file stem) and the `__all__` names.
    """
    tree = ast.parse(text)
    drop: set[int] = set()
    hoisted: dict[str, set[str]] = {}
    exported: list[str] = []
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        drop |= _lines(body[0])  # the module docstring
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            drop |= _lines(node)
        elif isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1:
                raise ValueError(
                    f"core/{module}.py line {node.lineno} imports from outside core/, which is not part of the "
                    "remote code; register package-only behaviour in core.checkpoint.EXTENSIONS instead."
                )
            if node.module is None or any(alias.asname for alias in node.names):
                raise ValueError(f"{module}.py line {node.lineno}: only `from .module import name` is supported.")
            if node.module in elsewhere:
                hoisted.setdefault(elsewhere[node.module], set()).update(alias.name for alias in node.names)
            elif node.module not in here:
                raise ValueError(f"{module}.py line {node.lineno} imports .{node.module}, which is not concatenated.")
            drop |= _lines(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(name.split(".")[0] == "kangaroo_hf" for name in names):
                raise ValueError(f"{module}.py line {node.lineno}: remote code cannot import kangaroo_hf.")
    for node in body:
        # `if TYPE_CHECKING:` blocks left empty by the removed imports go as a whole.
        if isinstance(node, ast.If) and not node.orelse and all(_lines(stmt) <= drop for stmt in node.body):
            drop |= _lines(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported += ast.literal_eval(node.value)
            drop |= _lines(node)
    kept = [line for number, line in enumerate(text.splitlines(), start=1) if number not in drop]
    return "\n".join(kept).strip("\n"), hoisted, exported


def _header(name: str, modules: tuple[str, ...]) -> str:
    sources = ", ".join(f"kangaroo_hf/core/{module}.py" for module in modules)
    return (
        "# GENERATED FILE, DO NOT EDIT. `python -m kangaroo_hf.hub.remote_code` built it from the sources of\n"
        f"# kangaroo_hf {__version__}: {sources}. Edit those and regenerate.\n"
        "# ruff: noqa\n"
        f'"""Kangaroo self-speculative decoding (arXiv 2404.18911), `{name}` for loading with\n'
        '`trust_remote_code=True` where the `kangaroo_hf` package is not installed."""\n'
    )


def _format_all(names: list[str]) -> str:
    """`__all__ = [...]` as the project's formatter writes it: one line if it fits, else one name per line."""
    one_line = f"__all__ = {json.dumps(names)}"
    if len(one_line) <= LINE_LENGTH:
        return one_line
    return "__all__ = [\n" + "".join(f"    {json.dumps(name)},\n" for name in names) + "]"


def render_remote_code() -> dict[str, str]:
    """The remote-code files as they must be now: file name -> text."""
    sources = remote_code_sources()
    file_of = {module: Path(name).stem for name, modules in sources.items() for module in modules}
    defined: dict[str, str] = {}
    rendered = {}
    for name, modules in sources.items():
        elsewhere = {module: stem for module, stem in file_of.items() if stem != Path(name).stem}
        sections, hoisted, exported = [], {}, []
        for module in modules:
            text = (CORE_DIR / f"{module}.py").read_text(encoding="utf-8")
            for defined_name in _top_level_names(ast.parse(text)):
                if defined_name in defined:
                    raise ValueError(f"{defined_name!r} is defined in both {defined[defined_name]} and {module}.py.")
                defined[defined_name] = f"{module}.py"
            body, module_hoisted, module_exported = _transform(module, text, modules, elsewhere)
            for stem, names in module_hoisted.items():
                hoisted.setdefault(stem, set()).update(names)
            exported += module_exported
            rule = "# " + "-" * 78
            sections.append(f"{rule}\n# kangaroo_hf/core/{module}.py\n{rule}\n\n{body}\n")
        imports = "".join(
            f"from .{stem} import {', '.join(sorted(names))}\n" for stem, names in sorted(hoisted.items())
        )
        text = _header(name, modules) + "\nfrom __future__ import annotations\n"
        text += "\n" + imports if imports else ""
        text += "".join(f"\n\n{section}" for section in sections)
        text += f"\n\n{_format_all(sorted(set(exported)))}\n"
        text = re.sub(r"\n{4,}", "\n\n\n", text)
        compile(text, name, "exec")  # fail here, not at load time, on a broken transformation
        rendered[name] = text
    return rendered


def write_remote_code(folder: str | Path) -> None:
    """Write the remote-code files into a checkpoint folder (`core.checkpoint.EXTENSIONS.remote_code_writer`)."""
    for name, text in render_remote_code().items():
        (Path(folder) / name).write_text(text, encoding="utf-8")


def generated_files() -> dict[str, str]:
    """Every generated file of the repository, by path relative to its root: remote code and card mirrors."""
    remote_code = render_remote_code()
    files = {f"{REMOTE_CODE_DIR}/{name}": text for name, text in remote_code.items()}
    for folder in sorted((PACKAGE_DIR / SHIPPED_CHECKPOINTS).glob("*/")):
        relative = folder.relative_to(PACKAGE_DIR.parents[1]).as_posix()  # src/kangaroo_hf/pretrained/<name>
        files.update({f"{relative}/{name}": text for name, text in remote_code.items()})
    for document, full in SETTINGS_TABLES.items():  # in a source checkout: tables rendered from the config
        path = PACKAGE_DIR.parents[1] / document
        if path.is_file():
            files[document] = with_settings_table(path.read_text(encoding="utf-8"), full)
    for card in sorted((PACKAGE_DIR / CARDS_DIR).glob("*")):
        if card.is_file():
            files[f"{CARDS_DIR}/{card.name}"] = card.read_text(encoding="utf-8")
    return files


def stale_files(root: str | Path, expected: dict[str, str] | None = None) -> list[str]:
    """Generated files under `root` that are missing or differ from `expected` (default: what the package sources
    produce now, `generated_files()`)."""
    root = Path(root)
    expected = generated_files() if expected is None else expected
    return [
        path
        for path, text in expected.items()
        if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text
    ]


def write_generated_files(root: str | Path) -> list[str]:
    """Write the stale generated files under `root`; returns their paths."""
    root = Path(root)
    expected = generated_files()
    stale = stale_files(root, expected)
    for path in stale:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(expected[path], encoding="utf-8")
    return stale


def _default_root() -> Path:
    repo = PACKAGE_DIR.parents[1]  # src layout: <repo>/src/kangaroo_hf
    return repo if (repo / "pyproject.toml").is_file() else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kangaroo_hf.hub.remote_code", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: the source checkout)")
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    root = args.root or _default_root()
    if args.check:
        expected = generated_files()
        stale = stale_files(root, expected)
        for path in stale:
            current = (root / path).read_text(encoding="utf-8").splitlines(True) if (root / path).is_file() else []
            now = expected[path].splitlines(True)
            sys.stdout.writelines(difflib.unified_diff(current, now, path, f"{path} (generated now)"))
            print(f"stale: {path} (run `python -m kangaroo_hf.hub.remote_code`)")
        return 1 if stale else 0
    for path in write_generated_files(root):
        print(f"wrote {root / path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
