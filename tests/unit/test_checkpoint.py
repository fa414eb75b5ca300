"""The server's checkpoint: the file, whose it is, and a round loop that resumes from it.

The resume tests drive the real Coordinator over the scripted in-memory Grid of
test_coordinator: a run checkpointed after round 1 and resumed by a new coordinator must
train only rounds 2 and 3 and end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedrun_core.api import FederatedRun, parse_run
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.hospital import kept_update
from fedrun_trainer.server import checkpoint
from fedrun_trainer.server.checkpoint import Checkpoint, CheckpointInvalid
from fedrun_trainer.server.federation import Aggregator, load_checkpoint, new_run_state
from fedrun_trainer.server.run_state import RunState, restore_state, state_to_json, to_status
from fedrun_trainer.server.strategy import FedAdam

from .test_coordinator import Harness, harness, initial, task_identity, three

__all__ = ["task_identity"]  # the autouse fixture Flower's Message needs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federatedrun-local.yaml"


def run_of(uid: str = "uid-1", **spec: Any) -> FederatedRun:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc["metadata"]["uid"] = uid
    doc["spec"].update(spec)
    return parse_run(doc)


def a_checkpoint(run: FederatedRun, round_: int = 2, **changes: Any) -> Checkpoint:
    state = new_run_state(RunSettings(run))
    state.current_round = round_
    state.hospitals["hospital-a"].history = [(1.5, 0.1, 14)]
    fields: dict[str, Any] = {
        "run_name": run.metadata.name,
        "run_uid": run.metadata.uid or "",
        "spec_fingerprint": checkpoint.spec_fingerprint(run),
        "lineage": "abc123",
        "round": round_,
        "weights": [np.arange(6, dtype=np.float32).reshape(1, 6), np.ones(1, np.float32)],
        "state": state_to_json(state),
        "strategy": {
            "m": [np.full((1, 6), 0.5), np.full(1, 0.5)],
            "v": [np.full((1, 6), 0.25), np.full(1, 0.25)],
        },
    }
    fields.update(changes)
    return Checkpoint(**fields)


# --------------------------------------------------------------------------- the file


def test_a_checkpoint_reads_back_as_written(tmp_path: Path) -> None:
    cp = a_checkpoint(run_of())
    size = checkpoint.write(tmp_path, cp)
    back = checkpoint.read(tmp_path)
    assert back is not None
    assert size == (tmp_path / checkpoint.FILE).stat().st_size
    assert (back.run_name, back.run_uid, back.lineage, back.round) == (
        "stroke-demo",
        "uid-1",
        "abc123",
        2,
    )
    assert back.spec_fingerprint == cp.spec_fingerprint
    assert [w.tolist() for w in back.weights] == [w.tolist() for w in cp.weights]
    assert back.weights[0].dtype == np.float32
    assert back.strategy["m"][0].tolist() == [[0.5] * 6]
    assert back.state == cp.state
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]  # no temporary left


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert checkpoint.read(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: b[:-10], "checksum"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "checksum"),
        (lambda b: b"PK\x03\x04" + b[4:], "not a fedrun checkpoint"),
        (lambda b: b.replace(b"fedrun-checkpoint/1", b"fedrun-checkpoint/9", 1), "not a fedrun"),
        (lambda b: b"", "no header"),
    ],
    ids=["cut", "bit-flip", "not-a-checkpoint", "other-format", "empty"],
)
def test_a_damaged_checkpoint_is_refused_with_the_reason(
    tmp_path: Path, damage: Any, why: str
) -> None:
    checkpoint.write(tmp_path, a_checkpoint(run_of()))
    path = tmp_path / checkpoint.FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointInvalid, match=why) as err:
        checkpoint.read(tmp_path)
    assert str(path) in str(err.value)


def test_a_checkpoint_over_the_size_limit_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint.write(tmp_path, a_checkpoint(run_of()))
    monkeypatch.setattr(checkpoint, "MAX_BYTES", 100)
    with pytest.raises(CheckpointInvalid, match="over the 100-byte limit"):
        checkpoint.read(tmp_path)


def test_a_lineage_that_is_not_an_id_is_refused() -> None:
    cp = a_checkpoint(run_of(), lineage="../../etc")
    with pytest.raises(CheckpointInvalid, match="lineage is not an id"):
        checkpoint.decode(checkpoint.encode(cp))


def test_weights_that_are_not_finite_are_refused() -> None:
    cp = a_checkpoint(run_of(), weights=[np.array([np.nan], np.float32)])
    with pytest.raises(CheckpointInvalid, match="not finite floats"):
        checkpoint.decode(checkpoint.encode(cp))


def test_only_the_run_that_wrote_it_takes_it_back() -> None:
    run = run_of()
    cp = a_checkpoint(run)
    checkpoint.check_owner(cp, run)
    # Suspending, and what may change while suspended (pod settings, image), keep it its own.
    checkpoint.check_owner(cp, run_of(suspend=True))
    checkpoint.check_owner(cp, run_of(server={"resources": {"limits": {"memory": "4Gi"}}}))
    with pytest.raises(CheckpointInvalid, match="uid other-uid"):
        checkpoint.check_owner(cp, run_of(uid="other-uid"))
    other_name = copy.deepcopy(run)
    other_name.metadata.name = "another-run"
    with pytest.raises(CheckpointInvalid, match="belongs to run 'stroke-demo'"):
        checkpoint.check_owner(cp, other_name)
    for changed in ({"rounds": 9}, {"privacy": {"enabled": True, "targetEpsilon": 2.0}}):
        with pytest.raises(CheckpointInvalid, match="another spec"):
            checkpoint.check_owner(cp, run_of(**changed))


# --------------------------------------------------------------------------- the state


def test_the_run_state_survives_a_checkpoint() -> None:
    h = harness(three(), rounds=2)
    h.run()
    saved = state_to_json(h.state)
    fresh = RunState.new("demo", list(h.state.hospitals), 2, 10.0, 1e-5)
    back = restore_state(fresh, copy.deepcopy(saved))
    assert state_to_json(back) == saved
    assert to_status(back) == to_status(h.state)


def test_a_restored_hospital_waits_to_rejoin_unless_it_had_finished() -> None:
    h = harness(three(), rounds=1)
    h.run()
    saved = state_to_json(h.state)
    saved["phase"], saved["currentRound"] = "Running", 1
    saved["hospitals"]["hospital-b"]["state"] = "Connected"
    back = restore_state(RunState.new("demo", list(h.state.hospitals), 1, 10.0, 1e-5), saved)
    assert back.hospitals["hospital-b"].state == "Pending"
    assert back.hospitals["hospital-b"].node_id is None
    assert "rejoin" in back.hospitals["hospital-b"].message
    assert back.hospitals["hospital-a"].state == "Done"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda s: s["hospitals"].pop("hospital-c"), "not the spec's"),
        (lambda s: s.update(currentRound=7), "outside 0..2"),
        (lambda s: s["hospitals"]["hospital-a"].pop("history"), "history"),
        (lambda s: s["hospitals"]["hospital-a"].update(history=[[1.0, 0.1, -5]]), "whole"),
        (lambda s: s["hospitals"]["hospital-a"].update(history=[[1.0, 1.5, 5]]), "q ≤ 1"),
    ],
    ids=["hospital-missing", "round-past-total", "field-missing", "negative-steps", "bad-q"],
)
def test_a_state_that_does_not_fit_the_run_is_refused(change: Any, why: str) -> None:
    h = harness(three(), rounds=2)
    h.run()
    saved = state_to_json(h.state)
    change(saved)
    with pytest.raises((ValueError, KeyError), match=why):
        restore_state(RunState.new("demo", list(h.state.hospitals), 2, 10.0, 1e-5), saved)


def test_fedadam_moments_survive_and_must_pair_up() -> None:
    adam = FedAdam(learning_rate=0.1)
    assert adam.state_arrays() == {}
    adam.step([np.zeros(2, np.float32)], [np.ones(2, np.float32)])
    again = FedAdam(learning_rate=0.1)
    again.load_arrays(adam.state_arrays())
    nxt = [np.full(2, 2.0, np.float32)]
    assert np.array_equal(again.step(nxt, nxt), adam.step(nxt, nxt))
    with pytest.raises(ValueError, match="pair up"):
        again.load_arrays({"m": [np.zeros(2)], "v": []})


def test_load_checkpoint_mints_a_lineage_or_takes_the_run_back(tmp_path: Path) -> None:
    run = run_of(strategy={"name": "FedAdam", "serverLearningRate": 0.1})
    settings = RunSettings(run)
    fresh = new_run_state(settings)
    assert load_checkpoint(settings, tmp_path, fresh, Aggregator(settings)) is None
    assert len(fresh.lineage) == 32 and fresh.resumed_after is None

    checkpoint.write(tmp_path, a_checkpoint(run))
    state, aggregator = new_run_state(settings), Aggregator(settings)
    weights = load_checkpoint(settings, tmp_path, state, aggregator)
    assert weights is not None and weights[0].shape == (1, 6)
    assert (state.lineage, state.resumed_after, state.current_round) == ("abc123", 2, 2)
    assert state.hospitals["hospital-a"].history == [(1.5, 0.1, 14)]
    assert aggregator.adam is not None and aggregator.adam.m[0].tolist() == [[0.5] * 6]
    assert "resumed after round 2/5" in state.message

    checkpoint.write(tmp_path, dataclasses.replace(a_checkpoint(run), round=3))
    with pytest.raises(CheckpointInvalid, match="round 3 but a state after round 2"):
        load_checkpoint(settings, tmp_path, new_run_state(settings), Aggregator(settings))
    odd = {"m": [np.zeros(3)], "v": [np.zeros(3)]}
    checkpoint.write(tmp_path, dataclasses.replace(a_checkpoint(run), strategy=odd))
    with pytest.raises(CheckpointInvalid, match="not have the model's shapes"):
        load_checkpoint(settings, tmp_path, new_run_state(settings), Aggregator(settings))
    fedavg = RunSettings(run_of())
    checkpoint.write(tmp_path, a_checkpoint(fedavg.run))
    with pytest.raises(CheckpointInvalid, match="does not fit this run"):
        load_checkpoint(fedavg, tmp_path, new_run_state(fedavg), Aggregator(fedavg))


# --------------------------------------------------------------------------- resuming


def checkpointed(h: Harness) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
    """Record what the coordinator hands its checkpoint writer after every round."""
    saved: list[tuple[dict[str, Any], list[np.ndarray]]] = []
    h.coordinator.on_checkpoint = lambda st, w: saved.append(
        (copy.deepcopy(state_to_json(st)), [a.copy() for a in w])
    )
    return saved


def test_a_resumed_run_trains_only_the_rounds_left_and_ends_where_an_unbroken_one_does() -> None:
    whole = harness(three(), rounds=3)
    saved = checkpointed(whole)
    expected = whole.run()
    # Round 0 too (the model the hospitals joined for), then after every round.
    assert [s["currentRound"] for s, _ in saved] == [0, 1, 2, 3]

    resumed = harness(three(), rounds=3)
    restore_state(resumed.state, copy.deepcopy(saved[1][0]))
    weights = resumed.coordinator.run(initial, resume=saved[1][1])

    assert resumed.grid.trains(1) == []
    assert len(resumed.grid.trains(2)) == len(resumed.grid.trains(3)) == 3
    assert weights is not None and expected is not None
    assert all(np.allclose(a, b) for a, b in zip(weights, expected, strict=True))
    assert (resumed.state.phase, resumed.state.current_round) == ("Succeeded", 3)
    assert [r.round for r in resumed.state.rounds] == [1, 2, 3]
    for name, h in resumed.state.hospitals.items():
        assert h.history == whole.state.hospitals[name].history  # 3 rounds, none twice
        assert h.epsilon == pytest.approx(whole.state.hospitals[name].epsilon)
    # Round 2 re-evaluates round 1's model, as in the unbroken run.
    assert resumed.state.rounds[0].evaluation == whole.state.rounds[0].evaluation


def test_a_checkpoint_of_another_model_shape_fails_the_run() -> None:
    h = harness(three(), rounds=3)
    h.state.current_round = 1
    h.coordinator.run(initial, resume=[np.zeros((1, 9), np.float32), np.zeros(1, np.float32)])
    assert (h.state.phase, h.state.reason) == ("Failed", "CheckpointInvalid")
    assert "shapes" in h.state.message
    assert h.grid.trains(2) == []


def test_a_run_restored_as_finished_trains_nothing() -> None:
    whole = harness(three(), rounds=1)
    whole.run()
    again = harness(three(), rounds=1)
    restore_state(again.state, state_to_json(whole.state))
    weights = [np.ones((1, 3), np.float32), np.ones(1, np.float32)]
    assert again.coordinator.run(initial, resume=weights) is weights
    assert again.grid.sent == []
    assert again.state.phase == "Succeeded"


# --------------------------------------------------------------------------- kept update


def test_a_kept_update_answers_only_its_round_run_and_starting_model(tmp_path: Path) -> None:
    start = [np.zeros((1, 3), np.float32), np.zeros(1, np.float32)]
    trained = [np.ones((1, 3), np.float32), np.ones(1, np.float32)]
    kept_update.save(
        tmp_path,
        kept_update.KeptUpdate("uid-1", 4, kept_update.digest(start), trained, 420, 0.61),
    )
    got = kept_update.load(tmp_path, "uid-1", 4, start)
    assert got is not None
    assert (got.num_examples, got.loss) == (420, 0.61)
    assert [w.tolist() for w in got.weights] == [w.tolist() for w in trained]
    assert kept_update.load(tmp_path, "uid-1", 5, start) is None
    assert kept_update.load(tmp_path, "uid-2", 4, start) is None
    assert kept_update.load(tmp_path, "uid-1", 4, trained) is None
    (tmp_path / kept_update.FILE).write_bytes(b"garbage")
    assert kept_update.load(tmp_path, "uid-1", 4, start) is None
