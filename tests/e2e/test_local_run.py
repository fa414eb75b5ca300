"""A real federated run: a Flower SuperLink, three SuperNodes, DP-SGD, MLflow, all local."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedrun_cli.demo_data import write_demo_hospitals
from fedrun_cli.main import main as fedrun_main
from fedrun_core.api import FederatedRunStatus
from fedrun_core.budgets import composed_epsilon
from fedrun_trainer.common.privacy import load_ledger

from .conftest import EXAMPLE, example_run


def _hospitals(data: dict[str, Path]) -> list[dict[str, str]]:
    return [{"name": name, "dataUri": path.as_uri()} for name, path in sorted(data.items())]


def test_dp_run_succeeds_within_budget_and_reports_everything(tmp_path, cluster_factory):
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(900, 800, 700), seed=3)
    doc = example_run(rounds=3, hospitals=_hospitals(data), roundTimeoutSeconds=120)
    cluster = cluster_factory(doc)
    cluster.start()
    seen: list[dict] = []
    status = cluster.wait(timeout_s=400, on_status=seen.append)

    assert status["phase"] == "Succeeded", status.get("message")
    assert status["round"] == {"current": 3, "total": 3}
    assert status["progress"] == "3/3"
    FederatedRunStatus.model_validate(status)  # the resource's own status schema

    privacy = status["privacy"]
    assert 0 < privacy["epsilonSpent"] <= privacy["targetEpsilon"] == 1.0
    assert {h["name"] for h in privacy["hospitals"]} == set(data)
    assert all(h["state"] == "Done" for h in status["hospitals"])
    assert 0.5 < status["metrics"]["auroc"] <= 1.0
    assert status["metrics"]["round"] == 3

    # ε as the status showed it over time never went down, for any hospital.
    for name in data:
        series = [
            h["epsilon"]
            for s in seen
            for h in (s.get("privacy") or {}).get("hospitals", [])
            if h["name"] == name
        ]
        assert series == sorted(series), (name, series)

    # Each hospital's ledger (its own accountant) agrees with the status, and is ≤ target.
    for name in data:
        ledger_path = cluster.out / "pods" / f"stroke-demo-{name}" / "state" / "ledger"
        ledger = load_ledger(str(ledger_path / str(cluster.run.metadata.uid) / f"{name}.json"))
        assert ledger is not None
        assert ledger.rounds_done == 3
        assert ledger.epsilon <= 1.0
        reported = next(h for h in privacy["hospitals"] if h["name"] == name)["epsilon"]
        assert abs(ledger.epsilon - reported) < 1e-3

    # The server keeps serving after the run: health, and Prometheus metrics that agree.
    with urllib.request.urlopen(cluster.status_url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(cluster.status_url + "/metrics", timeout=5) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode("utf-8"))}
    (current,) = families["fedrun_round_current"].samples
    assert current.value == 3
    spent = {s.labels["hospital"]: s.value for s in families["fedrun_epsilon_spent"].samples}
    assert max(spent.values()) == privacy["epsilonSpent"]
    assert families["fedrun_round_duration_seconds"].type == "histogram"

    # Every hospital process ended with status 0 (the server's shutdown arrived).
    assert all(pod.exit_code == 0 for pod in cluster.hospitals.values())

    # MLflow has the run, its parameters, per-round metrics and the model artifact.
    state = cluster.out / "pods" / "stroke-demo-server" / "state"
    client = mlflow.MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    run = client.get_run(status["mlflowRunId"])
    assert run.info.status == "FINISHED"
    assert run.data.params["target_epsilon"] == "1.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_auroc")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.npz"}


def test_fedrun_local_cli_writes_status_report_and_table(tmp_path, capsys, monkeypatch):
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(600, 600, 600), seed=5)
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc["spec"]["rounds"] = 2
    doc["spec"]["hospitals"][0]["budgetRef"] = "hospital-a-stroke"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    budget_file = tmp_path / "budget.yaml"
    budget_file.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "fedrun.io/v1alpha1",
                "kind": "PrivacyBudget",
                "metadata": {"name": "hospital-a-stroke"},
                "spec": {"hospital": "hospital-a", "dataset": {"label": "demo"}, "epsilon": 2.2},
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = ["local", str(run_file), "--out", str(out), "--data-dir", str(tmp_path / "data")]
    argv += ["--no-progress", "--budget", str(budget_file)]

    code = fedrun_main(argv)

    assert code == 0
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert status["phase"] == "Succeeded"
    assert status["privacy"]["epsilonSpent"] <= 1.0
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    printed = capsys.readouterr().out
    assert "hospital-a" in printed and "Succeeded" in printed and "AUROC" in printed
    assert len(data) == 3

    # The hospital's budget was charged what the run spent there, and the reservation given
    # back; the lifetime figure is that run's ε (one run: composed = summed).
    budget = yaml.safe_load(budget_file.read_text(encoding="utf-8"))
    (entry,) = budget["status"]["charges"]
    spent_a = next(h for h in status["privacy"]["hospitals"] if h["name"] == "hospital-a")
    assert entry["state"] == "Released" and entry["history"] == spent_a["history"]
    assert budget["status"]["spent"] == pytest.approx(spent_a["epsilon"], abs=5e-5)  # 4 places
    assert budget["status"]["reserved"] == 0.0

    # A second run of ε = 1 fits (1 spent + 1 reserved ≤ 2.2); both runs' histories are then
    # composed, which is less than adding their ε's.
    assert fedrun_main([*argv[:3], str(tmp_path / "out2"), *argv[4:]]) == 0
    capsys.readouterr()
    two = yaml.safe_load(budget_file.read_text(encoding="utf-8"))["status"]
    assert [c["state"] for c in two["charges"]] == ["Released", "Released"]
    histories = [c["history"] for c in two["charges"]]
    assert two["spent"] == pytest.approx(composed_epsilon(histories, 1e-5), abs=5e-5)
    assert two["spent"] < two["summed"] == pytest.approx(sum(c["spent"] for c in two["charges"]))

    # A third no longer fits in what is left: refused before anything starts, with the
    # figures, and nothing charged.
    assert fedrun_main([*argv[:3], str(tmp_path / "out3"), *argv[4:]]) == 1
    assert "the run needs ε=1 but the budget has 0." in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()
    assert yaml.safe_load(budget_file.read_text(encoding="utf-8"))["status"] == two


def test_fedrun_local_refuses_a_bad_spec_naming_the_field(tmp_path, capsys):
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc["spec"]["privacy"]["targetEpsilon"] = -1
    run_file = tmp_path / "bad.yaml"
    run_file.write_text(yaml.safe_dump(doc), encoding="utf-8")

    code = fedrun_main(["local", str(run_file), "--out", str(tmp_path / "out")])

    assert code == 2
    assert "spec.privacy.targetEpsilon" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
