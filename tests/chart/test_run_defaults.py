"""The chart's runDefaults reach the operator as FEDRUN_OPERATOR_POD_DEFAULTS, which the
operator reads with fedrun's own models (tests/unit/test_pod_settings.py has them merged
into run pods)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from fedrun_core.api import parse_pod_defaults
from fedrun_operator.config import POD_DEFAULTS_ENV

from .tools import render, template_args


def _operator_env(sets: tuple[str, ...] = ()) -> dict[str, Any]:
    (deployment,) = [m for m in render(sets=sets) if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container.get("env", [])}


def test_no_run_defaults_no_variable() -> None:
    assert POD_DEFAULTS_ENV not in _operator_env()


def test_run_defaults_reach_the_operator_as_json() -> None:
    env = _operator_env(
        (
            'runDefaults.server.priorityClassName="high"',
            'runDefaults.hospital.imagePullSecrets=[{"name": "regcred"}]',
            'runDefaults.hospital.resources.requests.memory="2Gi"',
        )
    )
    defaults = parse_pod_defaults(env[POD_DEFAULTS_ENV]["value"], POD_DEFAULTS_ENV)
    assert defaults.server is not None and defaults.server.priority_class_name == "high"
    hospital = defaults.hospital
    assert hospital is not None and hospital.image_pull_secrets is not None
    assert hospital.image_pull_secrets[0].name == "regcred"
    assert hospital.resources is not None and hospital.resources.requests == {"memory": "2Gi"}


@pytest.mark.parametrize(
    "setting",
    ["runDefaults.server.securityContext.privileged=true", "runDefaults.hospital.hostNetwork=true"],
)
def test_the_chart_refuses_security_settings_in_run_defaults(setting: str) -> None:
    done = subprocess.run(
        template_args(None, sets=(setting,)), capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "additional properties" in done.stderr.lower() or "not allowed" in done.stderr.lower()
