"""Least privilege, proven on a real API server: the chart grants exactly the API calls the
operator makes.

The session's control plane audits every request of a ServiceAccount (tests/controlplane/
plane.py). This test runs after tests/e2e and tests/integration (pytest collects
directories in name order) and reads from that log every call the chart's operator
ServiceAccount made: the chart's operator Pod (tests/e2e) and the operators the
integration tests run in this process, each logged in with a token of that account and
following one namespace bound by the chart's RoleBinding. All of them run in the chart's
default, namespaced mode, so their grants are what `helm template` renders for it: the
run rules (ClusterRole `fedrun-operator`) in each watched namespace through a RoleBinding,
and kopf's scan rules (`fedrun-operator-scan`) cluster-wide through a ClusterRoleBinding.

A call no rule grants fails, a call the real authorizer refused (403) fails, and so does a
granted verb that no scenario ever used.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.chart.tools import find, render
from tests.conftest import STARTED_PLANES, WATCHED_NS
from tests.controlplane.audit import OPERATOR_CLIENTS, OPERATOR_USER, Call, calls
from tests.integration.helpers import NAMESPACE_PREFIX

# The operator's own clients, by User-Agent: kopf's and fedrun_operator.kube's. A test that
# borrows the account's token (tests/e2e checks what it may not read) sends `fedrun-tests`.
# The chart as the session installs it (tests/conftest.py): namespaced, one watched namespace.
SETS = (f"watchNamespaces={json.dumps([WATCHED_NS])}",)
# tests/e2e/test_real_cluster.py takes the configmaps rule out of the ClusterRole for a
# while, to see the refusal reported on the run: the only refusals the log may hold.
DELIBERATE_REFUSALS = {(WATCHED_NS, "", "configmaps")}

NAMESPACE, CLUSTER = "namespace", "cluster"
Grant = tuple[str, str, str, str]  # scope (NAMESPACE or CLUSTER), apiGroup, resource, verb


def granted(manifests: list[dict[str, Any]]) -> set[Grant]:
    """Every (scope, apiGroup, resource, verb) the rendered bindings give: a ClusterRole's
    rules bound by a RoleBinding hold in that namespace, by a ClusterRoleBinding everywhere;
    a Role's (the replicas' leader Lease) in its namespace. A rule's resourceNames narrow
    it further; the proof compares verbs on resources, so a grant limited to names counts
    as used when the operator made that call."""
    roles = {
        (r["kind"], r["metadata"]["name"]): r
        for r in find(manifests, "ClusterRole") + find(manifests, "Role")
    }
    out: set[Grant] = set()
    for kind, scope in (("RoleBinding", NAMESPACE), ("ClusterRoleBinding", CLUSTER)):
        for binding in find(manifests, kind):
            ref = binding["roleRef"]
            for rule in roles[ref["kind"], ref["name"]]["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            out.add((scope, group, resource, verb))
    return out


def chart_grants() -> set[Grant]:
    return granted(render(sets=SETS))


def as_grant(call: Call) -> Grant:
    """What a call needs: a namespaced grant for a call in a namespace (a cluster-wide one
    does too), a cluster-wide one for a cluster-scoped call or a list across namespaces."""
    scope = NAMESPACE if call.namespace else CLUSTER
    return (scope, call.api_group, call.rbac_resource, call.verb)


def gaps(needed: set[Grant], rules: set[Grant]) -> tuple[list[Grant], list[Grant]]:
    """(calls no rule grants, rules no call used), sorted."""
    cluster_wide = {(CLUSTER, *g[1:]) for g in needed}
    ungranted = [
        g
        for g in needed
        if g not in rules and not (g[0] == NAMESPACE and (CLUSTER, *g[1:]) in rules)
    ]
    unused = [g for g in rules if g not in needed and not (g[0] == CLUSTER and g in cluster_wide)]
    return sorted(ungranted), sorted(unused)


def operator_calls() -> list[Call]:
    """The operator's own calls in this session, from the real API server's audit log."""
    if not STARTED_PLANES:
        pytest.skip(
            "no real control plane ran in this session: run this with tests/integration and "
            "tests/e2e in the same pytest session (as `make test` does); it reads their "
            "operators' calls from the API server's audit log"
        )
    log = STARTED_PLANES[-1].audit_log
    ops = [c for c in calls(log, OPERATOR_USER) if c.user_agent.startswith(OPERATOR_CLIENTS)]
    if not any(c.namespace.startswith(NAMESPACE_PREFIX) for c in ops):
        pytest.skip(
            "tests/integration did not run an operator on the real control plane in this "
            "session: run this with tests/integration and tests/e2e in the same session"
        )
    return ops


def test_every_operator_call_is_granted_and_every_grant_is_used() -> None:
    ops = operator_calls()
    refused = sorted(
        {
            (c.namespace, c.verb, c.rbac_resource)
            for c in ops
            if c.code == 403 and (c.namespace, c.api_group, c.resource) not in DELIBERATE_REFUSALS
        }
    )
    assert refused == [], "calls the real API server refused the operator (403)"
    ungranted, unused = gaps({as_grant(c) for c in ops}, chart_grants())
    assert ungranted == [], "calls the chart's RBAC does not grant"
    assert unused == [], "rules no integration or e2e scenario used"


def test_the_proof_notices_a_missing_and_an_unused_rule() -> None:
    rules = chart_grants()
    dropped = (NAMESPACE, "batch", "jobs", "delete")
    assert dropped in rules  # the chart's real rules, as helm renders them
    # The leader election's Role (a Role, not a ClusterRole) is read too.
    assert {
        (NAMESPACE, "coordination.k8s.io", "leases", v) for v in ("create", "get", "update")
    } <= rules
    assert (CLUSTER, "", "namespaces", "watch") in rules  # kopf's scan, cluster-wide
    assert (NAMESPACE, "", "namespaces", "watch") not in rules
    calls_made = (rules - {dropped}) | {(NAMESPACE, "", "secrets", "get")}
    assert gaps(calls_made, rules) == ([(NAMESPACE, "", "secrets", "get")], [dropped])
    # A namespaced grant does not cover a cluster-wide call of the same verb.
    listed = (rules - {(CLUSTER, "", "namespaces", "list")}) | {(CLUSTER, "", "pods", "list")}
    assert gaps(listed, rules) == (
        [(CLUSTER, "", "pods", "list")],
        [(CLUSTER, "", "namespaces", "list")],
    )
