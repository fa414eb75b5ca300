"""The Helm chart: lint, rendering per values file, determinism, Kubernetes schemas, the CRD,
RBAC, the operator's pod and command line, NetworkPolicy, Pod Security, `helm test`.

Everything runs `helm template` with the real helm binary (`make tools`); there is no
cluster here, so what a cluster would check (schemas, Pod Security) is checked offline.
"""

from __future__ import annotations

import argparse
import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedrun_core import names as c
from fedrun_core.api import load_run, parse_run
from fedrun_core.names import DEFAULT_OPERATOR_NAMESPACE
from fedrun_operator.config import OPERATOR_NAMESPACE_ENV
from fedrun_operator.metrics import render as render_metrics
from fedrun_render import security
from fedrun_render.crd import build_budget_crd, build_crd, crd_yaml
from fedrun_render.workloads import render_run

from .tools import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    NAMESPACE,
    REPO,
    Manifest,
    find,
    helm,
    one,
    pod_specs,
    render,
    restricted_violations,
    run,
    template_args,
    values_id,
)

# ci/default-values.yaml stands for the chart's defaults.
VALUES_SETS: list[Path | None] = list(CI_VALUES)
CI = {values_id(p): p for p in CI_VALUES}
EXAMPLES = sorted((REPO / "examples").glob("federatedrun*.yaml"))
OPERATOR = "fedrun-operator"  # the release is `fedrun`, so names are not doubled
LEADER = f"{OPERATOR}-leader"  # the leader election's Role and RoleBinding
# Kinds of the Prometheus Operator: no schema ships with kubernetes-validate; their
# contents are checked in test_monitoring.py (promtool, selectors).
NO_SCHEMA = {"ServiceMonitor", "PrometheusRule"}


def test_the_ci_values_files_cover_the_required_cases() -> None:
    assert set(CI) >= {"default", "watch-namespaces", "cluster-wide", "monitoring", "no-crds"}


def test_the_documented_release_namespace_is_the_operator_s_default() -> None:
    # `fedrun render` and the local runner pin run servers' status port to this namespace.
    assert DEFAULT_OPERATOR_NAMESPACE == NAMESPACE


# --------------------------------------------------------------------------- lint, render


@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_lint_strict(values: Path | None) -> None:
    args = [helm(), "lint", "--strict", str(CHART)]
    if values is not None:
        args += ["--values", str(values)]
    out = run(*args).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_rendering_twice_gives_identical_bytes(values: Path | None) -> None:
    # Not through the cache: two separate helm processes.
    first, second = (run(*template_args(values)).stdout for _ in range(2))
    assert first == second
    assert len(first) > 1000


@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_rendered_text_has_no_trailing_whitespace(values: Path | None) -> None:
    # Whitespace-only lines are what a mis-trimmed template action leaves behind.
    text = run(*template_args(values)).stdout
    assert [n for n, line in enumerate(text.splitlines(), 1) if line != line.rstrip()] == []


FORBIDDEN = re.compile(
    r"\b(lookup|now|date\w*|unixEpoch|rand\w*|uuidv4|shuffle|htpasswd|derivePassword|"
    r"gen(CA|PrivateKey|SelfSignedCert|SignedCert)\w*)\b"
)


def test_templates_depend_on_neither_cluster_nor_clock() -> None:
    # `lookup` renders empty under `helm template` (and Argo CD), so rendering twice would
    # not catch it; random values and time stamps would make every GitOps diff non-empty.
    offenders = []
    for path in sorted((CHART / "templates").rglob("*")):
        if path.is_file():
            for action in re.findall(r"\{\{(.*?)\}\}", path.read_text(encoding="utf-8"), re.S):
                if not action.strip().startswith("/*") and FORBIDDEN.search(action):
                    offenders.append(f"{path.name}: {{{{{action}}}}}")
    assert offenders == []


def test_defaults() -> None:
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in render())
    assert kinds == [
        ("ClusterRole", OPERATOR),
        ("ClusterRole", f"{OPERATOR}-scan"),
        ("ClusterRoleBinding", f"{OPERATOR}-scan"),
        ("CustomResourceDefinition", "federatedruns.fedrun.io"),
        ("CustomResourceDefinition", "privacybudgets.fedrun.io"),
        ("Deployment", OPERATOR),
        ("NetworkPolicy", OPERATOR),
        ("Pod", f"{OPERATOR}-test-metrics"),
        ("PodDisruptionBudget", OPERATOR),
        ("Role", f"{OPERATOR}-leader"),
        ("RoleBinding", OPERATOR),
        ("RoleBinding", f"{OPERATOR}-leader"),
        ("Service", f"{OPERATOR}-metrics"),
        ("ServiceAccount", OPERATOR),
    ]


