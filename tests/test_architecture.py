"""The package graph and the command layer, read from the code itself (docs/architecture.md):

- `lint-imports` keeps the contracts in pyproject.toml (tools > gpt > gpt2_kernels | tokenizers_bpe, no cycles);
- library modules (gpt2_kernels, tokenizers_bpe, gpt) hold no argparse, no sys.exit, no bare print, no import
  of the project inside a function, and none is over 500 lines;
- every console script is a `main` in a module of tools/.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import tomllib

import pytest

from tests.conftest import ROOT

LIBRARIES = ("gpt2_kernels", "tokenizers_bpe", "gpt")
PROJECT = (*LIBRARIES, "tools")
MAX_LINES = 500


def library_modules():
    return sorted(p for package in LIBRARIES for p in (ROOT / package).rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else ""


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_module_is_no_command(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    where = path.relative_to(ROOT)
    assert source.count("\n") <= MAX_LINES, f"{where} has more than {MAX_LINES} lines: split it along its ideas"
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_function = {id(node) for f in functions for node in ast.walk(f) if isinstance(node, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] == "argparse" for n in names), f"{where}:{node.lineno} imports argparse"
            project = getattr(node, "level", 0) > 0 or any(n.split(".")[0] in PROJECT for n in names)
            assert not (project and id(node) in in_function), f"{where}:{node.lineno}: a project import inside a function"
    for node, name in calls(tree):
        assert name not in ("print", "sys.exit", "exit", "quit"), f"{where}:{node.lineno} calls {name}(): libraries log or raise"


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(ROOT / ".venv" / "bin" / "lint-imports")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" not in done.stdout.lower().replace("0 broken", "")


def test_every_console_script_is_a_tools_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert len(scripts) == 13
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("tools.") and function == "main", f"{name} = {target}"
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), target
