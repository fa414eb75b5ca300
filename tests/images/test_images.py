"""The container images, checked without a Docker engine: the Dockerfiles as text, and the
operator's import path (the operator image has no torch, so nothing it imports may need it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedrun_core import names as c

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "Dockerfile.operator"
TRAINER = ROOT / "Dockerfile.trainer"
VENV_BIN = "/opt/fedrun/bin"
FLOWER_EXECUTABLES = {
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "flwr-serverapp",
    "flwr-clientapp",
}
# Distributions of the trainer extra (by import name) that the operator image does not have.
TRAINER_ONLY = [
    "torch",
    "flwr",
    "opacus",
    "numpy",
    "pandas",
    "pyarrow",
    "sklearn",
    "scipy",
    "boto3",
    "mlflow",
    "matplotlib",
    "rich",
    "sqlalchemy",
    "alembic",
]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse(path: Path) -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per stage (continuations joined)."""
    stages: list[list[Instruction]] = []
    preamble: list[Instruction] = []
    buffer = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if text.endswith("\\"):
            buffer += text[:-1].strip() + " "
            continue
        keyword, _, args = (buffer + text).partition(" ")
        buffer = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([instruction])
        elif stages:
            stages[-1].append(instruction)
        else:
            preamble.append(instruction)
    assert all(i.keyword == "ARG" for i in preamble), preamble
    return stages


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def build_args(path: Path) -> dict[str, str]:
    """Every ARG, in any stage or before the first, with its default ("" for none)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("ARG "):
            name, _, default = line.removeprefix("ARG ").partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def labels(stage: list[Instruction]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args_of(stage, "LABEL"):
        out.update(dict(re.findall(r'(\S+?)="([^"]*)"', arg)))
    return out


def pins() -> dict[str, str]:
    """`name==version` pins of pyproject's trainer extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out = {}
    for requirement in project["optional-dependencies"]["trainer"]:
        name, sep, version = requirement.partition("==")
        if sep:
            out[name.strip()] = version.strip()
    return out