def test_monitoring_values_add_the_monitoring_objects() -> None:
    manifests = render(CI["monitoring"])
    assert one(manifests, "ServiceMonitor")["metadata"]["labels"]["release"] == (
        "kube-prometheus-stack"
    )
    assert one(manifests, "PrometheusRule")["metadata"]["labels"]["release"] == (
        "kube-prometheus-stack"
    )
    dashboard = one(manifests, "ConfigMap", "fedrun-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_objects_carry_the_release_labels() -> None:
    for m in render(CI["monitoring"]):
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "fedrun", m["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "fedrun"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if m["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert m["metadata"]["namespace"] == NAMESPACE, m["metadata"]["name"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("operatorr={}", "Additional property operatorr is not allowed"),
        ("crds.enabeld=false", "Additional property enabeld is not allowed"),
        ('image.digest="latest"', "image.digest: Does not match pattern"),
        ('logFormat="xml"', "logFormat: logFormat must be one of"),
        ('watchNamespaces=["Not_A_Namespace"]', "watchNamespaces.0: Does not match pattern"),
        (
            "prometheusRule.alerts.FedrunRunFailed.withinSeconds=10",
            "withinSeconds: Must be greater than or equal to 60",
        ),
        ("healthPort=8080", "metricsPort and healthPort must differ"),
        ('clusterWide="yes"', "clusterWide: Invalid type"),
    ],
)
def test_bad_values_are_refused(item: str, message: str) -> None:
    done = run(*template_args(sets=(item,)), check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_cluster_wide_and_watch_namespaces_exclude_each_other() -> None:
    # Which one would win is not obvious, so the chart refuses to guess.
    done = run(
        *template_args(sets=("clusterWide=true", 'watchNamespaces=["research"]')), check=False
    )
    assert done.returncode != 0
    assert "clusterWide and watchNamespaces exclude each other" in done.stderr, done.stderr


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_objects_are_valid_kubernetes(values: Path | None, kube_version: str) -> None:
    unvalidated = set()
    for m in render(values, kube_version=kube_version):
        if m["kind"] in NO_SCHEMA:
            unvalidated.add(m["kind"])
            continue
        try:
            kubernetes_validate.validate(m, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} on {kube_version}: {exc}")
    assert unvalidated <= NO_SCHEMA


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_run_children_are_valid_kubernetes(example: Path, kube_version: str) -> None:
    # The operator renders from the stored run, which has a uid (ownerReferences need it).
    obj = yaml.safe_load(example.read_text(encoding="utf-8"))
    obj["metadata"]["uid"] = "0b7c3c3e-5f0e-4a57-9d1c-1c2f4d3e5a6b"
    for m in render_run(parse_run(obj)):
        try:
            kubernetes_validate.validate(m, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} on {kube_version}: {exc}")


def test_validated_versions_meet_the_chart_s_kube_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    floor = re.fullmatch(r">=(\d+)\.(\d+)\.0-0", chart["kubeVersion"])
    assert floor is not None
    for version in KUBE_VERSIONS:
        major, minor, _ = (int(x) for x in version.split("."))
        assert (major, minor) >= (int(floor[1]), int(floor[2]))
    # Below the floor, helm refuses to render.
    done = run(*template_args(kube_version="1.29.0"), check=False)
    assert done.returncode != 0
    assert "kubeVersion" in done.stderr


# --------------------------------------------------------------------------- the CRD

CHART_CRD = CHART / "files" / "crds" / "federatedrun.yaml"


def test_chart_crd_file_is_the_committed_crd() -> None:
    assert CHART_CRD.read_bytes() == (REPO / "crds" / "federatedrun.yaml").read_bytes(), (
        "charts/fedrun/files/crds/federatedrun.yaml differs from crds/: run `make crds`"
    )


def test_chart_crd_file_is_generated_from_the_models() -> None:
    assert CHART_CRD.read_text(encoding="utf-8") == crd_yaml(), (
        "charts/fedrun/files/crds/federatedrun.yaml is stale: run `make crds`"
    )


@pytest.mark.parametrize("build", [build_crd, build_budget_crd])
def test_rendered_crd_is_the_generated_one(build: Callable[[], dict[str, Any]]) -> None:
    generated = build()
    rendered = one(render(), "CustomResourceDefinition", generated["metadata"]["name"])
    assert rendered["spec"] == generated["spec"]
    assert rendered["metadata"]["name"] == generated["metadata"]["name"]
    assert generated["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()


@pytest.mark.parametrize("crd", ["federatedruns.fedrun.io", "privacybudgets.fedrun.io"])
def test_crds_keep_and_enabled(crd: str) -> None:
    kept = one(render(), "CustomResourceDefinition", crd)["metadata"]["annotations"]
    assert kept == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Delete=false",
    }
    unkept = one(render(sets=("crds.keep=false",)), "CustomResourceDefinition", crd)
    assert "annotations" not in unkept["metadata"]
    assert find(render(CI["no-crds"]), "CustomResourceDefinition") == []


# --------------------------------------------------------------------------- RBAC

# What the operator does (its contract, fedrun_operator/kube.py and kopf 1.45): one rule
# per resource, exactly these verbs. The integration tests' recorded calls prove it.
RUN_RULES = {
    ("fedrun.io", "federatedruns"): ["get", "list", "watch", "patch", "delete"],
    ("fedrun.io", "federatedruns/status"): ["patch"],
    ("fedrun.io", "privacybudgets"): ["get", "list", "watch"],
    ("fedrun.io", "privacybudgets/status"): ["update"],
    ("", "configmaps"): ["get", "create", "patch"],
    ("", "services"): ["get", "create", "patch"],
    ("", "serviceaccounts"): ["get", "create", "patch"],
    ("apps", "deployments"): ["get", "create", "patch"],
    ("batch", "jobs"): ["get", "create", "patch", "delete"],
    ("networking.k8s.io", "networkpolicies"): ["get", "create", "patch"],
    ("", "persistentvolumeclaims"): ["get", "create"],
    ("", "secrets"): ["create"],
    ("", "pods"): ["list"],
    ("", "events"): ["create"],
}
SCAN_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"]}
NAMESPACE_SCAN = {("", "namespaces"): ["list", "watch"]}


def rules(role: Manifest) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for rule in role["rules"]:
        assert len(rule["apiGroups"]) == 1 and len(rule["resources"]) == 1, rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        key = (rule["apiGroups"][0], rule["resources"][0])
        assert key not in out, f"two rules for {key}"
        out[key] = rule["verbs"]
    return out


def subject(binding: Manifest) -> dict[str, str]:
    (sub,) = binding["subjects"]
    return dict(sub)


OPERATOR_SA = {"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}


def bindings_of(manifests: list[Manifest], kind: str, role: str) -> list[Manifest]:
    """The `kind` bindings (RoleBinding, ClusterRoleBinding) that grant ClusterRole `role`."""
    return [
        b
        for b in find(manifests, kind)
        if b["roleRef"]
        == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}
    ]


@pytest.mark.parametrize("namespace", [NAMESPACE, "platform-ops"])
def test_default_rbac_is_the_release_namespace_only(namespace: str) -> None:
    # Least privilege by default: the run rules are granted in the release's namespace, and
    # nothing binds them cluster-wide (that is the explicit clusterWide opt-in).
    manifests = render(namespace=namespace)
    assert bindings_of(manifests, "ClusterRoleBinding", OPERATOR) == []
    (binding,) = bindings_of(manifests, "RoleBinding", OPERATOR)
    assert binding["metadata"]["namespace"] == namespace
    assert subject(binding) == OPERATOR_SA | {"namespace": namespace}
    # Besides, only the leader election's Role (tests/chart/test_operator_replicas.py).
    leader = one(manifests, "RoleBinding", LEADER)
    assert sorted(b["metadata"]["name"] for b in find(manifests, "RoleBinding")) == [
        OPERATOR,
        LEADER,
    ]
    assert leader["metadata"]["namespace"] == namespace
    assert rules(one(manifests, "ClusterRole", OPERATOR)) == RUN_RULES
    # The only cluster-wide grant left is kopf's scans (names and schemas, no contents).
    (scan,) = find(manifests, "ClusterRoleBinding")
    assert scan["roleRef"]["name"] == f"{OPERATOR}-scan"
    assert rules(one(manifests, "ClusterRole", f"{OPERATOR}-scan")) == SCAN_RULES | NAMESPACE_SCAN


def test_cluster_wide_rbac() -> None:
    manifests = render(CI["cluster-wide"])
    assert rules(one(manifests, "ClusterRole", OPERATOR)) == RUN_RULES
    assert rules(one(manifests, "ClusterRole", f"{OPERATOR}-scan")) == SCAN_RULES
    for name in (OPERATOR, f"{OPERATOR}-scan"):
        binding = one(manifests, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert subject(binding) == OPERATOR_SA
    # No run rule in a namespace: only the leader election's, in the release's.
    assert [b["metadata"]["name"] for b in find(manifests, "RoleBinding")] == [LEADER]
    assert [r["metadata"]["name"] for r in find(manifests, "Role")] == [LEADER]


def test_namespaced_rbac() -> None:
    manifests = render(CI["watch-namespaces"])
    watched = yaml.safe_load(CI["watch-namespaces"].read_text(encoding="utf-8"))["watchNamespaces"]
    # The run rules only inside the watched namespaces...
    assert find(manifests, "ClusterRoleBinding", OPERATOR) == []
    bindings = [b for b in find(manifests, "RoleBinding") if b["metadata"]["name"] != LEADER]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert binding["roleRef"]["name"] == OPERATOR
        assert subject(binding) == OPERATOR_SA
    assert rules(one(manifests, "ClusterRole", OPERATOR)) == RUN_RULES
    # ...and kopf's cluster-scoped scans, now with namespaces (kopf matches them by name).
    assert rules(one(manifests, "ClusterRole", f"{OPERATOR}-scan")) == SCAN_RULES | NAMESPACE_SCAN
    assert subject(one(manifests, "ClusterRoleBinding", f"{OPERATOR}-scan")) == OPERATOR_SA


def test_no_rule_grants_more_than_it_names() -> None:
    for values in VALUES_SETS:
        for role in find(render(values), "ClusterRole") + find(render(values), "Role"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], rule
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
                # Secrets: created, never read (reading would open every Secret around).
                if "secrets" in rule["resources"]:
                    assert rule["verbs"] == ["create"], rule


def test_rbac_and_service_account_can_be_left_to_the_user() -> None:
    manifests = render(
        sets=(
            "rbac.create=false",
            "serviceAccount.create=false",
            'serviceAccount.name="platform-fedrun"',
        )
    )
    kinds = {m["kind"] for m in manifests}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "RoleBinding", "ServiceAccount"}
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-fedrun"
    done = run(*template_args(sets=("serviceAccount.create=false",)), check=False)
    assert "serviceAccount.name is required" in done.stderr


# --------------------------------------------------------------------------- the operator


def operator_pod(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    return spec


def test_operator_deployment() -> None:
    manifests = render()
    deployment = one(manifests, "Deployment", OPERATOR)
    spec = deployment["spec"]
    # Replicas elect a leader (tests/chart/test_operator_replicas.py); one stays up throughout.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/fedrun/operator:0.1.0"  # the chart's appVersion
    assert "command" not in container  # the image's entrypoint stays PID 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"].keys() == {"cpu", "memory"}
    assert container["resources"]["limits"].keys() == {"cpu", "memory"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_image_by_digest() -> None:
    manifests = render(CI["no-crds"])
    (container,) = operator_pod(manifests)["containers"]
    assert re.fullmatch(r"ghcr\.io/fedrun/operator@sha256:[0-9a-f]{64}", container["image"])
    assert container["imagePullPolicy"] == "Always"
    # With a digest and Always, the checkov skips for them have no reason left.
    annotations = one(manifests, "Deployment")["metadata"]["annotations"]
    assert not any(v.startswith(("CKV_K8S_43=", "CKV_K8S_15=")) for v in annotations.values())


def fedrun_operator_parser() -> argparse.ArgumentParser:
    from fedrun_cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "operator" not in commands:
        pytest.skip("`fedrun operator` is not built yet (issue #3)")
    return parser


@pytest.mark.parametrize(
    ("values", "namespace", "watched"),
    [
        (None, NAMESPACE, [NAMESPACE]),  # the release's namespace only
        (None, "platform-ops", ["platform-ops"]),
        (CI["watch-namespaces"], NAMESPACE, ["research", "hospital-trials"]),
        (CI["cluster-wide"], NAMESPACE, []),  # no --namespace: every namespace
    ],
    ids=["defaults", "defaults-elsewhere", "watch-namespaces", "cluster-wide"],
)
def test_operator_command_line_is_one_fedrun_accepts(
    values: Path | None, namespace: str, watched: list[str]
) -> None:
    manifests = render(values, namespace=namespace)
    (container,) = operator_pod(manifests)["containers"]
    args = container["args"]
    assert args[0] == "fedrun"
    parsed = fedrun_operator_parser().parse_args(args[1:])
    assert parsed.command == "operator"
    assert parsed.metrics_port == 8080
    assert parsed.health_port == 8081
    assert parsed.log_format == "json"
    assert list(parsed.namespace or []) == watched
    # The operator follows exactly the namespaces its rules are bound in.
    if watched:
        bound = bindings_of(manifests, "RoleBinding", OPERATOR)
        assert sorted(b["metadata"]["namespace"] for b in bound) == sorted(watched)
        assert bindings_of(manifests, "ClusterRoleBinding", OPERATOR) == []
    else:
        assert bindings_of(manifests, "ClusterRoleBinding", OPERATOR) != []
        assert bindings_of(manifests, "RoleBinding", OPERATOR) == []


def test_operator_knows_its_namespace() -> None:
    # fedrun_operator.config reads it to pin run servers' status port to the operator's pods.
    (container,) = operator_pod(render())["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[OPERATOR_NAMESPACE_ENV] == {
        "name": OPERATOR_NAMESPACE_ENV,
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ('nameOverride="trials"',),
        ('fullnameOverride="fl"',),
        ('podLabels={"fedrun.io/component": "x", "app.kubernetes.io/part-of": "y", "team": "ml"}',),
    ],
    ids=["defaults", "nameOverride", "fullnameOverride", "podLabels"],
)
def test_run_servers_admit_the_operator_pod_whatever_the_values(sets: tuple[str, ...]) -> None:
    manifests = render(sets=sets, namespace="platform-ops")
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert security.OPERATOR_POD_LABELS.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The status-port rule of a run's server policy, rendered for this operator's namespace,
    # selects exactly this pod in exactly this namespace.
    example = load_run(EXAMPLES[0])
    policies = render_run(example, operator_namespace=deployment["metadata"]["namespace"])
    server = next(
        p
        for p in policies
        if p["kind"] == "NetworkPolicy" and p["metadata"]["name"].endswith("-server")
    )
    (peer,) = server["spec"]["ingress"][1]["from"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "platform-ops"}
    }
    if any(s.startswith("podLabels") for s in sets):
        assert labels["team"] == "ml"  # extra labels still arrive


def test_the_helm_test_pod_is_not_admitted_to_run_servers() -> None:
    test_pod = one(render(), "Pod")["metadata"]["labels"]
    assert not security.OPERATOR_POD_LABELS.items() <= test_pod.items()


def test_metrics_service_reaches_the_metrics_port() -> None:
    manifests = render()
    service = one(manifests, "Service", f"{OPERATOR}-metrics")["spec"]
    deployment = one(manifests, "Deployment", OPERATOR)["spec"]
    assert service["selector"] == deployment["selector"]["matchLabels"]
    assert service["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


# --------------------------------------------------------------------------- NetworkPolicy


def egress_to_status(policy: Manifest) -> dict[str, Any]:
    (rule,) = [
        r
        for r in policy["spec"]["egress"]
        if {"port": c.STATUS_PORT, "protocol": "TCP"} in r.get("ports", [])
    ]
    (peer,) = rule["to"]
    return dict(peer)


def server_pod_labels(example: Path) -> dict[str, str]:
    deployment = next(m for m in render_run(load_run(example)) if m["kind"] == "Deployment")
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def test_network_policy_defaults_to_the_release_namespace() -> None:
    peer = egress_to_status(one(render(), "NetworkPolicy"))
    assert peer["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [NAMESPACE]}
        ]
    }


def test_network_policy_cluster_wide() -> None:
    manifests = render(CI["cluster-wide"])
    policy = one(manifests, "NetworkPolicy", OPERATOR)["spec"]
    deployment = one(manifests, "Deployment", OPERATOR)["spec"]
    assert policy["podSelector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    egress = policy["egress"]
    api = egress[0]
    assert api["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]
    assert "to" not in api  # the API server's address varies by cluster
    dns = egress[1]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    peer = egress_to_status(one(manifests, "NetworkPolicy"))
    assert peer["namespaceSelector"] == {}
    # The selector matches the server pods the operator renders (and nothing else of ours).
    for example in EXAMPLES:
        assert peer["podSelector"]["matchLabels"].items() <= server_pod_labels(example).items()
    assert peer["podSelector"]["matchLabels"][c.LABEL_COMPONENT] == c.COMPONENT_SERVER


def test_network_policy_limited_to_watched_namespaces() -> None:
    manifests = render(CI["watch-namespaces"])
    values = yaml.safe_load(CI["watch-namespaces"].read_text(encoding="utf-8"))
    policy = one(manifests, "NetworkPolicy")
    peer = egress_to_status(policy)
    assert peer["namespaceSelector"] == {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "In",
                "values": values["watchNamespaces"],
            }
        ]
    }
    assert policy["spec"]["egress"][0]["to"] == values["networkPolicy"]["apiServer"]["to"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["from"][1:] == values["networkPolicy"]["metricsFrom"]


def test_network_policy_admits_the_test_pod_to_metrics_only() -> None:
    manifests = render()
    (ingress,) = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (peer,) = ingress["from"]  # by default nobody else
    test_pod = one(manifests, "Pod")
    assert peer["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()
    assert find(render(sets=("networkPolicy.enabled=false",)), "NetworkPolicy") == []


# --------------------------------------------------------------------------- Pod Security


def test_restricted_check_finds_violations() -> None:
    bad = {
        "hostNetwork": True,
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
                "ports": [{"containerPort": 80, "hostPort": 80}],
            }
        ],
    }
    found = " ".join(restricted_violations(bad))
    for word in (
        "hostNetwork",
        "hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "drop ALL",
        "SYS_ADMIN",
        "hostPort",
        "readOnlyRootFilesystem",
    ):
        assert word in found, word


@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_chart_pods_are_restricted(values: Path | None) -> None:
    pods = list(pod_specs(render(values)))
    assert {name for name, _ in pods} == {
        f"Deployment/{OPERATOR}",
        f"Pod/{OPERATOR}-test-metrics",
    }
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_pods_the_operator_creates_are_restricted(example: Path) -> None:
    pods = list(pod_specs(render_run(load_run(example))))
    assert len(pods) == 1 + len(load_run(example).spec.hospitals)
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


# --------------------------------------------------------------------------- helm test


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, type[_Metrics]]]:
    handler = type("Handler", (_Metrics,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics", handler
    server.shutdown()
    server.server_close()


def helm_test_pod(manifests: list[Manifest]) -> Manifest:
    pod = one(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def run_test_pod(pod: Manifest, url: str) -> subprocess.CompletedProcess[str]:
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "python"
    return subprocess.run(
        [sys.executable, *container["args"][1:]],
        env={"FEDRUN_METRICS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_helm_test_pod_targets_the_metrics_service() -> None:
    manifests = render()
    pod = helm_test_pod(manifests)
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = one(manifests, "Service", f"{OPERATOR}-metrics")
    port = service["spec"]["ports"][0]["port"]
    assert env["FEDRUN_METRICS_URL"] == (
        f"http://{OPERATOR}-metrics.{NAMESPACE}.svc:{port}/metrics"
    )
    assert container["image"] == operator_pod(manifests)["containers"][0]["image"]


def test_helm_test_passes_against_the_operator_s_metrics(
    metrics_server: tuple[str, type[_Metrics]],
) -> None:
    url, handler = metrics_server
    handler.body = render_metrics()
    done = run_test_pod(helm_test_pod(render()), url)
    assert done.returncode == 0, done.stderr
    assert "fedrun operator metrics present" in done.stdout


def test_helm_test_fails_against_something_else(
    metrics_server: tuple[str, type[_Metrics]],
) -> None:
    url, handler = metrics_server
    handler.body = b"# TYPE go_goroutines gauge\ngo_goroutines 7\n"
    done = run_test_pod(helm_test_pod(render()), url)
    assert done.returncode != 0
    assert "without fedrun's operator metrics" in done.stderr
