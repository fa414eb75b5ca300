"""A run's Secrets, NetworkPolicies and Insecure condition (fedrun_render/security.py).

The NetworkPolicies are checked twice: rule by rule, and by a small evaluator of Kubernetes'
NetworkPolicy semantics that answers "may this pod open this port on that one?" for the
connections the issue names. The rendered objects also pass kubernetes-validate (strict) and
checkov, next to the run's other children.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrun_core import names as c
from fedrun_core import pki
from fedrun_core.api import FederatedRun, SpecError, load_run, parse_run
from fedrun_core.names import DEFAULT_OPERATOR_NAMESPACE
from fedrun_operator import metrics
from fedrun_operator.config import OPERATOR_NAMESPACE_ENV, OperatorConfig
from fedrun_operator.handlers.reconcile_run import Outcome, Reconciler
from fedrun_operator.kube import Kube
from fedrun_render import security
from fedrun_render.admission import admit
from fedrun_render.workloads import config_json, render_run, to_yaml

from ..chart.tools import KUBE_VERSIONS, checkov, one, render, run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("federatedrun*.yaml"))
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
UID = "0b7c3c3e-5f0e-4a57-9d1c-1c2f4d3e5a6b"
Manifest = dict[str, Any]


def run_obj(**spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "demo", "namespace": "clinic", "uid": UID},
        "spec": {
            "rounds": 3,
            "minHospitals": 2,
            "data": {"preset": "stroke"},
            "hospitals": [
                {"name": "hospital-a", "dataUri": "s3://bucket-a/a.csv"},
                {"name": "hospital-b", "dataUri": "file:///data/b.csv"},
                {"name": "hospital-c", "dataUri": "pvc://claim-c/c.csv"},
            ],
        },
    }
    obj["spec"].update(spec)
    return obj


def make_run(**spec: Any) -> FederatedRun:
    return parse_run(run_obj(**spec))


@pytest.fixture(scope="module")
def demo() -> FederatedRun:
    return make_run()


@pytest.fixture(scope="module")
def material(demo: FederatedRun) -> pki.RunMaterial:
    hospitals = [h.name for h in demo.spec.hospitals]
    return pki.generate(demo.name, demo.namespace, hospitals, now=NOW)


@pytest.fixture(scope="module")
def secrets(demo: FederatedRun, material: pki.RunMaterial) -> list[Manifest]:
    return security.secret_manifests(demo, material)


def data(secret: Manifest) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_keys(blobs: dict[str, bytes]) -> dict[str, ec.EllipticCurvePrivateKey]:
    """Every private key among a Secret's files, whatever its encoding."""
    out = {}
    for name, blob in blobs.items():
        if b"PRIVATE KEY" not in blob:
            continue
        key = (
            serialization.load_ssh_private_key(blob, None)
            if b"OPENSSH" in blob
            else serialization.load_pem_private_key(blob, None)
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        out[name] = key
    return out


# --------------------------------------------------------------------------- Secrets


def test_secret_names_types_and_owner(demo: FederatedRun, secrets: list[Manifest]) -> None:
    assert [s["metadata"]["name"] for s in secrets] == [
        "demo-server-tls",
        "demo-hospital-a-auth",
        "demo-hospital-b-auth",
        "demo-hospital-c-auth",
    ]
    assert [s["type"] for s in secrets] == ["kubernetes.io/tls"] + ["Opaque"] * 3
    for secret in secrets:
        meta = secret["metadata"]
        assert secret["immutable"] is True
        assert meta["namespace"] == "clinic"
        assert meta["labels"][c.LABEL_RUN] == "demo"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["annotations"]["fedrun.io/not-after"] == "2026-12-24T12:00:00Z"
    assert secrets[0]["metadata"]["labels"][c.LABEL_COMPONENT] == c.COMPONENT_SERVER
    for secret, hospital in zip(
        secrets[1:], ["hospital-a", "hospital-b", "hospital-c"], strict=True
    ):
        assert secret["metadata"]["labels"][c.LABEL_HOSPITAL] == hospital
        assert secret["metadata"]["labels"][c.LABEL_COMPONENT] == c.COMPONENT_HOSPITAL


def test_server_secret_registers_exactly_the_run_s_hospitals(
    secrets: list[Manifest], material: pki.RunMaterial
) -> None:
    files = data(secrets[0])
    assert set(files) == {
        "ca.crt",
        "tls.crt",
        "tls.key",
        "hospital-a.pub",
        "hospital-b.pub",
        "hospital-c.pub",
    }
    for hospital, node in material.nodes.items():
        assert files[f"{hospital}.pub"] == node.public_key
    pki.check_pair(files["tls.crt"], files["tls.key"])
    pki.verify_chain(files["tls.crt"], files["ca.crt"], now=NOW, name="demo-server")
    # The server holds no hospital's private key.
    assert list(private_keys(files)) == ["tls.key"]


def test_every_hospital_gets_only_its_own_key(secrets: list[Manifest]) -> None:
    server_files = data(secrets[0])
    for secret in secrets[1:]:
        hospital = secret["metadata"]["labels"][c.LABEL_HOSPITAL]
        files = data(secret)
        assert set(files) == {"ca.crt", "node.key", "node.pub"}
        assert files["ca.crt"] == server_files["ca.crt"]
        (key,) = private_keys(files).values()
        own = serialization.load_ssh_public_key(files["node.pub"])
        assert isinstance(own, ec.EllipticCurvePublicKey)
        assert public_der(key.public_key()) == public_der(own)
        # ...and that key is registered for this hospital and for no other.
        registered = {
            name.removesuffix(".pub"): serialization.load_ssh_public_key(blob)
            for name, blob in server_files.items()
            if name.endswith(".pub")
        }
        matches = [
            h
            for h, pub in registered.items()
            if isinstance(pub, ec.EllipticCurvePublicKey)
            and public_der(pub) == public_der(key.public_key())
        ]
        assert matches == [hospital]


def test_the_ca_key_is_in_no_secret(secrets: list[Manifest]) -> None:
    ca = data(secrets[0])["ca.crt"]
    from cryptography import x509

    ca_public = x509.load_pem_x509_certificate(ca).public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    count = 0
    for secret in secrets:
        for key in private_keys(data(secret)).values():
            count += 1
            assert public_der(key.public_key()) != public_der(ca_public)
    assert count == 4  # the server's TLS key and one node key per hospital


def test_material_must_match_the_run_s_hospitals(demo: FederatedRun) -> None:
    partial = pki.generate("demo", "clinic", ["hospital-a", "hospital-b"], now=NOW)
    with pytest.raises(ValueError, match="do not match the run's hospitals"):
        security.secret_manifests(demo, partial)
    extra = pki.generate("demo", "clinic", ["hospital-a", "hospital-b", "hospital-c", "x"], now=NOW)
    with pytest.raises(ValueError, match="do not match"):
        security.secret_manifests(demo, extra)


def test_secrets_leave_render_run_unchanged(demo: FederatedRun) -> None:
    # Secrets are made once by the operator, never by render_run (re-rendered every reconcile).
    assert all(m["kind"] != "Secret" for m in render_run(demo))
    assert "security" not in json.loads(config_json(demo))["spec"]


# --------------------------------------------------------------------------- NetworkPolicy rules


def policies_by_name(run: FederatedRun) -> dict[str, Manifest]:
    return {p["metadata"]["name"]: p for p in security.network_policies(run)}


def test_default_deny_covers_every_pod_of_the_run(demo: FederatedRun) -> None:
    deny = policies_by_name(demo)["demo-default-deny"]["spec"]
    assert deny == {
        "podSelector": {"matchLabels": {c.LABEL_RUN: "demo"}},
        "policyTypes": ["Ingress", "Egress"],
    }
    for manifest in render_run(demo):
        pod = manifest.get("spec", {}).get("template", {}).get("metadata", {}).get("labels")
        if pod is not None:
            assert pod[c.LABEL_RUN] == "demo"


def test_server_rules(demo: FederatedRun) -> None:
    spec = policies_by_name(demo)["demo-server"]["spec"]
    assert spec["podSelector"] == {
        "matchLabels": {c.LABEL_RUN: "demo", c.LABEL_COMPONENT: c.COMPONENT_SERVER}
    }
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    fleet, status = spec["ingress"]
    assert fleet == {
        "from": [
            {
                "podSelector": {
                    "matchLabels": {c.LABEL_RUN: "demo", c.LABEL_COMPONENT: c.COMPONENT_HOSPITAL}
                }
            }
        ],
        "ports": [{"protocol": "TCP", "port": 9092}],
    }
    assert status == {
        "from": [
            {
                # The operator's pods, in the operator's namespace only (by default the
                # chart's documented release namespace).
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "fedrun-system"}
                },
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/part-of": "fedrun",
                        "fedrun.io/component": "operator",
                    }
                },
            }
        ],
        "ports": [{"protocol": "TCP", "port": 9100}],
    }
    assert spec["egress"] == [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    }
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        }
    ]


