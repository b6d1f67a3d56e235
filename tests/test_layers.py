"""The package's layers: imports point down only (import-linter's layers contract in pyproject.toml), commands
live in mmret/cli only, and the wheel's package list names every package.

    .venv/bin/pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmret"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the `mmret` package found under `root`, with the repository's contract."""
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def copy_of_package(tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(PACKAGE, root / "mmret", ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contract_names_every_top_level_package_and_module():
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip("() ") for layer in contract["layers"] for name in layer.split("|")}
    children = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    children |= {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert children <= named, f"layers contract misses {sorted(children - named)}"
    assert contract["exhaustive"] is True


def test_the_layers_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import"),
    [
        ("data/samples.py", "import mmret.training.dual_encoder"),  # data -> training
        ("errors.py", "import mmret.io"),  # the ground floor's bottom -> the rest of it
        ("evaluation/metrics.py", "from mmret.mining import offline"),  # evaluation -> mining
    ],
)
def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path, module, upward_import):
    root = copy_of_package(tmp_path)
    path = root / "mmret" / module
    path.write_text(path.read_text() + f"\n{upward_import}  # an upward import\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "1 broken" in result.stdout


def test_only_cli_modules_hold_argument_parsers():
    """A command's argparse lives in mmret/cli; a library module has no configure_parser/run pair."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        imports_argparse = any(
            isinstance(node, ast.Import) and any(alias.name == "argparse" for alias in node.names)
            for node in ast.walk(tree)
        )
        if "configure_parser" in names or imports_argparse:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"argparse outside mmret/cli: {offenders}"


def test_every_cli_command_module_exists_and_has_the_pair():
    from mmret.cli import COMMANDS

    for name, (module_name, _) in COMMANDS.items():
        assert module_name == f"mmret.cli.{name}"
        module = __import__(module_name, fromlist=["configure_parser", "run"])
        assert callable(module.configure_parser) and callable(module.run)


def test_the_wheel_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(path.parent.relative_to(REPO).parts) for path in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(packages - listed)}"
