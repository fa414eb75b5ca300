"""Rendering a FederatedRun into its children: names, wiring, security and determinism."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core import names as c
from fedrun_core.api import FederatedRun, load_run, parse_run
from fedrun_render.workloads import config_json, render_run, to_yaml

ROOT = Path(__file__).resolve().parents[2]
Manifest = dict[str, Any]


def spec_obj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rounds": 5,
        "minHospitals": 2,
        "data": {"preset": "stroke"},
        "hospitals": [
            {
                "name": "hospital-a",
                "dataUri": "s3://bucket-a/stroke.csv",
                "roleArn": "arn:aws:iam::123456789012:role/fedrun-hospital-a",
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": 2}},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            },
            {"name": "hospital-b", "dataUri": "file:///data/b.csv"},
        ],
    }
    base.update(spec)
    return {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "stroke", "namespace": "research", "uid": "1234-abcd"},
        "spec": base,
    }


def make_run(**spec: Any) -> FederatedRun:
    return parse_run(spec_obj(**spec))


def by_kind_name(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


@pytest.fixture
def run() -> FederatedRun:
    return make_run()


@pytest.fixture
def children(run: FederatedRun) -> dict[tuple[str, str], Manifest]:
    return by_kind_name(render_run(run))


def pods(manifests: list[Manifest]) -> list[dict[str, Any]]:
    return [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "Job")]


def test_children_and_their_order(run: FederatedRun) -> None:
    assert [(m["kind"], m["metadata"]["name"]) for m in render_run(run)] == [
        ("ConfigMap", "stroke-config"),
        ("Deployment", "stroke-server"),
        ("Service", "stroke-server"),
        ("ServiceAccount", "stroke-hospital-a"),
        ("Job", "stroke-hospital-a"),
        ("ServiceAccount", "stroke-hospital-b"),
        ("Job", "stroke-hospital-b"),
        ("NetworkPolicy", "stroke-default-deny"),
        ("NetworkPolicy", "stroke-server"),
        ("NetworkPolicy", "stroke-hospitals"),
    ]


def test_namespace_labels_and_owner_on_every_child(run: FederatedRun) -> None:
    for m in render_run(run):
        meta = m["metadata"]
        assert meta["namespace"] == "research"
        labels = meta["labels"]
        assert labels[c.LABEL_PART_OF] == "fedrun"
        assert labels[c.LABEL_MANAGED_BY] == "fedrun-operator"
        assert labels[c.LABEL_RUN] == "stroke"
        per_hospital = m["kind"] in ("ServiceAccount", "Job")
        if m["metadata"]["name"] == "stroke-default-deny":
            assert c.LABEL_COMPONENT not in labels  # it covers every pod of the run
        elif m["metadata"]["name"] == "stroke-hospitals":
            assert labels[c.LABEL_COMPONENT] == "hospital"
        else:
            assert labels[c.LABEL_COMPONENT] == ("hospital" if per_hospital else "server")
        if per_hospital:
            assert meta["name"] == f"stroke-{labels[c.LABEL_HOSPITAL]}"
        else:
            assert c.LABEL_HOSPITAL not in labels
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "fedrun.io/v1alpha1",
                "kind": "FederatedRun",
                "name": "stroke",
                "uid": "1234-abcd",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_owner_reference_has_no_uid_before_the_run_exists() -> None:
    obj = spec_obj()
    del obj["metadata"]["uid"]
    for m in render_run(parse_run(obj)):
        (ref,) = m["metadata"]["ownerReferences"]
        assert "uid" not in ref
        assert ref["name"] == "stroke"
        assert ref["controller"] is True


def test_config_map_holds_the_spec(run: FederatedRun, children: dict[Any, Manifest]) -> None:
    data = children[("ConfigMap", "stroke-config")]["data"]
    assert list(data) == ["config.json"]
    config = json.loads(data["config.json"])
    assert config["apiVersion"] == "fedrun.io/v1alpha1"
    assert config["kind"] == "FederatedRun"
    # The uid: the hospitals key their privacy ledgers by it.
    assert config["metadata"] == {
        "name": "stroke",
        "namespace": "research",
        "uid": run.metadata.uid,
    }
    assert run.metadata.uid
    assert config["spec"]["minHospitals"] == 2  # camelCase, as in YAML
    assert parse_run(config).spec == run.spec  # the pods read back the same run


def test_server_deployment(children: dict[Any, Manifest]) -> None:
    deployment = children[("Deployment", "stroke-server")]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    selector = spec["selector"]["matchLabels"]
    assert selector == {c.LABEL_RUN: "stroke", c.LABEL_COMPONENT: "server"}
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] == "server"
    assert container["image"] == "ghcr.io/fedrun/trainer:0.1.0"
    assert "command" not in container  # the image's entrypoint (tini) stays PID 1
    assert container["args"] == [
        "fedrun",
        "server",
        "--config",
        "/etc/fedrun/config.json",
        "--state-dir",
        "/var/lib/fedrun",
        "--fleet-port",
        "9092",
        "--status-port",
        "9100",
        "--tls-dir",
        "/var/run/secrets/fedrun",
    ]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "fleet": 9092,
        "status": 9100,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "status"}


def test_server_service(children: dict[Any, Manifest]) -> None:
    service = children[("Service", "stroke-server")]["spec"]
    deployment = children[("Deployment", "stroke-server")]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == deployment["selector"]["matchLabels"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["ports"]] == [
        ("fleet", 9092, "fleet"),
        ("status", 9100, "status"),
    ]


def test_service_type_follows_the_spec() -> None:
    run = make_run(server={"serviceType": "LoadBalancer"})
    assert by_kind_name(render_run(run))[("Service", "stroke-server")]["spec"]["type"] == (
        "LoadBalancer"
    )


def test_no_checkpoint_claim_unless_the_spec_asks(children: dict[Any, Manifest]) -> None:
    assert not [k for k in children if k[0] == "PersistentVolumeClaim"]
    pod = children[("Deployment", "stroke-server")]["spec"]["template"]["spec"]
    assert "--checkpoint-dir" not in pod["containers"][0]["args"]


@pytest.mark.parametrize("storage_class", [None, "gp3"])
def test_a_checkpoint_volume_is_a_claim_the_server_mounts(storage_class: str | None) -> None:
    volume: dict[str, Any] = {"size": "2Gi"}
    if storage_class:
        volume["storageClassName"] = storage_class
    manifests = render_run(make_run(server={"checkpointVolume": volume}))
    kinds = [m["kind"] for m in manifests]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")  # before its user
    claim = by_kind_name(manifests)[("PersistentVolumeClaim", "stroke-checkpoint")]
    assert claim["metadata"]["ownerReferences"][0]["controller"] is True
    expected: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "2Gi"}},
    }
    if storage_class:
        expected["storageClassName"] = storage_class
    assert claim["spec"] == expected
    deployment = by_kind_name(manifests)[("Deployment", "stroke-server")]["spec"]
    assert deployment["strategy"] == {"type": "Recreate"}  # the old pod lets go of the volume
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-2:] == ["--checkpoint-dir", c.CHECKPOINT_DIR]
    assert {"name": "checkpoint", "mountPath": c.CHECKPOINT_DIR} in container["volumeMounts"]
    assert {
        "name": "checkpoint",
        "persistentVolumeClaim": {"claimName": "stroke-checkpoint"},
    } in pod["volumes"]


def test_a_checkpoint_volume_size_must_be_a_quantity() -> None:
    for size in ("lots", "0", "-1Gi", "0Gi"):
        with pytest.raises(ValueError, match=r"checkpointVolume\.size"):
            make_run(server={"checkpointVolume": {"size": size}})
    with pytest.raises(ValueError, match=r"checkpointVolume\.storageClassName"):
        make_run(server={"checkpointVolume": {"storageClassName": "Not A Class"}})


def test_service_accounts_and_irsa(children: dict[Any, Manifest]) -> None:
    a = children[("ServiceAccount", "stroke-hospital-a")]
    b = children[("ServiceAccount", "stroke-hospital-b")]
    assert a["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/fedrun-hospital-a"
    }
    assert "annotations" not in b["metadata"]
    assert a["automountServiceAccountToken"] is False
    assert b["automountServiceAccountToken"] is False


def test_hospital_jobs(children: dict[Any, Manifest]) -> None:
    job = children[("Job", "stroke-hospital-a")]
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["suspend"] is False
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "stroke-hospital-a"
    assert pod["restartPolicy"] == "OnFailure"  # keeps the emptyDir ledger across restarts
    assert job["spec"]["template"]["metadata"]["labels"][c.LABEL_HOSPITAL] == "hospital-a"
    (container,) = pod["containers"]
    assert container["name"] == "hospital"
    assert "command" not in container
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["args"] == [
        "fedrun",
        "client",
        "--config",
        "/etc/fedrun/config.json",
        "--hospital",
        "hospital-a",
        "--server",
        "stroke-server:9092",
        "--state-dir",
        "/var/lib/fedrun",
        "--termination-log",
        "/dev/termination-log",
        "--tls-dir",
        "/var/run/secrets/fedrun",
    ]
    assert "ports" not in container


def _secret_mount(workload: Manifest) -> tuple[str, dict[str, Any]] | None:
    """(secretName, mount) of the pod's Secret volume, or None."""
    pod = workload["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    if not secrets:
        return None
    ((volume, secret),) = secrets.items()
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
    assert secret["defaultMode"] == 0o440  # nobody may write, others may not read
    return secret["secretName"], mount


def test_each_pod_mounts_only_its_own_secret_read_only(children: dict[Any, Manifest]) -> None:
    from fedrun_render.security import hospital_auth_secret_name, server_tls_secret_name

    run = make_run()
    mounts = {
        key[1]: _secret_mount(m) for key, m in children.items() if key[0] in ("Deployment", "Job")
    }
    expected = {
        "stroke-server": server_tls_secret_name(run),
        "stroke-hospital-a": hospital_auth_secret_name(run, "hospital-a"),
        "stroke-hospital-b": hospital_auth_secret_name(run, "hospital-b"),
    }
    assert {name: m[0] for name, m in mounts.items() if m} == expected
    for mounted in mounts.values():
        assert mounted is not None
        assert mounted[1] == {
            "name": "tls",
            "mountPath": "/var/run/secrets/fedrun",
            "readOnly": True,
        }


def test_an_insecure_run_mounts_no_secret_and_says_insecure() -> None:
    run = make_run(security={"insecure": True})
    for m in render_run(run):
        if m["kind"] in ("Deployment", "Job"):
            assert _secret_mount(m) is None
            args = m["spec"]["template"]["spec"]["containers"][0]["args"]
            assert "--insecure" in args
            assert "--tls-dir" not in args


def test_hospital_scheduling_and_resources_come_from_the_spec(
    children: dict[Any, Manifest],
) -> None:
    a = children[("Job", "stroke-hospital-a")]["spec"]["template"]["spec"]
    b = children[("Job", "stroke-hospital-b")]["spec"]["template"]["spec"]
    assert a["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert a["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert a["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": 2},
    }
    assert "nodeSelector" not in b
    assert "tolerations" not in b
    assert "resources" not in b["containers"][0]


def test_server_resources_come_from_the_spec() -> None:
    run = make_run(server={"resources": {"limits": {"memory": "2Gi"}}})
    deployment = by_kind_name(render_run(run))[("Deployment", "stroke-server")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"memory": "2Gi"}}