def status_peers(policies: list[Manifest]) -> list[dict[str, Any]]:
    """The peers a run server's NetworkPolicy admits to the status port."""
    (server,) = [
        p
        for p in policies
        if p["kind"] == "NetworkPolicy" and p["metadata"]["name"].endswith("-server")
    ]
    (rule,) = [
        r
        for r in server["spec"]["ingress"]
        if r["ports"] == [{"protocol": "TCP", "port": c.STATUS_PORT}]
    ]
    peers: list[dict[str, Any]] = rule["from"]
    return peers


@pytest.mark.parametrize("namespace", ["ops", "fedrun-system", "a" * 63])
def test_status_port_admits_the_operator_s_namespace_only(
    demo: FederatedRun, namespace: str
) -> None:
    expected = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": security.OPERATOR_POD_LABELS},
        }
    ]
    assert status_peers(security.network_policies(demo, operator_namespace=namespace)) == expected
    # render_run hands its operator_namespace to the policies it renders.
    assert status_peers(render_run(demo, operator_namespace=namespace)) == expected


def test_the_default_operator_namespace_is_the_chart_s_release_namespace(
    demo: FederatedRun,
) -> None:
    assert DEFAULT_OPERATOR_NAMESPACE == "fedrun-system"
    (peer,) = status_peers(render_run(demo))
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": DEFAULT_OPERATOR_NAMESPACE
    }


