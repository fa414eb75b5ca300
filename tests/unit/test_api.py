"""The FederatedRun models: good runs load, every bad one is refused naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core.api import (
    FederatedRun,
    FederatedRunStatus,
    Phase,
    SpecError,
    ledger_uri,
    load_run,
    parse_run,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("federatedrun*.yaml"))


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "demo"},
        "spec": {
            "rounds": 3,
            "minHospitals": 2,
            "data": {"preset": "stroke"},
            "hospitals": [
                {"name": "a", "dataUri": "file:///data/a.csv"},
                {"name": "b", "dataUri": "s3://bucket-b/data/b.csv"},
            ],
        },
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    """`minimal()` with the dotted `path` set to `value` (a path part may be a list index)."""
    obj = minimal()
    node: Any = obj
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return obj


def problems(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_run(obj)
    assert str(info.value).startswith("invalid FederatedRun")
    return info.value.problems


# (change, the YAML path the message must start with, a phrase the message must carry)
BAD: list[tuple[str, Any, str, str]] = [
    ("spec.trainng", {"model": "mlp"}, "spec.trainng", "unknown field (did you mean 'training'?)"),
    ("spec.privacy.targetEpsilon", -1, "spec.privacy.targetEpsilon", "must be greater than 0"),
    ("spec.privacy.targetEpsilon", 0, "spec.privacy.targetEpsilon", "must be greater than 0"),
    ("spec.privacy.delta", 0.5, "spec.privacy.delta", "must be less than or equal to 0.01"),
    ("spec.privacy.delta", 0, "spec.privacy.delta", "must be greater than 0"),
    ("spec.privacy.noiseMultiplier", 0, "spec.privacy.noiseMultiplier", "greater than 0"),
    ("spec.privacy.accountant", "gdp", "spec.privacy.accountant", "'rdp' or 'prv'"),
    ("spec.privacy.epsilon", 1, "spec.privacy.epsilon", "unknown field"),
    ("spec.minHospitals", 3, "spec.minHospitals", "must not exceed the number of hospitals"),
    ("spec.minHospitals", 0, "spec.minHospitals", "greater than or equal to 1"),
    ("spec.rounds", 0, "spec.rounds", "greater than or equal to 1"),
    ("spec.rounds", 1001, "spec.rounds", "less than or equal to 1000"),
    ("spec.strategy", {"name": "FedSGD"}, "spec.strategy.name", "'FedAvg', 'FedProx' or 'FedAdam'"),
    ("spec.strategy", {"proximalMu": 0.1}, "spec.strategy.proximalMu", "only meaningful for"),
    (
        "spec.strategy",
        {"name": "FedProx", "serverLearningRate": 0.1},
        "spec.strategy.server",
        "only",
    ),
    ("spec.training", {"hiddenSizes": [8]}, "spec.training.hiddenSizes", "only meaningful for"),
    ("spec.training", {"testFraction": 1}, "spec.training.testFraction", "less than 1"),
    ("spec.training", {"batchSize": "big"}, "spec.training.batchSize", "valid integer"),
    ("spec.data", {"format": "xlsx", "preset": "stroke"}, "spec.data.format", "'csv' or 'parquet'"),
    ("spec.data", {"features": [{"name": "age", "type": "numeric"}]}, "spec.data.targetColumn", ""),
    ("spec.data", {"targetColumn": "y"}, "spec.data.features", "required unless a preset"),
    (
        "spec.data",
        {"targetColumn": "y", "features": [{"name": "s", "type": "categorical"}]},
        "spec.data.features[0].categories",
        "needs its categories",
    ),
    (
        "spec.data",
        {"targetColumn": "y", "features": [{"name": "a", "type": "numeric", "min": 5, "max": 1}]},
        "spec.data.features[0].min",
        "less than max",
    ),
    (
        "spec.data",
        {
            "targetColumn": "y",
            "features": [{"name": "a", "type": "numeric"}, {"name": "a", "type": "numeric"}],
        },
        "spec.data.features[1].name",
        "duplicate feature name 'a'",
    ),
    ("spec.hospitals.1.name", "a", "spec.hospitals", "hospital names must be unique"),
    ("spec.hospitals.0.name", "Hospital_A", "spec.hospitals[0].name", "DNS-1123 label"),
    ("spec.hospitals.0.dataUri", "http://x/a.csv", "spec.hospitals[0].dataUri", "s3://bucket/key"),
    ("spec.hospitals.0.roleArn", "role/x", "spec.hospitals[0].roleArn", "IAM role ARN"),
    ("spec.hospitals.0.resources", {"requests": {"cpu": 0.5}}, "spec.hospitals[0].resources", ""),
    (
        "spec.hospitals.0.tolerations",
        [{"effect": "Sometimes"}],
        "spec.hospitals[0].tolerations",
        "",
    ),
    ("spec.hospitals", [], "spec.hospitals", "at least 1 item"),
    ("spec.server", {"serviceType": "Ingress"}, "spec.server.serviceType", "'LoadBalancer'"),
    ("spec.activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds", "greater than or equal to 1"),
    ("metadata.name", "Demo", "metadata.name", "DNS-1035 label"),
    ("metadata.name", "1demo", "metadata.name", "starting with a letter"),
    ("metadata.name", "x" * 57, "metadata.name", "at most 56 characters"),
    ("kind", "Job", "kind", "'FederatedRun'"),
]


@pytest.mark.parametrize(("path", "value", "where", "phrase"), BAD)
def test_bad_input_is_refused_naming_the_field(
    path: str, value: Any, where: str, phrase: str
) -> None:
    found = problems(with_change(path, value))
    assert any(p.startswith(where) and phrase in p for p in found), found


def test_child_names_must_fit_in_a_label() -> None:
    obj = with_change("metadata.name", "x" * 50)
    obj["spec"]["hospitals"][1]["name"] = "hospital-b"  # 50 + 1 + 10 = 61: fits
    parse_run(obj)
    obj["spec"]["hospitals"][1]["name"] = "hospital-b-123"  # 65: too long
    found = problems(obj)
    # the same words as the API server's (tests/unit/test_crd.py::test_child_names_must_fit)
    assert found == [
        "spec.hospitals: <run>-<hospital> must be at most 63 characters: shorten the run or "
        "hospital names"
    ]


def test_missing_required_fields_are_named() -> None:
    obj = minimal()
    del obj["spec"]["rounds"]
    del obj["spec"]["hospitals"][0]["dataUri"]
    found = problems(obj)
    assert "spec.rounds: required field is missing" in found
    assert "spec.hospitals[0].dataUri: required field is missing" in found


def test_every_problem_is_reported_at_once() -> None:
    obj = with_change("spec.privacy.targetEpsilon", -1)
    obj["spec"]["trainng"] = {}
    obj["spec"]["strategy"] = {"name": "Nope"}
    found = problems(obj)
    assert {p.split(":")[0] for p in found} == {
        "spec.privacy.targetEpsilon",
        "spec.trainng",
        "spec.strategy.name",
    }


def test_load_run_from_text_names_the_field() -> None:
    text = yaml.safe_dump(with_change("spec.privacy.targetEpsilon", -0.5))
    with pytest.raises(SpecError, match=r"spec\.privacy\.targetEpsilon: must be greater than 0"):
        load_run(text)


def test_load_run_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_change("spec.rounds", -1)))
    with pytest.raises(SpecError, match=r"run\.yaml") as info:
        load_run(path)
    assert info.value.problems[0].startswith("spec.rounds:")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("a: [", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("a: 1\n---\nb: 2\n", "expected one YAML document"),
        ("", "expected one YAML document"),
    ],
)
def test_unusable_documents_are_refused(text: str, phrase: str) -> None:
    with pytest.raises(SpecError, match=phrase):
        load_run(text)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_run(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    run = load_run(path)
    assert isinstance(run, FederatedRun)
    assert len(run.spec.hospitals) == 3
    assert run.spec.min_hospitals <= len(run.spec.hospitals)


def test_local_example_is_the_demo() -> None:
    run = load_run(ROOT / "examples" / "federatedrun-local.yaml")
    spec = run.spec
    assert run.name == "stroke-demo"
    assert [h.name for h in spec.hospitals] == ["hospital-a", "hospital-b", "hospital-c"]
    assert [h.data_uri for h in spec.hospitals] == [
        f"file:out/demo-data/hospital-{x}.csv" for x in "abc"
    ]
    assert (spec.rounds, spec.min_hospitals, spec.data.preset) == (5, 2, "stroke")
    assert spec.privacy.enabled
    assert spec.privacy.target_epsilon == 1.0
    assert spec.privacy.delta == 1e-5
    assert spec.privacy.accountant == "rdp"


def test_eks_example_uses_s3_and_irsa() -> None:
    run = load_run(ROOT / "examples" / "federatedrun.yaml")
    for hospital in run.spec.hospitals:
        assert hospital.data_uri.startswith("s3://")
        assert hospital.role_arn is not None
        assert hospital.role_arn.endswith(hospital.name)
    assert run.spec.mlflow.tracking_uri is not None


def test_defaults_fill_a_minimal_run() -> None:
    run = parse_run(minimal())
    spec = run.spec
    assert run.namespace == "default"
    assert spec.strategy.name == "FedAvg"
    assert spec.strategy.proximal_mu is None
    assert spec.training.model == "logistic"
    assert spec.training.hidden_sizes is None
    assert spec.privacy.enabled
    assert spec.privacy.noise_multiplier is None
    assert spec.image == "ghcr.io/fedrun/trainer:0.1.0"
    assert spec.suspend is False


def test_strategy_and_model_defaults_follow_the_choice() -> None:
    prox = parse_run(with_change("spec.strategy", {"name": "FedProx"})).spec.strategy
    adam = parse_run(with_change("spec.strategy", {"name": "FedAdam"})).spec.strategy
    mlp = parse_run(with_change("spec.training", {"model": "mlp"})).spec.training
    assert prox.proximal_mu == 0.01
    assert prox.server_learning_rate is None
    assert adam.server_learning_rate == 0.1
    assert adam.proximal_mu is None
    assert mlp.hidden_sizes == [32, 16]


def test_relative_file_uri_is_accepted() -> None:
    run = parse_run(with_change("spec.hospitals.0.dataUri", "file:out/demo-data/a.csv"))
    assert run.spec.hospitals[0].data_uri == "file:out/demo-data/a.csv"


def test_spec_dict_round_trips() -> None:
    obj = minimal()
    obj["spec"]["strategy"] = {"name": "FedProx"}
    run = parse_run(obj)
    again = parse_run({**obj, "spec": run.spec_dict()})
    assert again.spec == run.spec
    assert "noiseMultiplier" not in run.spec_dict()["privacy"]


def test_python_names_are_accepted_too() -> None:
    obj = copy.deepcopy(minimal())
    obj["spec"]["min_hospitals"] = obj["spec"].pop("minHospitals")
    assert parse_run(obj).spec.min_hospitals == 2


def test_status_round_trips_and_ignores_unknown_fields() -> None:
    status = FederatedRunStatus.model_validate(
        {
            "phase": "Running",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "RoundsProgressing",
                    "message": "round 3/5",
                    "lastTransitionTime": "2026-11-24T10:00:00Z",
                    "observedGeneration": 1,
                }
            ],
            "round": {"current": 3, "total": 5},
            "progress": "3/5",
            "privacy": {
                "epsilonSpent": 0.71,
                "targetEpsilon": 1.0,
                "delta": 1e-5,
                "hospitals": [{"name": "a", "epsilon": 0.71, "noiseMultiplier": 1.9, "steps": 120}],
            },
            "metrics": {"round": 3, "loss": 0.2, "auroc": 0.8, "auprc": 0.2, "accuracy": 0.9},
            "hospitals": [{"name": "a", "jobName": "demo-a", "state": "Training", "restarts": 1}],
            "mlflowRunId": "abc",
            "futureField": 1,
        }
    )
    assert status.phase is Phase.RUNNING
    assert status.privacy is not None
    assert status.privacy.hospitals[0].steps == 120
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["conditions"][0]["lastTransitionTime"] == "2026-11-24T10:00:00Z"
    assert dumped["hospitals"][0]["jobName"] == "demo-a"
    assert "futureField" not in dumped
    assert FederatedRunStatus.model_validate(dumped) == status


def test_status_refuses_an_unknown_phase() -> None:
    obj = minimal()
    obj["status"] = {"phase": "Paused"}
    assert any(p.startswith("status.phase:") for p in problems(obj))


def test_ledger_uri_defaults() -> None:
    obj = minimal()
    obj["metadata"]["namespace"] = "research"
    obj["spec"]["hospitals"].append(
        {"name": "c", "dataUri": "/mnt/data/c.csv", "ledgerUri": "s3://ledgers/c.json"}
    )
    obj["spec"]["minHospitals"] = 3
    run = parse_run(obj)
    assert ledger_uri(run, "a") == "file:///var/lib/fedrun/ledger/a.json"
    assert ledger_uri(run, "b") == "s3://bucket-b/fedrun-ledger/research/demo/b.json"
    assert ledger_uri(run, run.spec.hospitals[2]) == "s3://ledgers/c.json"
    with pytest.raises(KeyError):
        ledger_uri(run, "z")