def test_every_pod_is_restricted(run: FederatedRun) -> None:
    specs = pods(render_run(run))
    assert len(specs) == 3
    for pod in specs:
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in security


def test_every_pod_mounts_config_state_and_tmp(run: FederatedRun) -> None:
    for pod in pods(render_run(run)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"] == {"name": "config", "configMap": {"name": "stroke-config"}}
        assert volumes["state"]["emptyDir"] == {}
        assert volumes["tmp"]["emptyDir"] == {}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/etc/fedrun"] == {
            "name": "config",
            "mountPath": "/etc/fedrun",
            "readOnly": True,
        }
        assert mounts["/var/lib/fedrun"]["name"] == "state"
        assert mounts["/tmp"]["name"] == "tmp"


def test_every_container_gets_the_environment(run: FederatedRun) -> None:
    for pod in pods(render_run(run)):
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["FEDRUN_RUN"] == "stroke"
        assert env["FEDRUN_NAMESPACE"] == "research"
        assert env["FLWR_TELEMETRY_ENABLED"] == "0"
        assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
        assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
        assert env["HOME"] == "/tmp"
        assert all(isinstance(v, str) for v in env.values())


def test_suspend_scales_the_server_to_zero_and_suspends_jobs() -> None:
    manifests = render_run(make_run(suspend=True))
    for m in manifests:
        if m["kind"] == "Deployment":
            assert m["spec"]["replicas"] == 0
        if m["kind"] == "Job":
            assert m["spec"]["suspend"] is True