@pytest.mark.parametrize("namespace", ["", "Fedrun", "fedrun_system", "-ops", "a" * 64])
def test_a_bad_operator_namespace_is_refused(demo: FederatedRun, namespace: str) -> None:
    with pytest.raises(ValueError, match="not a namespace name"):
        render_run(demo, operator_namespace=namespace)


def test_the_operator_reads_its_namespace_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(OPERATOR_NAMESPACE_ENV, raising=False)
    assert OperatorConfig.from_env().operator_namespace == DEFAULT_OPERATOR_NAMESPACE
    monkeypatch.setenv(OPERATOR_NAMESPACE_ENV, "platform-ops")
    assert OperatorConfig.from_env().operator_namespace == "platform-ops"
    monkeypatch.setenv(OPERATOR_NAMESPACE_ENV, "Not A Namespace")
    with pytest.raises(ValueError, match="not a namespace name"):
        OperatorConfig.from_env()


class _FirstPassKube:
    """Enough of `Kube` for a run's first reconcile: nothing exists, every create succeeds."""

    def __init__(self) -> None:
        self.created: list[Manifest] = []

    async def create(self, obj: Manifest) -> Manifest:
        self.created.append(obj)
        return obj

    async def patch_status(self, *args: Any) -> Manifest:
        return {}

    async def close(self) -> None:
        pass


def test_the_operator_pins_the_status_port_to_its_own_namespace() -> None:
    kube = _FirstPassKube()
    cfg = OperatorConfig(operator_namespace="platform-ops")

    async def first_pass() -> Outcome:
        reconciler = Reconciler(cast(Kube, kube), cfg)
        try:
            return await reconciler.reconcile(run_obj(), now=NOW)
        finally:
            reconciler.forget(UID)  # leave the process-wide metrics as they were
            metrics.forget_run("clinic", "demo")
            await reconciler.close()

    outcome = asyncio.run(first_pass())
    assert "NetworkPolicy/demo-server" in outcome.created
    (peer,) = status_peers([m for m in kube.created if m["kind"] == "NetworkPolicy"])
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "platform-ops"}
    }


