"""MLflow tracking for a run: parameters, per-round metrics and ε, the final model.

The tracking URI comes from ``spec.mlflow.trackingUri``; without one, a local SQLite
store in the server's state directory is used (artifacts beside it). Tracking is
reporting, not training: if the store cannot be reached, the run goes on and the
problem is logged and put in the run's status message.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from fedrun_core.states import Phase

log = logging.getLogger("fedrun.mlflow")


def default_tracking_uri(state_dir: Path) -> str:
    """The local store used when the spec names none."""
    return f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"


class Tracker:
    """One MLflow run for one FederatedRun.

    After a failure, logging stops (the first error is kept in ``error``), but
    :meth:`finish` still tries to close the MLflow run so it is not left RUNNING.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: Path) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_dir = artifact_dir
        self.run_id: str | None = None
        self.error: str | None = None
        self._starting: threading.Thread | None = None

    def _guard(self, what: str, fn: Any, *args: Any, always: bool = False) -> Any:
        if self.error is not None and not always:
            return None
        try:
            return fn(*args)
        except Exception as err:
            self.error = self.error or f"MLflow {what} failed: {type(err).__name__}: {err}"
            log.warning("%s", self.error)
            return None

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        existing: str | None = None,
    ) -> str | None:
        """Start the MLflow run and log the parameters; returns its run id.

        ``existing`` is the run a resumed server logged to before its restart: it is used
        again when the store still has it, so one FederatedRun stays one MLflow run.
        """

        def _start() -> str:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # MLflow's default HTTP retries back off for minutes; the run must not wait.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.tracking_uri.startswith("sqlite:"):
                    self.artifact_dir.mkdir(parents=True, exist_ok=True)
                    location = self.artifact_dir.resolve().as_uri()
                exp_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            if existing:
                try:
                    return str(client.get_run(existing).info.run_id)
                except Exception as err:
                    log.warning("MLflow run %s not found (%s); starting a new one", existing, err)
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            for key, value in sorted(params.items()):
                client.log_param(run.info.run_id, key, value)
            return str(run.info.run_id)

        self.run_id = self._guard("start", _start)
        return self.run_id

    def start_in_background(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        existing: str | None = None,
    ) -> None:
        """:meth:`start` on a thread of its own; every later call waits for it.

        Importing MLflow and creating a SQLite store's schema take seconds that the
        run spends waiting for its hospitals anyway.
        """
        self._starting = threading.Thread(
            target=self.start,
            args=(run_name, params, tags, existing),
            name="mlflow-start",
            daemon=True,
        )
        self._starting.start()

    def started(self) -> str | None:
        """The MLflow run id once the run is started (waits for a background start)."""
        if self._starting is not None:
            self._starting.join()
        return self.run_id

    def log_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        """Log one round's metrics (None values are skipped)."""
        run_id = self.started()
        if run_id is None:
            return

        def _log() -> None:
            import mlflow

            client = mlflow.MlflowClient(self.tracking_uri)
            for key, value in sorted(metrics.items()):
                if value is not None:
                    client.log_metric(run_id, key, float(value), step=step)

        self._guard("log_metrics", _log)

    def log_artifact(self, path: Path) -> None:
        """Upload a file (the final model, the report) to the run's artifacts."""
        if self.started() is None:
            return

        def _log() -> None:
            import mlflow

            mlflow.MlflowClient(self.tracking_uri).log_artifact(self.run_id, str(path))

        self._guard("log_artifact", _log)

    def finish(self, phase: str) -> None:
        """Close the MLflow run with a status that matches the FederatedRun's phase."""
        run_id = self.started()
        if run_id is None:
            return

        def _end() -> None:
            import mlflow

            status = "FINISHED" if phase == Phase.SUCCEEDED else "FAILED"
            client = mlflow.MlflowClient(self.tracking_uri)
            client.set_tag(run_id, "fedrun.phase", phase)
            client.set_terminated(run_id, status=status)

        self._guard("finish", _end, always=True)  # close the run even after an error
