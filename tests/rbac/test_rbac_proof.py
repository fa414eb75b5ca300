"""Least privilege, proven: the chart grants exactly the API calls the operator makes.

Every EmulatedCluster of this pytest session records the requests it served
(`tests.kube.cluster.RECORDED`). This test runs after tests/integration and tests/e2e (pytest
collects directories in name order), takes the operator's own requests (kopf's and the
operator's client, by User-Agent), and compares them with the chart's cluster-wide RBAC
rules (`clusterWide: true`, the mode those tests run kopf in: `--all-namespaces`): a call
no rule grants fails, and so does a granted verb that no scenario ever used. The chart's
default binds the same run rules per namespace and adds only kopf's namespace scan.
"""

from __future__ import annotations

import pytest

from tests.chart.tools import CHART, find, render
from tests.kube.cluster import RECORDED

OPERATOR_CLIENTS = ("kopf/", "fedrun-operator/")
# The recorded operator watches every namespace, so its grants are the cluster-wide ones.
CLUSTER_WIDE = CHART / "ci" / "cluster-wide-values.yaml"

Grant = tuple[str, str, str]  # apiGroup, resource (with /subresource), verb


def granted() -> set[Grant]:
    """Every (apiGroup, resource, verb) the chart's ClusterRoles give a cluster-wide operator."""
    out: set[Grant] = set()
    for role in find(render(CLUSTER_WIDE), "ClusterRole"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((group, resource, verb))
    return out


def used() -> set[Grant]:
    """Every (apiGroup, resource, verb) the operator called in this session's tests."""
    return {
        (r.api_group, r.rbac_resource, r.verb)
        for r in RECORDED
        if r.user_agent.startswith(OPERATOR_CLIENTS)
    }


def gaps(calls: set[Grant], rules: set[Grant]) -> tuple[list[Grant], list[Grant]]:
    """(calls no rule grants, rules no call used), sorted."""
    return sorted(calls - rules), sorted(rules - calls)


def test_every_operator_call_is_granted_and_every_grant_is_used() -> None:
    calls = used()
    if not calls:
        pytest.skip(
            "no operator requests recorded: run this with tests/integration and tests/e2e "
            "in the same pytest session (as `make test` does)"
        )
    ungranted, unused = gaps(calls, granted())
    assert ungranted == [], "calls the chart's RBAC does not grant"
    assert unused == [], "rules no integration or e2e scenario used"


def test_the_proof_notices_a_missing_and_an_unused_rule() -> None:
    rules = granted()
    dropped = ("batch", "jobs", "delete")
    assert dropped in rules  # the chart's real rules, as helm renders them
    calls = (rules - {dropped}) | {("", "secrets", "get")}
    assert gaps(calls, rules) == ([("", "secrets", "get")], [dropped])
