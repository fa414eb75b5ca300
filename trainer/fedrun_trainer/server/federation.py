"""The ServerApp's body: set up one FederatedRun, run the rounds, publish status and model.

Runs inside the ``flwr-serverapp`` process that the SuperLink starts for the run. It
publishes the run's ``.status`` and per-round history as JSON files in the server's state
directory after every change; ``fedrun server`` serves them on ``/status`` and ``/metrics``.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from fedrun_core.schema import table_schema
from fedrun_core.states import Phase, Reason
from fedrun_trainer.common import files
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.server.coordinator import Coordinator, CoordinatorSettings, RoundCost, Weights
from fedrun_trainer.server.run_state import RoundRecord, RunState, to_history, to_status
from fedrun_trainer.server.tracking import Tracker, default_tracking_uri

log = logging.getLogger("fedrun.server")

STATUS_FILE = "status.json"
HISTORY_FILE = "history.json"
MODEL_FILE = "model.npz"
#: ``{"<node id>": "<hospital>"}``: the node ids Flower gave the hospitals' registered keys,
#: written by ``fedrun server`` before the run is submitted.
NODES_FILE = "nodes.json"
JOIN_GRACE_S = 20.0


#: What the rounds need and waiting for hospitals does not (seconds of imports on a small
#: node): imported on a background thread while the hospitals join.
ROUND_MODULES = ("opacus.accountants", "fedrun_trainer.common.model")


def prefetch(modules: tuple[str, ...] = ROUND_MODULES) -> threading.Thread:
    """Import ``modules`` on a daemon thread; a failure surfaces where they are used."""

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the import in the code that needs it raises it properly
                log.debug("prefetching %s failed", name, exc_info=True)

    thread = threading.Thread(target=load, name="prefetch", daemon=True)
    thread.start()
    return thread


def write_registered_nodes(state_dir: Path, nodes: dict[str, int]) -> None:
    """Record which node id each hospital's registered key got (``fedrun server``)."""
    files.write_json_atomic(
        state_dir / NODES_FILE, {str(node): hospital for hospital, node in nodes.items()}
    )


def read_registered_nodes(state_dir: Path, settings: RunSettings) -> dict[int, str] | None:
    """Node id → hospital for a secure run; None for an insecure one (no node keys).

    Raises RuntimeError when a secure run has no usable record: the round loop must never
    fall back to believing what nodes say about themselves.
    """
    if not settings.secure:
        return None
    raw = files.read_json(state_dir / NODES_FILE)
    names = set(settings.hospital_names)
    if not isinstance(raw, dict) or not raw:
        raise RuntimeError(f"no record of the registered node keys in {NODES_FILE}")
    nodes: dict[int, str] = {}
    for node, hospital in raw.items():
        if not str(node).isdigit() or hospital not in names:
            raise RuntimeError(f"{NODES_FILE} holds an entry that is not this run's: {node}")
        nodes[int(node)] = str(hospital)
    return nodes


def round_cost_of(settings: RunSettings) -> Callable[[int], RoundCost]:
    """What a round costs a hospital with ``n`` training rows under the spec (its plan)."""
    from fedrun_trainer.common.privacy import plan_privacy, plan_terms

    spec = settings.run.spec

    def cost(n_train: int) -> RoundCost:
        return plan_privacy(n_train=n_train, **plan_terms(spec)).cost_of_round

    return cost


def new_run_state(settings: RunSettings) -> RunState:
    """The state of a run whose hospitals have not connected yet."""
    return RunState.new(
        settings.run_name,
        settings.hospital_names,
        settings.rounds,
        settings.target_epsilon if settings.privacy_enabled else None,
        settings.delta if settings.privacy_enabled else None,
        columns=tuple(table_schema(settings.run.spec.data).columns),
    )


def make_aggregator(settings: RunSettings) -> Any:
    """The server-side update rule for the run's strategy."""
    from fedrun_trainer.server.strategy import FedAdam, aggregate_fedavg

    if settings.strategy == "FedAdam":
        adam = FedAdam(learning_rate=settings.server_learning_rate)

        def fedadam(current: Weights, results: list[tuple[Weights, int]]) -> Weights:
            return adam.step(current, aggregate_fedavg(results))

        return fedadam

    def fedavg(current: Weights, results: list[tuple[Weights, int]]) -> Weights:
        return aggregate_fedavg(results)

    return fedavg


