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
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from fedrun_core.logs import setup_app_logging
from fedrun_core.schema import table_schema
from fedrun_core.states import Phase, Reason
from fedrun_trainer.common import files
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.server import checkpoint
from fedrun_trainer.server.coordinator import Coordinator, CoordinatorSettings, RoundCost, Weights
from fedrun_trainer.server.run_state import (
    RoundRecord,
    RunState,
    restore_state,
    state_to_json,
    to_history,
    to_status,
)
from fedrun_trainer.server.tracking import Tracker, default_tracking_uri

log = logging.getLogger("fedrun.server")

STATUS_FILE = "status.json"
HISTORY_FILE = "history.json"
MODEL_FILE = "model.npz"
#: ``{"<node id>": "<hospital>"}``: the node ids Flower gave the hospitals' registered keys,
#: written by ``fedrun server`` before the run is submitted.
NODES_FILE = "nodes.json"
JOIN_GRACE_S = 20.0
#: Where the checkpoint lives when the run names no other place: inside the state directory,
#: which a restarted container of the same pod keeps (an emptyDir).
CHECKPOINT_DIR = "checkpoint"


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


class Aggregator:
    """The server-side update rule for the run's strategy, with what it carries between
    rounds (FedAdam's moments) for the checkpoint."""

    def __init__(self, settings: RunSettings) -> None:
        from fedrun_trainer.server.strategy import FedAdam

        self.adam = (
            FedAdam(learning_rate=settings.server_learning_rate)
            if settings.strategy == "FedAdam"
            else None
        )

    def __call__(self, current: Weights, results: list[tuple[Weights, int]]) -> Weights:
        from fedrun_trainer.server.strategy import aggregate_fedavg

        mean = aggregate_fedavg(results)
        return mean if self.adam is None else self.adam.step(current, mean)

    def state_arrays(self) -> dict[str, list[np.ndarray]]:
        """The strategy's state for a checkpoint (empty for FedAvg and FedProx)."""
        return {} if self.adam is None else dict(self.adam.state_arrays())

    def load_arrays(self, arrays: dict[str, list[np.ndarray]]) -> None:
        """Take back :meth:`state_arrays`; ValueError when they do not fit the strategy."""
        if self.adam is not None:
            self.adam.load_arrays(arrays)
        elif arrays:
            raise ValueError(f"strategy state {sorted(arrays)} for a strategy that has none")


def initial_weights(settings: RunSettings, n_features: int) -> Weights:
    """The round-0 global model, from the spec's seed."""
    from fedrun_trainer.common.model import build_model, get_weights

    return get_weights(build_model(settings.model_spec(), n_features, seed=settings.seed))


def load_checkpoint(
    settings: RunSettings, directory: Path, state: RunState, aggregator: Aggregator
) -> Weights | None:
    """Put the run's checkpoint in ``directory`` back into ``state`` and ``aggregator``;
    the global weights it holds, or None (and a new lineage) when there is none.

    Raises :class:`~fedrun_trainer.server.checkpoint.CheckpointInvalid` for a checkpoint
    that is damaged, another run's, or does not fit this run.
    """
    cp = checkpoint.read(directory)
    if cp is None:
        state.lineage = checkpoint.new_lineage()
        return None
    checkpoint.check_owner(cp, settings.run, str(directory / checkpoint.FILE))
    try:
        restore_state(state, cp.state)
        shapes = [np.shape(w) for w in cp.weights]
        if any([np.shape(a) for a in arrays] != shapes for arrays in cp.strategy.values()):
            raise ValueError("the strategy's state does not have the model's shapes")
        aggregator.load_arrays(cp.strategy)
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint.CheckpointInvalid(
            f"{directory / checkpoint.FILE}: its state does not fit this run ({err})"
        ) from None
    if cp.round != state.current_round:
        raise checkpoint.CheckpointInvalid(
            f"{directory / checkpoint.FILE}: round {cp.round} but a state after round "
            f"{state.current_round}"
        )
    state.lineage, state.resumed_after = cp.lineage, cp.round
    if not state.final:
        state.message = f"resumed after round {cp.round}/{state.total_rounds} from its checkpoint"
    log.info("checkpoint of round %d found (lineage %s)", cp.round, cp.lineage)
    return list(cp.weights)


def run_federation(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp: never raises; the outcome is in the status file."""
    setup_app_logging()
    state_dir = Path(str(context.run_config["state-dir"]))
    checkpoint_dir = Path(
        str(context.run_config.get("checkpoint-dir") or state_dir / CHECKPOINT_DIR)
    )
    settings = RunSettings.load(str(context.run_config["fedrun-config"]))
    state = new_run_state(settings)
    aggregator = Aggregator(settings)
    try:
        resume = load_checkpoint(settings, checkpoint_dir, state, aggregator)
    except checkpoint.CheckpointInvalid as err:
        log.error("checkpoint refused: %s", err)
        state.finish(Phase.FAILED, Reason.CHECKPOINT_INVALID, f"checkpoint refused: {err}")
        files.write_json_atomic(state_dir / STATUS_FILE, to_status(state))
        files.write_json_atomic(state_dir / HISTORY_FILE, to_history(state))
        return
    if resume is not None and state.final:
        # Restarted after the run ended: publish the outcome again, train nothing.
        files.write_json_atomic(state_dir / STATUS_FILE, to_status(state))
        files.write_json_atomic(state_dir / HISTORY_FILE, to_history(state))
        return
    fingerprint = checkpoint.spec_fingerprint(settings.run)
    last_weights: list[Weights] = [resume] if resume is not None else []

    def save_checkpoint(st: RunState, weights: Weights) -> None:
        last_weights[:] = [weights]
        started = time.monotonic()
        try:
            size = checkpoint.write(
                checkpoint_dir,
                checkpoint.Checkpoint(
                    run_name=settings.run_name,
                    run_uid=settings.run_uid,
                    spec_fingerprint=fingerprint,
                    lineage=st.lineage,
                    round=st.current_round,
                    weights=weights,
                    state=state_to_json(st),
                    strategy=aggregator.state_arrays(),
                ),
            )
        except OSError as err:  # training goes on; a restart would go back further
            log.error("could not write the checkpoint of round %d: %s", st.current_round, err)
            return
        log.info(
            "checkpoint of round %d written (%d bytes, %.3f s)",
            st.current_round,
            size,
            time.monotonic() - started,
        )

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
        aggregate=aggregator,
        epsilon_of=lambda history: epsilon_of(history, settings.delta, settings.accountant),
        publish=publish,
        on_round=on_round,
        round_cost=round_cost_of(settings) if settings.privacy_enabled else None,
        on_checkpoint=save_checkpoint,
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
        settings.run_name,
        settings.mlflow_params(),
        {"fedrun.run": settings.run_name},
        existing=state.mlflow_run_id,
    )
    try:
        weights = coordinator.run(lambda n: initial_weights(settings, n), resume)
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
        if state.final and last_weights:
            # A server restarted after the end finds the outcome, not rounds to train.
            save_checkpoint(state, last_weights[0])
        tracker.log_artifact(state_dir / HISTORY_FILE)
        tracker.finish(state.phase)
        try:
            coordinator.shutdown_hospitals()
        except Exception:
            log.warning("could not tell every hospital to shut down")
        publish(state)