def test_hospital_rules(demo: FederatedRun) -> None:
    spec = policies_by_name(demo)["demo-hospitals"]["spec"]
    assert spec["podSelector"] == {
        "matchLabels": {c.LABEL_RUN: "demo", c.LABEL_COMPONENT: c.COMPONENT_HOSPITAL}
    }
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in spec  # none allowed
    server, dns, https = spec["egress"]
    assert server == {
        "to": [
            {
                "podSelector": {
                    "matchLabels": {c.LABEL_RUN: "demo", c.LABEL_COMPONENT: c.COMPONENT_SERVER}
                }
            }
        ],
        "ports": [{"protocol": "TCP", "port": 9092}],
    }
    assert dns["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    ]
    assert https == {"ports": [{"protocol": "TCP", "port": 443}]}


@pytest.mark.parametrize(
    ("uri", "ports"),
    [
        (None, []),
        ("http://mlflow.mlflow:5000", [443, 5000]),
        ("https://mlflow.example.org", [443]),
        ("http://mlflow.example.org", [80, 443]),
        ("sqlite:///var/lib/fedrun/mlflow.db", []),
        ("file:///var/lib/fedrun/mlruns", []),
    ],
)
def test_server_egress_to_mlflow_only_for_a_remote_tracking_uri(
    uri: str | None, ports: list[int]
) -> None:
    run_ = make_run(mlflow={"trackingUri": uri} if uri else {})
    assert security.mlflow_egress_ports(run_) == ports
    egress = policies_by_name(run_)["demo-server"]["spec"]["egress"]
    if ports:
        assert egress[1] == {"ports": [{"protocol": "TCP", "port": p} for p in ports]}
    assert len(egress) == 1 + bool(ports)


@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_outside_hospitals_may_reach_the_fleet_port_only(service_type: str) -> None:
    run_ = make_run(server={"serviceType": service_type})
    fleet, status = policies_by_name(run_)["demo-server"]["spec"]["ingress"]
    assert fleet == {"ports": [{"protocol": "TCP", "port": 9092}]}
    assert status["ports"] == [{"protocol": "TCP", "port": 9100}]
    assert "from" in status


# --------------------------------------------------------------------------- semantics


@dataclass(frozen=True)
class Pod:
    """A pod (labels and namespace), or with `namespace=None` an address outside the cluster."""

    labels: dict[str, str] = field(default_factory=dict)
    namespace: str | None = "clinic"


NAMESPACE_LABELS = {
    "clinic": {"kubernetes.io/metadata.name": "clinic"},
    "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
    "fedrun-system": {"kubernetes.io/metadata.name": "fedrun-system"},
    "elsewhere": {"kubernetes.io/metadata.name": "elsewhere"},
}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict[str, Any], pod: Pod, policy_ns: str) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
    if pod.namespace is None:  # outside the cluster: only ipBlock peers (none here) match
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], NAMESPACE_LABELS[pod.namespace]):
            return False
    elif pod.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod.labels)


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return ports is None or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def _side_allows(
    policies: list[Manifest], pod: Pod, other: Pod, port: int, protocol: str, direction: str
) -> bool:
    kind, peers = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    selecting = [
        p
        for p in policies
        if pod.namespace == p["metadata"]["namespace"]
        and _selects(p["spec"]["podSelector"], pod.labels)
        and kind in p["spec"]["policyTypes"]
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for p in selecting:
        for rule in p["spec"].get(direction, []):
            peer_ok = peers not in rule or any(
                _peer_matches(peer, other, p["metadata"]["namespace"]) for peer in rule[peers]
            )
            if peer_ok and _port_matches(rule, port, protocol):
                return True
    return False


def allowed(policies: list[Manifest], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether `src` may open `port` on `dst`: egress of src and ingress of dst must allow it."""
    egress = src.namespace is None or _side_allows(policies, src, dst, port, protocol, "egress")
    ingress = dst.namespace is None or _side_allows(policies, dst, src, port, protocol, "ingress")
    return egress and ingress


def pod_labels(manifests: list[Manifest], kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = one(manifests, kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.fixture(scope="module")
def world(demo: FederatedRun) -> dict[str, Pod]:
    """The run's pods with the labels render_run gives them, and everyone around them."""
    children = render_run(demo)
    other_run = render_run(
        parse_run({**run_obj(), "metadata": {"name": "other", "namespace": "clinic"}})
    )
    # Every label the chart sets on its operator pod (tests/chart checks them against it).
    operator = {
        "app.kubernetes.io/name": "fedrun",
        "app.kubernetes.io/component": "operator",
        "app.kubernetes.io/part-of": "fedrun",
        "fedrun.io/component": "operator",
    }
    return {
        "server": Pod(pod_labels(children, "Deployment", "demo-server")),
        "a": Pod(pod_labels(children, "Job", "demo-hospital-a")),
        "b": Pod(pod_labels(children, "Job", "demo-hospital-b")),
        "other-server": Pod(pod_labels(other_run, "Deployment", "other-server")),
        "other-hospital": Pod(pod_labels(other_run, "Job", "other-hospital-a")),
        "operator": Pod(operator, "fedrun-system"),
        # The operator's labels on a pod anyone may create in another namespace.
        "operator-lookalike": Pod(operator, "elsewhere"),
        "operator-lookalike-here": Pod(operator),
        "neighbour": Pod({"app": "web"}),
        "stranger": Pod({"app": "web"}, "elsewhere"),
        "dns": Pod({"k8s-app": "kube-dns"}, "kube-system"),
        "s3": Pod(namespace=None),
    }


@pytest.fixture(scope="module")
def all_policies(demo: FederatedRun) -> list[Manifest]:
    other = parse_run({**run_obj(), "metadata": {"name": "other", "namespace": "clinic"}})
    return security.network_policies(demo) + security.network_policies(other)


# (source, destination, port, protocol, allowed)
CONNECTIONS = [
    ("a", "server", 9092, "TCP", True),
    ("b", "server", 9092, "TCP", True),
    ("a", "server", 9100, "TCP", False),  # a hospital never reads the status port...
    ("a", "server", 8000, "TCP", False),  # ...nor any other port (control, runtime)
    ("other-hospital", "server", 9092, "TCP", False),  # another run's hospital
    ("a", "other-server", 9092, "TCP", False),
    ("operator", "server", 9100, "TCP", True),
    ("operator", "server", 9092, "TCP", False),
    ("operator-lookalike", "server", 9100, "TCP", False),  # not the operator's namespace
    ("operator-lookalike-here", "server", 9100, "TCP", False),
    ("neighbour", "server", 9092, "TCP", False),
    ("neighbour", "server", 9100, "TCP", False),
    ("stranger", "server", 9092, "TCP", False),
    ("a", "b", 9092, "TCP", False),  # hospitals never talk to each other
    ("neighbour", "a", 8080, "TCP", False),
    ("a", "dns", 53, "UDP", True),
    ("a", "dns", 53, "TCP", True),
    ("a", "s3", 443, "TCP", True),
    ("a", "s3", 80, "TCP", False),
    ("a", "neighbour", 443, "TCP", True),  # 443 is open anywhere (S3 endpoints have no labels)
    ("a", "neighbour", 8080, "TCP", False),
    ("server", "dns", 53, "UDP", True),
    ("server", "s3", 443, "TCP", False),  # no MLflow server in this run
    ("server", "a", 9092, "TCP", False),
    ("server", "neighbour", 80, "TCP", False),
]


@pytest.mark.parametrize(("src", "dst", "port", "protocol", "ok"), CONNECTIONS)
def test_who_may_reach_whom(
    world: dict[str, Pod],
    all_policies: list[Manifest],
    src: str,
    dst: str,
    port: int,
    protocol: str,
    ok: bool,
) -> None:
    assert allowed(all_policies, world[src], world[dst], port, protocol) is ok


def test_the_evaluator_sees_an_open_namespace_as_open(world: dict[str, Pod]) -> None:
    # Without the run's policies everything is allowed: the checks above can fail.
    assert allowed([], world["other-hospital"], world["server"], 8000)


def test_server_may_reach_a_remote_mlflow(world: dict[str, Pod]) -> None:
    run_ = make_run(mlflow={"trackingUri": "http://mlflow.mlflow:5000"})
    policies = security.network_policies(run_)
    assert allowed(policies, world["server"], world["s3"], 5000)
    assert allowed(policies, world["server"], world["s3"], 443)
    assert not allowed(policies, world["server"], world["s3"], 22)


def test_operator_labels_are_the_chart_s() -> None:
    # The status port admits pods with these labels: they must be the operator's.
    deployment = one(render(), "Deployment")
    pod = deployment["spec"]["template"]["metadata"]["labels"]
    assert security.OPERATOR_POD_LABELS.items() <= pod.items()


# --------------------------------------------------------------------------- validity


def every_object(run_: FederatedRun, material: pki.RunMaterial) -> list[Manifest]:
    return security.network_policies(run_) + security.secret_manifests(run_, material)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_are_valid_kubernetes(
    demo: FederatedRun, material: pki.RunMaterial, kube_version: str
) -> None:
    nodeport = make_run(server={"serviceType": "NodePort"}, mlflow={"trackingUri": "http://m:5000"})
    objects = every_object(demo, material) + security.network_policies(nodeport)
    for m in objects:
        try:
            kubernetes_validate.validate(m, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} on {kube_version}: {exc}")


def test_checkov_finds_nothing_and_every_pod_has_a_policy(tmp_path: Path) -> None:
    """The run's children (with their NetworkPolicies) and Secrets: zero failed checks, and
    the "pod without NetworkPolicy" check (CKV2_K8S_6) runs and passes for every pod."""
    tool = checkov()
    files = []
    for example in EXAMPLES:
        obj = yaml.safe_load(example.read_text(encoding="utf-8"))
        obj["metadata"]["uid"] = UID
        obj["metadata"]["namespace"] = "clinic"  # CKV_K8S_21: not the default namespace
        run_ = parse_run(obj)
        hospitals = [h.name for h in run_.spec.hospitals]
        material = pki.generate(run_.name, run_.namespace, hospitals, now=datetime.now(UTC))
        objects = render_run(run_) + security.secret_manifests(run_, material)
        path = tmp_path / f"{example.stem}.yaml"
        path.write_text(to_yaml(objects))
        files.append(path.name)
    done = run(
        tool,
        "--skip-download",
        "--output",
        "json",
        "--framework",
        "kubernetes",
        "--directory",
        str(tmp_path),
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    if isinstance(report, list):
        (report,) = report
    results = report["results"]
    failed = [f"{x['check_id']} {x['resource']}" for x in results["failed_checks"]]
    assert failed == []
    passed = {(Path(x["file_path"]).name, x["check_id"]) for x in results["passed_checks"]}
    for name in files:
        assert (name, "CKV2_K8S_6") in passed, f"{name}: CKV2_K8S_6 did not run"
    assert len(results["passed_checks"]) > 40


# --------------------------------------------------------------------------- spec.security


def test_secure_by_default(demo: FederatedRun) -> None:
    assert demo.spec.security is None
    assert not security.is_insecure(demo)
    assert not security.is_insecure(make_run(security={}))
    assert security.insecure_condition(demo, [], NOW) is None


def test_insecure_run_carries_a_warning_condition() -> None:
    insecure = make_run(security={"insecure": True})
    assert security.is_insecure(insecure)
    condition = security.insecure_condition(insecure, [], NOW, generation=4)
    assert condition == {
        "type": "Insecure",
        "status": "True",
        "reason": "InsecureTransport",
        "message": security.INSECURE_MESSAGE,
        "lastTransitionTime": "2026-11-24T12:00:00Z",
        "observedGeneration": 4,
    }
    assert "local debugging only" in condition["message"]
    later = security.insecure_condition(insecure, [condition], NOW.replace(hour=13))
    assert later is not None
    assert later["lastTransitionTime"] == "2026-11-24T12:00:00Z"
    flipped = {**condition, "status": "False"}
    again = security.insecure_condition(insecure, [flipped], NOW.replace(hour=13))
    assert again is not None
    assert again["lastTransitionTime"] == "2026-11-24T13:00:00Z"


def test_crd_and_models_accept_insecure_and_refuse_nonsense() -> None:
    ok = run_obj(security={"insecure": True})
    del ok["metadata"]["uid"]
    assert admit(ok) == []
    assert parse_run(ok).spec.security is not None
    typo = run_obj(security={"insecur": True})
    del typo["metadata"]["uid"]
    assert any("security" in p for p in admit(typo)), admit(typo)
    with pytest.raises(SpecError, match=r"spec\.security\.insecur: unknown field"):
        parse_run(typo)
    # A string is refused by the schema (the models, like for every bool, read "yes" as true).
    text = run_obj(security={"insecure": "yes"})
    del text["metadata"]["uid"]
    assert any("spec.security.insecure" in p for p in admit(text)), admit(text)


def test_security_is_immutable_while_running() -> None:
    old = run_obj()
    del old["metadata"]["uid"]
    old["status"] = {"phase": "Running"}
    new = copy.deepcopy(old)
    new["spec"]["security"] = {"insecure": True}
    assert any("immutable" in p for p in admit(new, old))


def test_examples_stay_secure() -> None:
    for example in EXAMPLES:
        assert not security.is_insecure(load_run(example)), example.name
