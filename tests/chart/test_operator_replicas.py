"""The chart's operator replicas: leader election's Lease, its RBAC and timings, the
RollingUpdate, the PodDisruptionBudget, the anti-affinity, and labels that stay put under
`nameOverride` and `fullnameOverride` (the run servers' NetworkPolicies keep admitting the
operator, the Deployment's own selectors keep matching its pods).

How failover behaves at run time is shown with real processes in tests/integration
(test_operator.py on the real control plane, test_operator_emulated.py for a partition).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedrun_core.api import load_run
from fedrun_operator.config import LEASE_NAME_ENV, POD_NAME_ENV, OperatorConfig
from fedrun_operator.leader import Timings
from fedrun_render import security
from fedrun_render.workloads import render_run

from .tools import REPO, Manifest, find, one, render, run, template_args

OPERATOR = "fedrun-operator"
EXAMPLE = sorted((REPO / "examples").glob("federatedrun*.yaml"))[0]
# Both overrides at once, and each alone: what a platform team renames.
OVERRIDES = {
    "nameOverride": ('nameOverride="trials"',),
    "fullnameOverride": ('fullnameOverride="fl"',),
    "both": ('nameOverride="trials"', 'fullnameOverride="fl-platform"'),
}


def deployment(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment")


def pod_labels(manifests: list[Manifest]) -> dict[str, str]:
    labels: dict[str, str] = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    return labels


def container_env(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    (container,) = deployment(manifests)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_the_leader_lease_is_the_operator_s_own_and_its_role_grants_only_it() -> None:
    manifests = render(namespace="platform-ops")
    env = container_env(manifests)
    lease = env[LEASE_NAME_ENV]["value"]
    assert lease == OPERATOR
    assert env[POD_NAME_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The Lease lives in the operator's own namespace (FEDRUN_OPERATOR_NAMESPACE).
    role = one(manifests, "Role", f"{OPERATOR}-leader")
    assert role["metadata"]["namespace"] == "platform-ops"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(manifests, "RoleBinding", f"{OPERATOR}-leader")
    assert binding["metadata"]["namespace"] == "platform-ops"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR, "namespace": "platform-ops"}
    ]


def test_without_rbac_create_no_leader_role_is_rendered() -> None:
    manifests = render(sets=("rbac.create=false",))
    assert find(manifests, "Role") == [] and find(manifests, "RoleBinding") == []
    assert LEASE_NAME_ENV in container_env(manifests)  # the user grants the Lease rules


@pytest.mark.parametrize(
    "sets",
    [(), ("leaderElection.leaseSeconds=30", "leaderElection.renewDeadlineSeconds=20.5")],
    ids=["defaults", "custom"],
)
def test_the_operator_reads_the_chart_s_lease_timings(
    sets: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(render(sets=sets))
    for name, item in env.items():
        if "value" in item:
            monkeypatch.setenv(name, item["value"])
    cfg = OperatorConfig.from_env()
    timings = Timings(cfg.lease_seconds, cfg.renew_deadline_seconds, cfg.retry_seconds)
    expected = (30.0, 20.5, 2.0) if sets else (15.0, 10.0, 2.0)
    assert (timings.lease_seconds, timings.renew_deadline_seconds, timings.retry_seconds) == (
        expected
    )
    assert cfg.lease_name == OPERATOR


@pytest.mark.parametrize(
    "sets",
    [
        ("leaderElection.retrySeconds=10",),
        ("leaderElection.renewDeadlineSeconds=15",),
    ],
    ids=["retry-not-below-deadline", "deadline-not-below-lease"],
)
def test_lease_timings_out_of_order_are_refused(sets: tuple[str, ...]) -> None:
    done = run(*template_args(sets=sets), check=False)
    assert done.returncode != 0
    assert "retrySeconds < renewDeadlineSeconds < leaseSeconds" in done.stderr


def test_zero_replicas_are_refused() -> None:
    done = run(*template_args(sets=("replicaCount=0",)), check=False)
    assert done.returncode != 0 and "replicaCount" in done.stderr


@pytest.mark.parametrize(
    ("sets", "budget"),
    [
        ((), {"minAvailable": 1}),
        (("replicaCount=3",), {"minAvailable": 1}),
        # One replica: a drain may evict it (minAvailable 1 would block the node's drain).
        (("replicaCount=1",), {"maxUnavailable": 1}),
    ],
    ids=["defaults", "three", "one"],
)
def test_the_disruption_budget_keeps_a_replica(
    sets: tuple[str, ...], budget: dict[str, int]
) -> None:
    manifests = render(sets=sets)
    pdb = one(manifests, "PodDisruptionBudget")["spec"]
    assert {k: v for k, v in pdb.items() if k != "selector"} == budget
    assert pdb["selector"] == deployment(manifests)["spec"]["selector"]


def test_the_disruption_budget_can_be_left_out() -> None:
    assert find(render(sets=("podDisruptionBudget.enabled=false",)), "PodDisruptionBudget") == []


def test_replicas_prefer_different_nodes_unless_affinity_is_given() -> None:
    manifests = render()
    affinity = deployment(manifests)["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector == deployment(manifests)["spec"]["selector"]["matchLabels"]
    zone = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    given = render(sets=(f"affinity={json.dumps(zone)}",))
    assert deployment(given)["spec"]["template"]["spec"]["affinity"] == zone


@pytest.mark.parametrize("sets", list(OVERRIDES.values()), ids=list(OVERRIDES))
def test_overrides_rename_objects_but_every_selector_still_finds_the_operator(
    sets: tuple[str, ...],
) -> None:
    manifests = render(sets=sets, namespace="platform-ops")
    names = {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"}
    assert names != {OPERATOR}  # the override did rename the operator's objects
    labels = pod_labels(manifests)
    dep = deployment(manifests)
    # The run servers' NetworkPolicy, rendered for this operator's namespace, admits this pod
    # from this namespace: its labels are the fixed ones, whatever the names.
    policies = render_run(load_run(EXAMPLE), operator_namespace=dep["metadata"]["namespace"])
    server = next(
        p
        for p in policies
        if p["kind"] == "NetworkPolicy" and p["metadata"]["name"].endswith("-server")
    )
    status_rule = next(
        r for r in server["spec"]["ingress"] if {"port": 9100, "protocol": "TCP"} in r["ports"]
    )
    (peer,) = status_rule["from"]
    assert peer["podSelector"]["matchLabels"] == security.OPERATOR_POD_LABELS
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "platform-ops"}
    }
    # The Deployment's, the PodDisruptionBudget's and the anti-affinity's selectors too.
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # The Lease the replicas compete for is the one their Role lets them renew.
    lease = container_env(manifests)[LEASE_NAME_ENV]["value"]
    (role,) = find(manifests, "Role")
    assert role["rules"][1]["resourceNames"] == [lease]
    assert lease == dep["metadata"]["name"]
    # The operator's own NetworkPolicy still selects its pods.
    own = one(manifests, "NetworkPolicy")
    assert own["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