def initial_weights(settings: RunSettings, n_features: int) -> Weights:
    """The round-0 global model, from the spec's seed."""
    from fedrun_trainer.common.model import build_model, get_weights

    return get_weights(build_model(settings.model_spec(), n_features, seed=settings.seed))


def run_federation(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp: never raises; the outcome is in the status file."""
    state_dir = Path(str(context.run_config["state-dir"]))
    settings = RunSettings.load(str(context.run_config["fedrun-config"]))
    state = new_run_state(settings)
    tracker = Tracker(
        settings.mlflow_tracking_uri or default_tracking_uri(state_dir),
        settings.mlflow_experiment,
        state_dir / "mlartifacts",
    )

    def publish(st: RunState) -> None:
        status = to_status(st)
        if tracker.error and st.final:
            status["message"] = f"{status['message']} ({tracker.error})"
        files.write_json_atomic(state_dir / STATUS_FILE, status)
        files.write_json_atomic(state_dir / HISTORY_FILE, to_history(st))

    def on_round(st: RunState, record: RoundRecord) -> None:
        st.mlflow_run_id = tracker.started()
        metrics: dict[str, float | None] = {f"eval_{k}": v for k, v in record.evaluation.items()}
        metrics["train_loss"] = record.train_loss
        metrics["round_seconds"] = record.duration_s
        for hospital, eps in record.epsilon.items():
            metrics[f"epsilon_{hospital}"] = eps
        metrics["epsilon_max"] = max(record.epsilon.values(), default=0.0)
        tracker.log_metrics(record.round, metrics)

    from fedrun_trainer.common.privacy import epsilon_of

    coordinator = Coordinator(
        grid=grid,
        state=state,
        settings=CoordinatorSettings(
            rounds=settings.rounds,
            min_hospitals=settings.min_hospitals,
            round_timeout_s=settings.round_timeout_s,
            join_grace_s=min(JOIN_GRACE_S, settings.round_timeout_s),
            privacy_enabled=settings.privacy_enabled,
            target_epsilon=settings.target_epsilon if settings.privacy_enabled else None,
            delta=settings.delta,
            accountant=settings.accountant,
        ),
        aggregate=make_aggregator(settings),
        epsilon_of=lambda history: epsilon_of(history, settings.delta, settings.accountant),
        publish=publish,
        on_round=on_round,
        round_cost=round_cost_of(settings) if settings.privacy_enabled else None,
    )
    try:
        coordinator.registered = read_registered_nodes(state_dir, settings)
    except RuntimeError as err:
        state.finish(Phase.FAILED, Reason.SERVER_ERROR, f"server error: {err}")
        publish(state)
        return
    publish(state)
    # MLflow starts, and what the rounds need is imported, while the hospitals join.
    prefetch()
    tracker.start_in_background(
        settings.run_name, settings.mlflow_params(), {"fedrun.run": settings.run_name}
    )
    try:
        weights = coordinator.run(lambda n: initial_weights(settings, n))
        if weights is not None:
            path = state_dir / MODEL_FILE
            np.savez(path, *weights)
            (state_dir / "model.json").write_text(
                json.dumps(settings.mlflow_params(), indent=2, sort_keys=True), encoding="utf-8"
            )
            tracker.log_artifact(path)
            tracker.log_artifact(state_dir / "model.json")
    except Exception as err:  # a crash becomes a Failed status with the reason
        log.error("%s", traceback.format_exc())
        state.finish(
            Phase.FAILED, Reason.SERVER_ERROR, f"server error: {type(err).__name__}: {err}"
        )
    finally:
        state.mlflow_run_id = tracker.started()
        publish(state)
        tracker.log_artifact(state_dir / HISTORY_FILE)
        tracker.finish(state.phase)
        try:
            coordinator.shutdown_hospitals()
        except Exception:
            log.warning("could not tell every hospital to shut down")
        publish(state)