# --------------------------------------------------------------------------- both images


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_multi_stage_with_the_venv_copied_from_the_build(path: Path) -> None:
    stages = parse(path)
    assert len(stages) >= 2
    assert stages[0][0].args.endswith(" AS build")
    final = stages[-1]
    assert f"--from=build {VENV_BIN.removesuffix('/bin')} {VENV_BIN.removesuffix('/bin')}" in (
        args_of(final, "COPY")
    )
    # The final stage copies nothing but the built venv: no sources, no credentials.
    assert all(a.startswith("--from=build ") for a in args_of(final, "COPY"))
    assert "python:3.11" in build_args(path)["PYTHON_IMAGE"]


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_runs_as_the_numeric_non_root_user_the_pods_expect(path: Path) -> None:
    final = parse(path)[-1]
    [user] = args_of(final, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} must be numeric (runAsNonRoot)"
    uid, _, gid = user.partition(":")
    assert int(uid) == c.RUN_AS_USER != 0
    assert int(gid or uid) != 0
    # Nothing runs after USER that could need root, and USER is not switched back.
    after = final[[i.keyword for i in final].index("USER") :]
    assert not [i for i in after if i.keyword == "RUN"]


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_tini_is_the_entrypoint_and_commands_are_args(path: Path) -> None:
    final = parse(path)[-1]
    [entrypoint] = args_of(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--"]
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in args_of(final, "RUN")), (
        "tini comes from Debian's tini package"
    )
    [cmd] = args_of(final, "CMD")
    assert json.loads(cmd)[0] == "fedrun"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_fedrun_and_its_tools_are_on_path(path: Path) -> None:
    final = parse(path)[-1]
    env = " ".join(args_of(final, "ENV"))
    assert f"PATH={VENV_BIN}:$PATH" in env
    # Every install goes into the venv, so its console scripts land in VENV_BIN.
    pips = [p for run in args_of(parse(path)[0], "RUN") for p in re.findall(r"\S*pip install", run)]
    assert pips
    assert set(pips) == {f"{VENV_BIN}/pip install"}


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_oci_labels(path: Path) -> None:
    found = labels(parse(path)[-1])
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in found, key
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_no_secrets_and_no_hard_coded_hosts(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    names = list(build_args(path))
    for env in (i.args for stage in parse(path) for i in stage if i.keyword == "ENV"):
        names += re.findall(r"(\w+)=", env)
    assert "PATH" in names
    assert not [n for n in names if re.search(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY\b", n)]
    # Index and registry addresses come in as build arguments, never written here.
    assert not re.search(r"[a-z]+://", text)


# --------------------------------------------------------------------------- operator image


def test_operator_image_installs_only_the_operator_extra() -> None:
    stages = parse(OPERATOR)
    runs = [run for stage in stages for run in args_of(stage, "RUN")]
    installs = [run for run in runs if "pip install" in run]
    assert installs == [f'{VENV_BIN}/pip install ".[operator]"']
    text = OPERATOR.read_text(encoding="utf-8")
    assert "[trainer]" not in text
    assert not re.search(r"torch\s*=|flwr\s*=|opacus", text)


# --------------------------------------------------------------------------- trainer image


def test_trainer_image_pins_torch_and_flower_as_pyproject_does() -> None:
    args = build_args(TRAINER)
    pinned = pins()
    assert args["TORCH_VERSION"] == pinned["torch"] == "2.13.0"
    assert args["FLWR_VERSION"] == pinned["flwr"] == "1.41.0"
    runs = [run for run in args_of(parse(TRAINER)[0], "RUN") if "pip install" in run]
    torch_first = runs[0]
    assert '"torch==${TORCH_VERSION}"' in torch_first
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_first
    assert ".[trainer]" not in torch_first
    [project] = [run for run in runs if ".[trainer]" in run]
    assert runs.index(project) > runs.index(torch_first), "torch must be installed first"
    assert '"torch==${TORCH_VERSION}"' in project
    assert '"flwr==${FLWR_VERSION}"' in project


def test_trainer_torch_index_is_a_build_argument_without_default() -> None:
    assert build_args(TRAINER)["TORCH_INDEX_URL"] == ""


def test_trainer_image_checks_flowers_executables() -> None:
    final = parse(TRAINER)[-1]
    [check] = [run for run in args_of(final, "RUN") if "command -v" in run]
    listed = set(re.search(r"for exe in ([^;]+);", check).group(1).split())  # type: ignore[union-attr]
    assert listed >= FLOWER_EXECUTABLES | {"fedrun"}


# --------------------------------------------------------------------------- build context


def test_dockerignore_admits_only_what_the_dockerfiles_copy() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for path in (OPERATOR, TRAINER):
        for arg in args_of(parse(path)[0], "COPY"):
            copied.update(arg.split()[:-1])
    assert admitted == copied == {"pyproject.toml", "README.md", "core", "operator", "trainer"}


# --------------------------------------------------------------------------- operator imports


def test_operator_import_path_needs_no_trainer_dependency() -> None:
    """Import what `fedrun operator` imports with the trainer's libraries made unimportable.

    That is the operator image (which has only `fedrun[operator]`), short of building it.
    """
    modules = ["fedrun_cli.main", "fedrun_render.workloads", "fedrun_core.api"]
    modules += ["fedrun_render.crd", "fedrun_operator.metrics"]
    if (ROOT / "operator" / "fedrun_operator" / "main.py").exists():
        modules.append("fedrun_operator.main")
    code = f"""
import importlib, importlib.abc, sys

BLOCKED = {TRAINER_ONLY!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the operator image")
        return None

sys.meta_path.insert(0, Block())
for module in {modules!r}:
    importlib.import_module(module)
from fedrun_cli.main import build_parser
build_parser()
print(sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_operator_import_path_does_not_import_torch() -> None:
    """The same imports in the full dev environment: torch is installed, yet never loaded."""
    target = "fedrun_operator.main"
    if not (ROOT / "operator" / "fedrun_operator" / "main.py").exists():
        target = "fedrun_cli.main"
    code = (
        f"import sys, {target}, fedrun_render.workloads, fedrun_core.api; "
        "print('torch' in sys.modules, 'flwr' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"
