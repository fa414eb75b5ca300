"""The generated CRD: no drift, structural, and it admits and refuses what the models do.

There is no API server here, so `admit` (fedrun_render.admission, shared with the emulated API
server in tests/kube/) does what kube-apiserver does with a custom resource, in its order:
prune nulls, apply schema defaults, validate the OpenAPI schema (with kubectl's strict field
validation: unknown fields are errors), then evaluate every `x-kubernetes-validations` rule
with cel-python, numbers typed as the schema says.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core import api
from fedrun_render.admission import CEL, admit, apply_defaults, evaluate
from fedrun_render.crd import build_crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "federatedrun.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("federatedrun*.yaml"))

CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "rounds": 3,
            "minHospitals": 2,
            "data": {"preset": "stroke"},
            "hospitals": [
                {"name": "a", "dataUri": "file:///data/a.csv"},
                {"name": "b", "dataUri": "s3://bucket-b/b.csv"},
            ],
        },
    }


def changed(path: str, value: Any, obj: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = copy.deepcopy(obj if obj is not None else minimal())
    node: Any = obj
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return obj


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key in ("default", "x-kubernetes-validations", "enum"):
                continue
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# --------------------------------------------------------------------------- the file


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == crd_yaml(), (
        "crds/federatedrun.yaml is stale: run `python -m fedrun_render.crd > "
        "crds/federatedrun.yaml`"
    )


def test_generation_is_deterministic() -> None:
    assert crd_yaml() == crd_yaml()
    assert yaml.safe_load(crd_yaml()) == CRD


def test_names_scope_and_subresources() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "federatedruns.fedrun.io"
    assert spec["group"] == "fedrun.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "FederatedRun"
    assert spec["names"]["plural"] == "federatedruns"
    assert spec["names"]["shortNames"] == ["fedrun", "fr"]
    assert VERSION["name"] == "v1alpha1"
    assert VERSION["served"]
    assert VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"].upper(): c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["PHASE", "ROUND", "EPSILON", "AUROC", "AGE"]
    assert columns["PHASE"]["jsonPath"] == ".status.phase"
    assert columns["ROUND"]["jsonPath"] == ".status.progress"
    assert columns["EPSILON"]["jsonPath"] == ".status.privacy.epsilonSpent"
    assert columns["AUROC"]["jsonPath"] == ".status.metrics.auroc"
    assert columns["AGE"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def test_schema_is_structural() -> None:
    for path, node in walk(SCHEMA):
        if path.endswith(".properties") or path.endswith(".anyOf[0]") or ".anyOf[" in path:
            continue
        assert "$ref" not in node, path
        assert "$defs" not in node, path
        assert "nullable" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "title" not in node, path
        if "anyOf" in node:  # only int-or-string may use anyOf
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
        if node.get("type") == "object" and path != ".properties.metadata":
            assert "properties" in node or "additionalProperties" in node, path
        if node.get("type") in ("number", "integer") and "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path
            assert "minimum" in node, path


def test_no_field_preserves_unknown_fields() -> None:
    preserving = [p for p, n in walk(SCHEMA) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserving == []


def test_every_spec_field_is_described() -> None:
    fields = [
        (path, node)
        for path, node in walk(SCHEMA["properties"]["spec"])
        if re.search(r"\.properties\.\w+$", path)
    ]
    assert len(fields) > 50
    for path, node in fields:
        assert node.get("description"), f"spec{path} has no description"


def test_ranges_and_enums_reach_the_schema() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    privacy = spec["privacy"]["properties"]
    assert privacy["targetEpsilon"]["minimum"] == 0
    assert privacy["targetEpsilon"]["exclusiveMinimum"] is True
    assert privacy["delta"]["maximum"] == 0.01  # MAX_DELTA: a larger δ promises little
    assert "exclusiveMaximum" not in privacy["delta"]
    assert privacy["accountant"]["enum"] == ["rdp", "prv"]
    assert spec["strategy"]["properties"]["name"]["enum"] == ["FedAvg", "FedProx", "FedAdam"]
    assert spec["rounds"]["minimum"] == 1
    assert spec["rounds"]["maximum"] == 1000
    assert spec["hospitals"]["maxItems"] == 50
    assert spec["hospitals"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["hospitals"]["items"]["properties"]["name"]["pattern"] == api.DNS1123_LABEL
    assert SCHEMA["properties"]["spec"]["required"] == ["rounds", "data", "hospitals"]


def test_every_rule_compiles() -> None:
    rules = [r for _, n in walk(SCHEMA) for r in n.get("x-kubernetes-validations", [])]
    rules += SCHEMA["x-kubernetes-validations"]
    assert len(rules) >= 15
    for rule in rules:
        CEL.compile(rule["rule"])
        assert rule["message"]


# --------------------------------------------------------------------------- admission


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(path: Path) -> None:
    obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert admit(obj) == []


def test_minimal_run_is_admitted_and_defaulted() -> None:
    assert admit(minimal()) == []
    defaulted = apply_defaults(SCHEMA, minimal())
    assert defaulted["spec"]["privacy"]["targetEpsilon"] == 1.0
    assert defaulted["spec"]["strategy"]["name"] == "FedAvg"
    # The schema's defaults are the models' defaults.
    model = api.parse_run(minimal()).spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert defaulted["spec"] == model


def test_null_means_unset() -> None:
    obj = changed("spec.privacy", {"noiseMultiplier": None, "targetEpsilon": 2.0})
    assert admit(obj) == []
    api.parse_run(obj)


# Each bad run must be refused by BOTH the models and the CRD, each naming the field.
BAD: list[tuple[str, Any, str]] = [
    ("spec.trainng", {"model": "mlp"}, "spec"),
    ("spec.privacy.targetEpsilon", -1.0, "spec.privacy.targetEpsilon"),
    ("spec.privacy.delta", 1.5, "spec.privacy.delta"),
    ("spec.privacy.delta", 0.5, "spec.privacy.delta"),
    ("spec.privacy.delta", 0, "spec.privacy.delta"),
    ("spec.privacy.noiseMultiplier", 0, "spec.privacy.noiseMultiplier"),
    ("spec.privacy.accountant", "gdp", "spec.privacy.accountant"),
    ("spec.minHospitals", 3, "spec.minHospitals"),
    ("spec.rounds", 0, "spec.rounds"),
    ("spec.strategy", {"name": "FedSGD"}, "spec.strategy.name"),
    ("spec.strategy", {"proximalMu": 0.1}, "spec.strategy.proximalMu"),
    ("spec.strategy", {"name": "FedProx", "serverLearningRate": 0.1}, "spec.strategy."),
    ("spec.training", {"hiddenSizes": [8]}, "spec.training.hiddenSizes"),
    ("spec.data", {"targetColumn": "y"}, "spec.data.features"),
    ("spec.data", {"features": [{"name": "a", "type": "numeric"}]}, "spec.data.targetColumn"),
    (
        "spec.data",
        {"preset": "stroke", "features": [{"name": "a", "type": "numeric"}]},
        "spec.data",
    ),
    (
        "spec.data",
        {"targetColumn": "a", "features": [{"name": "a", "type": "numeric"}]},
        "spec.data",
    ),
    (
        "spec.data",
        {"targetColumn": "y", "features": [{"name": "s", "type": "categorical"}]},
        "spec.data.features[0].categories",
    ),
    (
        "spec.data",
        {"targetColumn": "y", "features": [{"name": "a", "type": "numeric", "min": 3, "max": 1}]},
        "spec.data.features[0].min",
    ),
    (
        "spec.data",
        {
            "targetColumn": "y",
            "features": [{"name": "s", "type": "categorical", "categories": ["a", "b", "a"]}],
        },
        "spec.data.features",
    ),
    ("spec.hospitals.1.name", "a", "spec.hospitals"),
    ("spec.hospitals.0.name", "Hospital_A", "spec.hospitals"),
    ("spec.hospitals.0.dataUri", "http://x/a.csv", "spec.hospitals"),
    ("spec.hospitals.0.roleArn", "role/x", "spec.hospitals"),
    ("spec.hospitals.0.resources", {"requests": {"cpu": "lots"}}, "spec.hospitals"),
    ("spec.hospitals", [], "spec.hospitals"),
    ("spec.server", {"serviceType": "Ingress"}, "spec.server.serviceType"),
    # Pod settings: nothing that weakens the pod's security exists, fedrun's own labels,
    # annotations, variables, volumes and mount paths are not for the taking.
    ("spec.server", {"securityContext": {"privileged": True}}, "spec.server"),
    ("spec.server", {"hostNetwork": True}, "spec.server"),
    (
        "spec.hospitalDefaults",
        {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]},
        "spec.hospitalDefaults.volumes",
    ),
    ("spec.server.labels", {"fedrun.io/run": "other"}, "spec.server.labels"),
    ("spec.server.labels", {"bad key": "x"}, "spec.server.labels"),
    ("spec.server.annotations", {"fedrun.io/config-hash": "x"}, "spec.server.annotations"),
    ("spec.hospitals.0.env", [{"name": "FEDRUN_HOSPITAL", "value": "b"}], "spec.hospitals[0].env"),
    (
        "spec.hospitals.0.env",
        [{"name": "X", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "spec.hospitals[0].env[0].valueFrom",
    ),
    (
        "spec.hospitalDefaults",
        {"volumes": [{"name": "state", "emptyDir": {}}]},
        "spec.hospitalDefaults.volumes",
    ),
    (
        "spec.hospitalDefaults",
        {"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]},
        "spec.hospitalDefaults.volumes[0]",
    ),
    (
        "spec.server",
        {
            "volumes": [{"name": "v", "emptyDir": {}}],
            "volumeMounts": [{"name": "v", "mountPath": "/var/lib"}],
        },
        "spec.server.volumeMounts",
    ),
    (
        "spec.server",
        {
            "volumes": [{"name": "v", "emptyDir": {}}],
            "volumeMounts": [{"name": "w", "mountPath": "/mnt/w"}],
        },
        "spec.server.volumeMounts",
    ),
    (
        "spec.server",
        {"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]},
        "spec.server.envFrom[0]",
    ),
    ("spec.server", {"priorityClassName": "High"}, "spec.server.priorityClassName"),
    ("metadata.name", "Demo", "metadata.name"),
    ("metadata.name", "x" * 57, "metadata.name"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD)
def test_bad_runs_are_refused_by_models_and_crd(path: str, value: Any, field: str) -> None:
    obj = changed(path, value)
    refused = admit(obj)
    assert refused, f"the CRD admits {path}={value!r}"
    assert any(field in p for p in refused), refused
    with pytest.raises(api.SpecError):
        api.parse_run(obj)


def test_duplicate_hospital_names_are_refused_by_cel() -> None:
    obj = changed("spec.hospitals.1.name", "a")
    assert admit(obj) == ["spec.hospitals: hospital names must be unique"]


def test_min_hospitals_rule_names_the_field() -> None:
    assert admit(changed("spec.minHospitals", 3)) == [
        "spec.minHospitals: minHospitals must not exceed the number of hospitals"
    ]


def test_noise_multiplier_rule() -> None:
    rule = SCHEMA["properties"]["spec"]["properties"]["privacy"]["x-kubernetes-validations"][0]
    assert "noiseMultiplier" in rule["rule"]
    assert evaluate(rule["rule"], {"noiseMultiplier": 1.2})
    assert evaluate(rule["rule"], {})
    assert not evaluate(rule["rule"], {"noiseMultiplier": 0.0})
    assert not evaluate(rule["rule"], {"noiseMultiplier": -1.0})


def test_child_names_must_fit() -> None:
    obj = changed("metadata.name", "x" * 50)
    obj["spec"]["hospitals"][1]["name"] = "hospital-b-123"
    assert admit(obj) == [
        ".spec.hospitals: <run>-<hospital> must be at most 63 characters: shorten the run "
        "or hospital names"
    ]
    obj["spec"]["hospitals"][1]["name"] = "hospital-b"
    assert admit(obj) == []


# --------------------------------------------------------------------------- immutability


def with_phase(obj: dict[str, Any], phase: str) -> dict[str, Any]:
    return {**copy.deepcopy(obj), "status": {"phase": phase}}


IMMUTABLE = ".spec: spec is immutable while the run is Running; only spec.suspend may change"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.rounds", 4),
        ("spec.privacy.targetEpsilon", 5.0),
        ("spec.hospitals.0.dataUri", "file:///data/other.csv"),
        ("spec.image", "ghcr.io/fedrun/trainer:0.2.0"),
        ("spec.activeDeadlineSeconds", 60),
        ("spec.strategy", {"name": "FedProx"}),
    ],
)
def test_spec_is_immutable_while_running(path: str, value: Any) -> None:
    old = with_phase(minimal(), "Running")
    new = changed(path, value, old)
    assert admit(new, old) == [IMMUTABLE]


def test_removing_an_optional_field_while_running_is_refused() -> None:
    old = with_phase(changed("spec.activeDeadlineSeconds", 60), "Running")
    new = copy.deepcopy(old)
    del new["spec"]["activeDeadlineSeconds"]
    assert admit(new, old) == [IMMUTABLE]


def test_suspend_may_change_while_running() -> None:
    old = with_phase(minimal(), "Running")
    assert admit(changed("spec.suspend", True, old), old) == []
    assert admit(copy.deepcopy(old), old) == []  # metadata-only updates (finalizers, ...)


@pytest.mark.parametrize("phase", ["Pending", "Suspended", "Succeeded", "Failed", None])
def test_spec_may_change_when_not_running(phase: str | None) -> None:
    old = minimal() if phase is None else with_phase(minimal(), phase)
    assert admit(changed("spec.rounds", 10, old), old) == []


def test_immutability_rule_covers_every_spec_field_but_suspend() -> None:
    rule = SCHEMA["x-kubernetes-validations"][-1]["rule"]
    compared = set(re.findall(r"self\.spec\.(\w+) == oldSelf\.spec\.\w+", rule))
    assert compared == set(SCHEMA["properties"]["spec"]["properties"]) - {"suspend"}
