"""The import contracts in pyproject.toml hold, and a wrong-way import breaks them.

The contracts are what `make lint` runs (`lint-imports`). These tests copy the packages
into a scratch tree, add one import that points the wrong way, and check that the
contract guarding that direction fails and names the import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
SOURCES = {"core": "core", "operator": "operator", "trainer": "trainer"}


def _lint(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(str(tree / folder) for folder in SOURCES.values()),
        "HOME": str(tree),
    }
    return subprocess.run(
        [
            str(LINT_IMPORTS),
            "--no-cache",
            *(arg for cid in contracts for arg in ("--contract", cid)),
            str(tree / "pyproject.toml"),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and pyproject.toml, importable from `tmp_path` only."""
    for folder in SOURCES.values():
        shutil.copytree(
            ROOT / folder,
            tmp_path / folder,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # the pods' code reaching into the operator (what the old tree did)
        (
            "trainer/fedrun_trainer/common/settings.py",
            "import fedrun_operator.status  # noqa",
            "pods",
        ),
        # the core importing rendering
        (
            "core/fedrun_core/api.py",
            "import fedrun_render.workloads  # noqa",
            "layers",
        ),
        # rendering importing the operator (the old render ↔ status circle)
        (
            "operator/fedrun_render/security.py",
            "import fedrun_operator.status  # noqa",
            "layers",
        ),
        # the server's code importing the hospital's
        (
            "trainer/fedrun_trainer/server/federation.py",
            "import fedrun_trainer.hospital.train  # noqa",
            "pod-roles",
        ),
        # the operator image has no torch
        (
            "operator/fedrun_operator/status.py",
            "import torch  # noqa",
            "no-torch",
        ),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    _add_import(tree / module, line)
    whole = _lint(tree)
    assert whole.returncode != 0, whole.stdout
    guard = _lint(tree, contract)
    assert guard.returncode != 0
    assert "0 kept, 1 broken" in guard.stdout
    importer = module.split("/", 1)[1].removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {line.split()[1]}" in guard.stdout
