"""The installed layout and the import contracts of pyproject.toml's [tool.importlinter].

import-linter (grimp) reads a package from one folder, but vfm's parts live in the repository's
top-level folders and install as ``vfm.models``, ``vfm.service`` and ``vfm.finetune``; so the check
runs on a copy laid out as installed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"models": "models", "service": "service", "finetune": "finetune"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def installed_view(dest: Path) -> Path:
    """``dest/vfm`` laid out as the wheel installs it: vfm/*.py plus vfm/models, vfm/service, vfm/finetune."""
    pkg = dest / "vfm"
    shutil.copytree(ROOT / "vfm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in PARTS.items():
        shutil.copytree(ROOT / folder, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def lint_imports(view: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=view,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(view)}, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold(tmp_path: Path) -> None:
    result = lint_imports(installed_view(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("offender, line, contract", [
    ("models/registry.py", "import vfm.service.config", "models knows nothing of the service"),
    ("service/errors.py", "import vfm.finetune.evaluate", "service and finetune don't import each other"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path: Path, offender: str, line: str, contract: str) -> None:
    view = installed_view(tmp_path)
    target = view / "vfm" / offender
    target.write_text(target.read_text() + f"\n{line}  # a deliberate wrong import\n")
    result = lint_imports(view)
    assert result.returncode != 0
    assert contract in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_every_package_folder_is_installed() -> None:
    """pyproject's explicit package list names every folder with an __init__.py, by its installed name."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {installed: ROOT / folder for installed, folder in config["package-dir"].items()}
    found = {"vfm"}
    for installed, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((installed, *rel)))
    assert found == listed


def test_nothing_generic_is_importable_outside_the_repository(tmp_path: Path) -> None:
    probe = ("import importlib.util as u, vfm.models, vfm.service, vfm.finetune\n"
             "print([n for n in ('models', 'service', 'finetune') if u.find_spec(n) is not None])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tests_and_tools_read_nothing_outside_the_repository() -> None:
    """A clone with nothing beside it must pass: no path into the design folder beside the repository,
    and no path built from the repository's parent."""
    sibling = "shared"
    needles = (f"../{sibling}", f'"{sibling}"', "ROOT" + ".parent")
    offenders = []
    for path in [ROOT / "Makefile", *ROOT.glob(".ci/*"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]:
        if path == Path(__file__):
            continue  # it names the needles
        text = path.read_text()
        if any(needle in text for needle in needles):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_test_modules_have_unique_basenames() -> None:
    """pytest's default (rootdir) import mode imports test files by basename: two of one name break collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
