"""Pod settings of a run (spec.server, spec.hospitalDefaults, spec.hospitals[], and the
cluster's defaults from the chart's runDefaults): they reach the rendered pods, merge as
docs/operator.md says, cannot take what fedrun relies on, and leave every pod restricted.

What the CRD refuses is in tests/unit/test_crd.py's BAD list (checked on the real API
server by tests/cluster/test_crd.py); tests/cluster/test_pod_security.py has the real API
server's Pod Security admission admit these pods.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from fedrun_core import names as c
from fedrun_core.api import PodDefaults, merge_pod_settings, parse_pod_defaults, parse_run
from fedrun_local.runner import cluster_only
from fedrun_operator.config import POD_DEFAULTS_ENV, OperatorConfig
from fedrun_operator.handlers.reconcile_run import applied_pod_defaults
from fedrun_render.workloads import render_run

from ..chart.tools import restricted_violations

Manifest = dict[str, Any]

#: Every pod setting, as a hospital's own (and, less of it, the server's).
EVERY_SETTING: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"kubernetes.io/os": "linux", "pool": "gpu"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {"fedrun.io/component": "hospital"}},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        },
    },
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "research-high",
    "labels": {"team": "cardio"},
    "annotations": {"example.com/owner": "cardio"},
    "env": [
        {"name": "MLFLOW_TRACKING_USERNAME", "value": "fedrun"},
        {
            "name": "MLFLOW_TRACKING_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}},
        },
        {
            "name": "REGION",
            "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region", "optional": True}},
        },
    ],
    "envFrom": [{"secretRef": {"name": "mlflow-extra"}, "prefix": "EXTRA_"}],
    "volumes": [
        {"name": "mlflow-ca", "secret": {"secretName": "mlflow-ca", "defaultMode": 0o440}},
        {"name": "site", "configMap": {"name": "site", "items": [{"key": "a", "path": "a.txt"}]}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "extra", "persistentVolumeClaim": {"claimName": "extra", "readOnly": True}},
        {"name": "vault", "csi": {"driver": "secrets-store.csi.k8s.io", "readOnly": True}},
    ],
    "volumeMounts": [
        {"name": "mlflow-ca", "mountPath": "/etc/mlflow-ca", "readOnly": True},
        {"name": "site", "mountPath": "/etc/site", "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "extra", "mountPath": "/mnt/extra", "readOnly": True},
        {"name": "vault", "mountPath": "/mnt/vault", "readOnly": True},
    ],
    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
}

SERVER_SETTINGS: dict[str, Any] = {
    "priorityClassName": "research-high",
    "labels": {"team": "cardio"},
    "env": [
        {
            "name": "MLFLOW_TRACKING_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}},
        }
    ],
    "volumes": [{"name": "mlflow-ca", "secret": {"secretName": "mlflow-ca"}}],
    "volumeMounts": [{"name": "mlflow-ca", "mountPath": "/etc/mlflow-ca", "readOnly": True}],
}


def run_obj(**spec: Any) -> dict[str, Any]:
    """A secure run whose hospital a has every setting and reads a PersistentVolumeClaim,
    whose server has some; `spec` replaces parts of the spec."""
    base: dict[str, Any] = {
        "rounds": 2,
        "minHospitals": 2,
        "data": {"preset": "stroke"},
        "server": copy.deepcopy(SERVER_SETTINGS),
        "hospitals": [
            {"name": "a", "dataUri": "pvc://site-a/stroke.csv", **copy.deepcopy(EVERY_SETTING)},
            {"name": "b", "dataUri": "s3://bucket-b/stroke.csv"},
        ],
    }
    base.update(spec)
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "stroke", "namespace": "research", "uid": "u-1"},
        "spec": base,
    }


def templates(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Pod templates of the rendered Deployment and Jobs, by workload name."""
    return {
        m["metadata"]["name"]: m["spec"]["template"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
    }


def by_name(items: list[dict[str, Any]], key: str = "name") -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


# --------------------------------------------------------------------------- rendering


def test_every_setting_reaches_the_hospital_pod() -> None:
    template = templates(render_run(parse_run(run_obj())))["stroke-a"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "gpu"}
    assert pod["affinity"] == EVERY_SETTING["affinity"]
    assert pod["tolerations"] == EVERY_SETTING["tolerations"]
    assert pod["priorityClassName"] == "research-high"
    assert template["metadata"]["labels"]["team"] == "cardio"
    assert template["metadata"]["annotations"]["example.com/owner"] == "cardio"
    env = by_name(container["env"])
    for var in EVERY_SETTING["env"]:
        assert env[var["name"]] == var
    assert container["envFrom"] == EVERY_SETTING["envFrom"]
    volumes = by_name(pod["volumes"])
    for volume in EVERY_SETTING["volumes"]:
        assert volumes[volume["name"]] == volume
    mounts = by_name(container["volumeMounts"], "mountPath")
    for mount in EVERY_SETTING["volumeMounts"]:
        assert mounts[mount["mountPath"]] == mount
    assert container["resources"] == EVERY_SETTING["resources"]


def test_fedrun_keeps_its_own_labels_env_volumes_and_security() -> None:
    bare = run_obj()
    bare["spec"]["server"] = {}
    bare["spec"]["hospitals"][0] = {"name": "a", "dataUri": "pvc://site-a/stroke.csv"}
    before = templates(render_run(parse_run(bare)))
    after = templates(render_run(parse_run(run_obj())))
    for name in ("stroke-server", "stroke-a"):
        old, new = before[name], after[name]
        assert old["metadata"]["labels"].items() <= new["metadata"]["labels"].items()
        # (the config hash differs: the settings are part of the spec)
        assert old["metadata"]["annotations"].keys() <= new["metadata"]["annotations"].keys()
        assert new["spec"]["securityContext"] == old["spec"]["securityContext"]
        assert new["spec"]["automountServiceAccountToken"] is False
        old_c, new_c = old["spec"]["containers"][0], new["spec"]["containers"][0]
        assert new_c["securityContext"] == old_c["securityContext"]
        # fedrun's variables, volumes and mounts come first and are unchanged.
        assert new_c["env"][: len(old_c["env"])] == old_c["env"]
        assert new["spec"]["volumes"][: len(old["spec"]["volumes"])] == old["spec"]["volumes"]
        n = len(old_c["volumeMounts"])
        assert new_c["volumeMounts"][:n] == old_c["volumeMounts"]


def test_every_pod_with_every_setting_is_restricted() -> None:
    pods = templates(render_run(parse_run(run_obj())))
    assert len(pods) == 3
    for name, template in pods.items():
        assert restricted_violations(template["spec"]) == [], name


def test_the_reserved_names_cover_what_fedrun_puts_in_its_pods() -> None:
    """The rules refuse fedrun's own variables, volumes and mount paths by these lists: a
    new one in rendering that the lists lack would be open to a run's settings."""
    bare = run_obj(server={})
    bare["spec"]["hospitals"][0] = {
        "name": "a",
        "dataUri": "pvc://site-a/stroke.csv",
        "ledgerUri": "pvc://ledgers/a.json",
    }
    for name, template in templates(render_run(parse_run(bare))).items():
        (container,) = template["spec"]["containers"]
        for var in container["env"]:
            assert var["name"].startswith(c.ENV_PREFIX) or var["name"] in c.POD_ENV, name
        for volume in template["spec"]["volumes"]:
            assert volume["name"] in c.POD_VOLUMES, name
        for mount in container["volumeMounts"]:
            path = mount["mountPath"]
            assert any(path == p or path.startswith(p + "/") for p in c.POD_MOUNT_PATHS), path
        for key in template["metadata"]["labels"]:
            assert key in c.POD_LABELS or key.startswith(c.RESERVED_KEY_PREFIX), key
        for key in template["metadata"]["annotations"]:
            assert key.startswith(c.RESERVED_KEY_PREFIX), key
        if "--termination-log" in container["args"]:
            log = container["args"][container["args"].index("--termination-log") + 1]
            assert log in c.POD_MOUNT_PATHS


# --------------------------------------------------------------------------- merging


def test_hospital_settings_merge_over_the_defaults() -> None:
    obj = run_obj(
        hospitalDefaults={
            "nodeSelector": {"pool": "cpu", "disk": "ssd"},
            "labels": {"team": "all", "site": "eu"},
            "env": [
                {"name": "MLFLOW_TRACKING_USERNAME", "value": "default"},
                {"name": "LOG", "value": "info"},
            ],
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "priorityClassName": "research-low",
            "resources": {"requests": {"cpu": "500m", "ephemeral-storage": "1Gi"}},
        }
    )
    pods = templates(render_run(parse_run(obj)))
    a, b = pods["stroke-a"], pods["stroke-b"]
    a_container, b_container = a["spec"]["containers"][0], b["spec"]["containers"][0]
    # Maps merge key by key, the hospital's winning.
    assert a["spec"]["nodeSelector"] == {"disk": "ssd", "kubernetes.io/os": "linux", "pool": "gpu"}
    assert a["metadata"]["labels"]["team"] == "cardio"
    assert a["metadata"]["labels"]["site"] == "eu"
    assert a_container["resources"]["requests"] == {
        "cpu": "1",
        "memory": "2Gi",
        "ephemeral-storage": "1Gi",
    }
    # env merges by name: the hospital's value replaces the default's in place.
    names = [e["name"] for e in a_container["env"]]
    assert names.count("MLFLOW_TRACKING_USERNAME") == 1
    assert by_name(a_container["env"])["MLFLOW_TRACKING_USERNAME"]["value"] == "fedrun"
    assert by_name(a_container["env"])["LOG"]["value"] == "info"
    # Tolerations append; scalars are replaced.
    assert [t["key"] for t in a["spec"]["tolerations"]] == ["spot", "gpu"]
    assert a["spec"]["priorityClassName"] == "research-high"
    # A hospital without settings of its own gets the defaults as they are.
    assert b["spec"]["nodeSelector"] == {"disk": "ssd", "pool": "cpu"}
    assert b["spec"]["priorityClassName"] == "research-low"
    assert by_name(b_container["env"])["MLFLOW_TRACKING_USERNAME"]["value"] == "default"
    assert b_container["resources"] == {"requests": {"cpu": "500m", "ephemeral-storage": "1Gi"}}
    # The server is no hospital.
    assert "nodeSelector" not in pods["stroke-server"]["spec"]


def test_volumes_merge_by_name_and_mounts_by_path() -> None:
    first = parse_pod_defaults(
        json.dumps(
            {
                "hospital": {
                    "volumes": [{"name": "ca", "secret": {"secretName": "old-ca"}}],
                    "volumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}],
                    "envFrom": [{"secretRef": {"name": "x"}}],
                }
            }
        ),
        "test",
    ).hospital
    second = parse_pod_defaults(
        json.dumps(
            {
                "hospital": {
                    "volumes": [{"name": "ca", "secret": {"secretName": "new-ca"}}],
                    "volumeMounts": [{"name": "ca", "mountPath": "/etc/ca", "readOnly": True}],
                    "envFrom": [{"secretRef": {"name": "x"}}, {"configMapRef": {"name": "y"}}],
                }
            }
        ),
        "test",
    ).hospital
    merged = merge_pod_settings(first, None, second)
    assert [(v.name, v.secret.secret_name) for v in merged.volumes or [] if v.secret] == [
        ("ca", "new-ca")
    ]
    assert [(m.mount_path, m.read_only) for m in merged.volume_mounts or []] == [("/etc/ca", True)]
    assert len(merged.env_from or []) == 2  # the same entry once


def test_cluster_defaults_come_first_and_are_recorded_on_the_server() -> None:
    defaults = PodDefaults.model_validate(
        {
            "server": {"nodeSelector": {"pool": "system"}, "priorityClassName": "cluster"},
            "hospital": {
                "imagePullSecrets": [{"name": "cluster-regcred"}],
                "priorityClassName": "cluster",
            },
        }
    )
    obj = run_obj(hospitalDefaults={"priorityClassName": "run-wide"})
    manifests = render_run(parse_run(obj), pod_defaults=defaults)
    pods = templates(manifests)
    server = pods["stroke-server"]
    assert server["spec"]["nodeSelector"] == {"pool": "system"}
    assert server["spec"]["priorityClassName"] == "research-high"  # the run's own wins
    a, b = pods["stroke-a"]["spec"], pods["stroke-b"]["spec"]
    assert a["imagePullSecrets"] == [{"name": "cluster-regcred"}, {"name": "regcred"}]
    assert a["priorityClassName"] == "research-high"
    assert b["imagePullSecrets"] == [{"name": "cluster-regcred"}]
    assert b["priorityClassName"] == "run-wide"
    # The server's template records the defaults; the operator reads them back while the
    # run is Running, so a change of the chart's runDefaults leaves its pods alone.
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    assert applied_pod_defaults(deployment, PodDefaults()) == defaults
    plain = next(m for m in render_run(parse_run(obj)) if m["kind"] == "Deployment")
    assert c.ANNOTATION_POD_DEFAULTS not in plain["spec"]["template"]["metadata"]["annotations"]
    assert applied_pod_defaults(plain, defaults) == PodDefaults()
    assert applied_pod_defaults(None, defaults) == defaults


# --------------------------------------------------------------------------- the operator


def test_the_operator_reads_its_pod_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POD_DEFAULTS_ENV, json.dumps({"hospital": {"labels": {"team": "x"}}}))
    hospital = OperatorConfig.from_env().pod_defaults.hospital
    assert hospital is not None and hospital.labels == {"team": "x"}
    monkeypatch.delenv(POD_DEFAULTS_ENV)
    assert OperatorConfig.from_env().pod_defaults == PodDefaults()


