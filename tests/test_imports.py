"""The package's import graph: chatforge modules import each other at the top only, and in no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cli_env

PACKAGE = ROOT / "chatforge"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts}


def chatforge_targets(node: ast.AST, here: str) -> list[str]:
    """The chatforge modules an import statement loads (`from pkg import module` names the module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "chatforge"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = here if MODULES[here].name == "__init__.py" else here.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}".rstrip(".")
    if base.split(".")[0] != "chatforge":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run on import: the module's own, and those in its top-level if / try blocks."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            out += module_level(
                node.body
                + node.orelse
                + getattr(node, "finalbody", [])
                + [s for h in getattr(node, "handlers", []) for s in h.body]
            )
    return out


def imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported chatforge module, line, at the module's top level)]."""
    found = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in module_level(tree.body)}
        found[name] = [
            (target, node.lineno, id(node) in top)
            for node in ast.walk(tree)
            for target in chatforge_targets(node, name)
        ]
    return found


def test_chatforge_modules_are_imported_at_the_top():
    lazy = sorted(
        {
            f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
            for m, rows in imports().items()
            for t, line, at_top in rows
            if not at_top
        }
    )
    assert not lazy, "import chatforge modules at the top of the module:\n" + "\n".join(lazy)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in rows if t in MODULES and t != m}) for m, rows in imports().items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cli_imports_no_optional_or_hub_library():
    """`chatforge --help` stays quick and a missing extra fails only its command; the hub library is first
    imported after `chatforge.cli.main` sets HF_HUB_OFFLINE (it reads the variable on import)."""
    code = "import sys, chatforge.cli; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True
        ).stdout.split()
    )
    heavy = {"transformers", "huggingface_hub", "peft", "gradio", "fastapi", "deepspeed", "bitsandbytes"}
    assert not heavy & loaded