def test_config_hash_follows_the_config() -> None:
    def hashes(run: FederatedRun) -> set[str]:
        return {
            m["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
            for m in render_run(run)
            if m["kind"] in ("Deployment", "Job")
        }

    first, same, other = make_run(), make_run(), make_run(rounds=6)
    assert len(hashes(first)) == 1
    assert hashes(first) == hashes(same)
    assert hashes(first) != hashes(other)


def test_rendering_is_deterministic() -> None:
    obj = spec_obj()
    shuffled = copy.deepcopy(obj)
    shuffled["spec"] = dict(reversed(list(shuffled["spec"].items())))
    texts = {to_yaml(render_run(parse_run(o))) for o in (obj, copy.deepcopy(obj), shuffled)}
    assert len(texts) == 1


def test_to_yaml_is_multi_document_and_round_trips(run: FederatedRun) -> None:
    manifests = render_run(run)
    text = to_yaml(manifests)
    assert text.startswith("---\napiVersion: v1\nkind: ConfigMap\n")
    assert text.count("\n---\n") == len(manifests) - 1
    assert list(yaml.safe_load_all(text)) == manifests
    assert "config.json: |" in text  # the JSON stays readable in review
    assert "&id" not in text


def test_operator_namespace_changes_only_who_may_read_the_status_port(run: FederatedRun) -> None:
    default = render_run(run)
    pinned = render_run(run, operator_namespace="platform-ops")
    assert render_run(run, operator_namespace="platform-ops") == pinned  # still pure
    changed = [
        (a["kind"], a["metadata"]["name"]) for a, b in zip(default, pinned, strict=True) if a != b
    ]
    assert changed == [("NetworkPolicy", "stroke-server")]
    status = by_kind_name(pinned)[("NetworkPolicy", "stroke-server")]["spec"]["ingress"][1]
    assert status["ports"] == [{"protocol": "TCP", "port": c.STATUS_PORT}]
    (peer,) = status["from"]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "platform-ops"}
    }


def test_render_does_not_change_the_run(run: FederatedRun) -> None:
    before = run.model_dump()
    render_run(run)
    assert run.model_dump() == before


def test_config_json_is_stable() -> None:
    assert config_json(make_run()) == config_json(make_run())
    assert config_json(make_run()).endswith("}\n")


@pytest.mark.parametrize("name", ["federatedrun.yaml", "federatedrun-local.yaml"])
def test_examples_render(name: str) -> None:
    run = load_run(ROOT / "examples" / name)
    manifests = render_run(run)
    assert len(manifests) == 3 + 2 * len(run.spec.hospitals) + 3  # + 3 NetworkPolicies
    for m in manifests:
        assert len(m["metadata"]["name"]) <= 63