@pytest.mark.parametrize(
    ("defaults", "field"),
    [
        ({"server": {"securityContext": {"privileged": True}}}, "server.securityContext"),
        ({"hospital": {"env": [{"name": "FEDRUN_RUN", "value": "x"}]}}, "hospital.env"),
        ({"hospital": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "hostPath"),
        ({"nodes": {}}, "nodes"),
    ],
)
def test_the_operator_refuses_bad_pod_defaults_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, defaults: dict[str, Any], field: str
) -> None:
    monkeypatch.setenv(POD_DEFAULTS_ENV, json.dumps(defaults))
    with pytest.raises(ValueError, match=POD_DEFAULTS_ENV) as refused:
        OperatorConfig.from_env()
    assert field in str(refused.value)


# --------------------------------------------------------------------------- fedrun local


def test_fedrun_local_names_the_settings_only_a_cluster_has() -> None:
    obj = run_obj()
    obj["spec"]["hospitals"][0]["dataUri"] = "file:///data/a.csv"
    problems = "\n".join(cluster_only(parse_run(obj)))
    assert "spec.server.volumes[0]" in problems
    assert "spec.server.env[0]: MLFLOW_TRACKING_PASSWORD" in problems
    assert "spec.hospitals[0].envFrom" in problems
    assert "spec.hospitals[0].volumes[2]" not in problems  # emptyDir runs locally
    local = run_obj(server={"env": [{"name": "LOG", "value": "debug"}]})
    local["spec"]["hospitals"] = [
        {
            "name": "a",
            "dataUri": "file:///data/a.csv",
            "volumes": [{"name": "shm", "emptyDir": {}}],
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            "priorityClassName": "high",
        },
        {"name": "b", "dataUri": "file:///data/b.csv"},
    ]
    assert cluster_only(parse_run(local)) == []
