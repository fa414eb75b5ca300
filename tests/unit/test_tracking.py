"""MLflow tracking against a real SQLite store, and a store that cannot be reached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from fedrun_trainer.server.tracking import Tracker, default_tracking_uri

PARAMS = {"rounds": 5, "strategy": "FedAvg", "target_epsilon": 1.0, "dp_enabled": True}


@pytest.fixture(autouse=True)
def mlflow_globals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tracker.start sets MLflow's process-wide tracking URI (and its env var): undo it."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module (creating its schema takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


def test_default_uri_is_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_run_is_recorded_and_readable(store: Path) -> None:
    tracker = Tracker(default_tracking_uri(store), "fedrun-test", store / "mlartifacts")
    run_id = tracker.start("stroke-demo", PARAMS, {"fedrun.run": "stroke-demo"})
    assert tracker.error is None
    assert run_id is not None and run_id == tracker.run_id
    tracker.log_metrics(1, {"eval_auroc": 0.71, "epsilon_max": 0.4, "eval_auprc": None})
    tracker.log_metrics(2, {"eval_auroc": 0.78, "epsilon_max": 0.6})
    model = store / "model.npz"
    model.write_bytes(b"weights")
    tracker.log_artifact(model)
    tracker.finish("Succeeded")
    assert tracker.error is None

    client = mlflow.MlflowClient(default_tracking_uri(store))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stroke-demo"
    assert run.data.params == {k: str(v) for k, v in PARAMS.items()}
    assert run.data.tags["fedrun.run"] == "stroke-demo"
    assert run.data.tags["fedrun.phase"] == "Succeeded"
    history = client.get_metric_history(run_id, "eval_auroc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 0.71),
        (2, 0.78),
    ]
    assert "eval_auprc" not in run.data.metrics  # None values are skipped
    assert [a.path for a in client.list_artifacts(run_id)] == ["model.npz"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "fedrun-test"
    assert experiment.artifact_location == (store / "mlartifacts").resolve().as_uri()


def test_a_background_start_is_waited_for_by_every_later_call(store: Path) -> None:
    tracker = Tracker(default_tracking_uri(store), "fedrun-background", store / "mlartifacts")
    tracker.start_in_background("bg", PARAMS, {})
    tracker.log_metrics(1, {"eval_auroc": 0.5})  # waits for the start: nothing is lost
    tracker.finish("Succeeded")
    run_id = tracker.started()
    assert run_id is not None and tracker.error is None
    run = mlflow.MlflowClient(default_tracking_uri(store)).get_run(run_id)
    assert run.data.metrics == {"eval_auroc": 0.5}
    assert run.info.status == "FINISHED"


def test_failed_run_reuses_the_experiment_and_ends_failed(store: Path) -> None:
    uri = default_tracking_uri(store)
    first = Tracker(uri, "fedrun-reuse", store / "mlartifacts")
    second = Tracker(uri, "fedrun-reuse", store / "mlartifacts")
    first_id = first.start("run-1", {}, {})
    second_id = second.start("run-2", {}, {})
    assert first_id is not None and second_id is not None
    second.finish("Failed")
    assert first.error is None and second.error is None
    client = mlflow.MlflowClient(uri)
    one, two = client.get_run(first_id), client.get_run(second_id)
    assert one.info.experiment_id == two.info.experiment_id
    assert two.info.status == "FAILED"
    assert two.data.tags["fedrun.phase"] == "Failed"
    assert one.info.status == "RUNNING"


def test_unreachable_store_records_an_error_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # MLflow's defaults retry a refused connection for about four minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker("http://127.0.0.1:9/", "fedrun-test", tmp_path / "mlartifacts")
    started = time.monotonic()
    assert tracker.start("stroke-demo", PARAMS, {}) is None
    assert time.monotonic() - started < 20
    assert tracker.error is not None
    assert tracker.error.startswith("MLflow start failed:")
    assert "127.0.0.1:9" in tracker.error
    # Everything after a failure is a quiet no-op.
    error = tracker.error
    tracker.log_metrics(1, {"eval_auroc": 0.7})
    tracker.log_artifact(tmp_path / "missing.npz")
    tracker.finish("Succeeded")
    assert tracker.error == error


def test_failed_upload_is_recorded_logging_stops_but_the_run_is_closed(store: Path) -> None:
    uri = default_tracking_uri(store)
    tracker = Tracker(uri, "fedrun-test", store / "mlartifacts")
    run_id = tracker.start("upload", {}, {})
    assert run_id is not None
    tracker.log_artifact(store / "no-such-file.npz")
    assert tracker.error is not None
    assert tracker.error.startswith("MLflow log_artifact failed:")
    tracker.log_metrics(1, {"eval_auroc": 0.7})
    assert mlflow.MlflowClient(uri).get_metric_history(run_id, "eval_auroc") == []
    tracker.finish("Succeeded")  # still closes the run: it is not left RUNNING
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert tracker.error.startswith("MLflow log_artifact failed:")  # the first error is kept


def test_a_resumed_server_logs_to_the_same_mlflow_run(store: Path) -> None:
    """One FederatedRun stays one MLflow run across a server restart; a run the store no
    longer has is replaced by a new one."""
    uri = default_tracking_uri(store)
    first = Tracker(uri, "fedrun-resume", store / "mlartifacts")
    run_id = first.start("stroke-demo", PARAMS, {"fedrun.run": "stroke-demo"})
    first.log_metrics(1, {"eval_auroc": 0.7})
    again = Tracker(uri, "fedrun-resume", store / "mlartifacts")
    assert again.start("stroke-demo", PARAMS, {}, existing=run_id) == run_id
    again.log_metrics(2, {"eval_auroc": 0.75})
    again.finish("Succeeded")
    history = mlflow.MlflowClient(uri).get_metric_history(str(run_id), "eval_auroc")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.75)]
    other = Tracker(uri, "fedrun-resume", store / "mlartifacts")
    fresh = other.start("stroke-demo", PARAMS, {}, existing="0123456789abcdef0123456789abcdef")
    assert fresh is not None and fresh != run_id and other.error is None
