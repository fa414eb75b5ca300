"""Run pods with every pod setting pass the real API server's Pod Security admission.

The namespace enforces the "restricted" Pod Security Standard (label
pod-security.kubernetes.io/enforce=restricted); each rendered pod template of a run whose
server and hospitals set every pod setting (tests/unit/test_pod_settings.py) is sent as a
Pod with server-side dry run, and must be admitted. The same pod given a capability, or
a hostPath volume, is refused: the check is live, not vacuous. Also: the Deployment and
the Jobs themselves are admitted (strict field validation) in that namespace.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fedrun_core.api import parse_run
from fedrun_render.workloads import render_run
from tests.controlplane.cluster import ApiError, RealCluster
from tests.unit.test_pod_settings import run_obj

NS = "pss-restricted"
Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def api(real_cluster: RealCluster) -> RealCluster:
    real_cluster.ensure_namespace(
        NS,
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
    )
    try:  # the PriorityClass the settings name (the Priority admission plugin looks it up)
        real_cluster.create(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "research-high"},
                "value": 1000,
            }
        )
    except ApiError as err:
        if err.code != 409:
            raise
    return real_cluster


def _manifests() -> list[Manifest]:
    obj = run_obj()
    obj["metadata"]["namespace"] = NS
    obj["spec"]["hospitalDefaults"] = {"labels": {"site": "eu"}}
    return render_run(parse_run(obj))


def _service_accounts(api: RealCluster, manifests: list[Manifest]) -> None:
    """The pods' ServiceAccounts (without owner: the run does not exist here)."""
    names = ["default"] + [
        m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"
    ]
    for name in names:
        try:
            api.create(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": NS},
                }
            )
        except ApiError as err:
            if err.code != 409:
                raise


def _pods(manifests: list[Manifest]) -> list[Manifest]:
    """Each Deployment's and Job's pod template as a Pod."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": m["metadata"]["name"],
                "namespace": NS,
                **copy.deepcopy(m["spec"]["template"]["metadata"]),
            },
            "spec": copy.deepcopy(m["spec"]["template"]["spec"]),
        }
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
    ]


def _refusal(api: RealCluster, obj: Manifest) -> str:
    try:
        api.create(obj, strict=True, dry_run=True)
    except ApiError as err:
        return err.message
    return ""


def test_pods_with_every_setting_are_admitted_as_restricted(api: RealCluster) -> None:
    manifests = _manifests()
    _service_accounts(api, manifests)
    pods = _pods(manifests)
    assert len(pods) == 3
    for pod in pods:
        assert _refusal(api, pod) == "", pod["metadata"]["name"]
    for workload in (m for m in manifests if m["kind"] in ("Deployment", "Job")):
        workload = copy.deepcopy(workload)
        del workload["metadata"]["ownerReferences"]
        assert _refusal(api, workload) == "", workload["metadata"]["name"]


def test_the_namespace_really_enforces_restricted(api: RealCluster) -> None:
    manifests = _manifests()
    _service_accounts(api, manifests)
    pod = _pods(manifests)[1]
    capable = copy.deepcopy(pod)
    capable["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    refused = _refusal(api, capable)
    assert "PodSecurity" in refused and "SYS_ADMIN" in refused, refused
    host = copy.deepcopy(pod)
    host["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    refused = _refusal(api, host)
    assert "PodSecurity" in refused and "hostPath" in refused, refused
