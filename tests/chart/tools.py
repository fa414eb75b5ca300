"""Shared helpers of the chart checks: the external tools, rendering, and small parsers.

The tools live outside .venv (`make tools`): helm at .tools/bin/helm (a pinned binary
checked by sha256), checkov in .tools/venv, promtool from Debian's prometheus package.
A check whose tool is missing is skipped and says how to get it; `make test` installs
them first, so there they always run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fedrun"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TOOLS = REPO / ".tools"

# The release every check renders: a dedicated namespace, as docs/install.md advises.
RELEASE = "fedrun"
NAMESPACE = "fedrun-system"

# Kubernetes versions the rendered objects are validated against (strict schemas of
# kubernetes-validate 1.37): the oldest and the newest minor release that upstream still
# supports at the end of 2026 (1.35 and 1.37; each minor release gets about 14 months).
KUBE_VERSIONS = ("1.35.0", "1.37.0")

Manifest = dict[str, Any]


def _tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run `make tools`")
    return found


def helm() -> str:
    """Path of the helm binary (skips the test when there is none)."""
    return _tool("helm", TOOLS / "bin" / "helm")


def checkov() -> str:
    """Path of checkov (skips the test when there is none)."""
    return _tool("checkov", TOOLS / "venv" / "bin" / "checkov")


def promtool() -> str:
    """Path of promtool (skips the test when there is none)."""
    return _tool("promtool")


def tool_env() -> dict[str, str]:
    """Environment for the tools: .tools/bin first on PATH (checkov's helm runner looks
    helm up there, and scans nothing without it)."""
    env = dict(os.environ)
    env["PATH"] = f"{TOOLS / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(
    *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the assertion message carries its output."""
    done = subprocess.run(
        list(args), capture_output=True, text=True, env=tool_env(), cwd=cwd, check=False
    )
    if check:
        assert done.returncode == 0, (
            f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


def template_args(
    values: Path | None = None,
    *,
    sets: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    namespace: str = NAMESPACE,
) -> list[str]:
    """The `helm template` command line for one values file (None: the chart's defaults).

    `sets` are `--set-json` items (`key=JSON`): plain `--set` reads 0.5 as a string.
    """
    args = [helm(), "template", RELEASE, str(CHART), "--namespace", namespace]
    args += ["--kube-version", kube_version]
    if values is not None:
        args += ["--values", str(values)]
    for item in sets:
        args += ["--set-json", item]
    return args


@functools.cache
def _render(values: Path | None, sets: tuple[str, ...], kube_version: str, namespace: str) -> str:
    return run(
        *template_args(values, sets=sets, kube_version=kube_version, namespace=namespace)
    ).stdout


def render_text(
    values: Path | None = None,
    *,
    sets: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    namespace: str = NAMESPACE,
) -> str:
    """`helm template` output (cached per arguments: the chart does not change mid-run)."""
    return _render(values, sets, kube_version, namespace)


def render(
    values: Path | None = None,
    *,
    sets: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    namespace: str = NAMESPACE,
) -> list[Manifest]:
    """The rendered objects, without empty documents."""
    text = render_text(values, sets=sets, kube_version=kube_version, namespace=namespace)
    return [d for d in yaml.safe_load_all(text) if d]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """Objects of `kind` (and `name`, when given)."""
    return [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The single object of `kind` (and `name`)."""
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def values_id(path: Path | None) -> str:
    """Test id of a values file."""
    return "defaults" if path is None else path.name.removesuffix("-values.yaml")


# --------------------------------------------------------------------------- PromQL

# Words of PromQL that are not metric names: aggregations, keywords, set operators.
_PROMQL_WORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    Small on purpose: strings, label matchers, ranges, grouping labels, template
    variables and numbers are removed; what is left and is not a function call or a
    keyword is a metric name. Grafana's `label_values(metric, label)` counts its metric.
    """
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)[^)]*\)", r"\1", expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


# --------------------------------------------------------------------------- Pod Security


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that makes pods."""
    for m in manifests:
        name = f"{m['kind']}/{m['metadata']['name']}"
        if m["kind"] == "Pod":
            yield name, m["spec"]
        elif m["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"):
            yield name, m["spec"]["template"]["spec"]


# Volume types the "restricted" Pod Security Standard allows.
_RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """How a pod spec breaks the "restricted" Pod Security Standard (empty: it complies).

    The rules of kubernetes.io/docs/concepts/security/pod-security-standards, as the
    admission controller applies them to a pod spec (container settings override the pod's).
    """
    out: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is set")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} is of a type restricted forbids: {kinds}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    for container in containers:
        sc = container.get("securityContext") or {}
        name = container["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp!r}")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {capabilities['add']}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        # Not part of the standard, but fedrun's own rule for every pod it runs.
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
    return out
