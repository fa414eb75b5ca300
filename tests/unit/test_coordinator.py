"""The ServerApp's round loop against an in-memory Flower Grid whose hospitals are scripted.

The fake implements Flower's ``Grid`` interface (push/pull by message id, node ids) and
answers with real ``Message``/``RecordDict`` objects encoded by the hospital app's own
``_reply``, so the Coordinator decodes exactly what a real hospital sends. Nothing of
fedrun is mocked: aggregation is ``aggregate_fedavg`` and accounting ``epsilon_of``.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedrun_core.api import FederatedRunStatus
from fedrun_core.states import FINAL_PHASES
from fedrun_trainer.common import protocol
from fedrun_trainer.common.privacy import epsilon_of
from fedrun_trainer.common.protocol import Outcome
from fedrun_trainer.hospital.handlers import NodeSettings, _reply
from fedrun_trainer.server import coordinator as coordinator_module
from fedrun_trainer.server.coordinator import Coordinator, CoordinatorSettings, Weights
from fedrun_trainer.server.run_state import (
    RoundRecord,
    RunState,
    to_history,
    to_status,
)
from fedrun_trainer.server.strategy import aggregate_fedavg

DELTA = 1e-5
N_FEATURES = 3
# Each OK round costs (σ, q, steps) = (1.0, 0.05, 20): ε ≈ 2.48 after one round, 2.97 after two.
SIGMA, Q, STEPS = 1.0, 0.05, 20


@functools.cache
def _epsilon(history: tuple[tuple[float, float, int], ...]) -> float:
    return epsilon_of(history, DELTA, "rdp")


def accounted(history: list[tuple[float, float, int]]) -> float:
    """The real RDP accounting, memoised: every hospital here has the same few histories."""
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history))


EPS_ONE_ROUND = accounted([(SIGMA, Q, STEPS)])
EPS_TWO_ROUNDS = accounted([(SIGMA, Q, STEPS)] * 2)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process before the app may create a Message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# --------------------------------------------------------------------------- the fakes

Behaviour = str | Callable[[Message], Message | None]


@dataclass
class ScriptedHospital:
    """One hospital's ClientApp as a function of the message: replies like hospital.py."""

    name: str
    shift: float = 1.0  # every trained weight = global + shift
    n_train: int = 100
    n_test: int = 20
    auroc: float = 0.7
    incarnation: str = "1"
    hello: tuple[Outcome, str] = (Outcome.OK, "")
    reported_epsilon: float | None = None  # what the hospital says it spent (else accounted)
    train: dict[int, Behaviour] = field(default_factory=dict)  # round -> behaviour, default ok
    received: list[Message] = field(default_factory=list)

    @property
    def node(self) -> NodeSettings:
        return NodeSettings(self.name, "unused.json", Path("unused"), self.incarnation)

    def evaluation(self, auroc: float) -> dict[str, float]:
        return {
            "num_examples": float(self.n_test),
            "loss": 0.5,
            "auroc": auroc,
            "auprc": 0.3,
            "accuracy": 0.9,
        }

    def __call__(self, msg: Message) -> Message | None:
        self.received.append(msg)
        kind = msg.metadata.message_type
        if kind == protocol.HELLO:
            outcome, text = self.hello
            summary = {
                "num_train": float(self.n_train),
                "num_test": float(self.n_test),
                "num_features": float(N_FEATURES),
            }
            return _reply(msg, self.node, outcome, text, metrics=summary)
        if kind == protocol.EVALUATE:
            return _reply(msg, self.node, Outcome.OK, evaluation=self.evaluation(self.auroc))
        if kind == protocol.SHUTDOWN:
            return _reply(msg, self.node, Outcome.OK)
        assert kind == protocol.TRAIN
        cfg = msg.content.config_records[protocol.CONFIG]
        server_round = int(cfg["server_round"])  # type: ignore[arg-type]
        behaviour = self.train.get(server_round, "ok")
        if callable(behaviour):
            return behaviour(msg)
        evaluation = self.evaluation(self.auroc - 0.05) if cfg["evaluate_first"] else None
        if behaviour == "failed":
            return _reply(msg, self.node, Outcome.FAILED, f"{self.name}: disk full")
        if behaviour == "budget":
            return _reply(
                msg,
                self.node,
                Outcome.BUDGET,
                f"hospital {self.name}: training 20 more steps would spend too much",
                evaluation=evaluation,
                privacy={
                    "epsilon": EPS_ONE_ROUND,
                    "noise_multiplier": SIGMA,
                    "sample_rate": Q,
                    "steps": 0,
                    "steps_per_round": STEPS,
                },
            )
        assert behaviour == "ok", behaviour
        weights = msg.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays()
        trained = len([m for m in self.received if m.metadata.message_type == protocol.TRAIN])
        eps = accounted([(SIGMA, Q, STEPS)] * trained)
        return _reply(
            msg,
            self.node,
            Outcome.OK,
            weights=[w + np.float32(self.shift) for w in weights],
            metrics={"num_examples": float(self.n_train), "loss": 0.6},
            evaluation=evaluation,
            privacy={
                "epsilon": eps if self.reported_epsilon is None else self.reported_epsilon,
                "noise_multiplier": SIGMA,
                "sample_rate": Q,
                "steps": float(STEPS),
                "steps_per_round": float(STEPS),
                "total_steps": float(STEPS * trained),
            },
        )


class FakeGrid(Grid):
    """Flower's Grid in memory: nodes are scripted hospitals that answer when pushed to."""

    def __init__(self, hospitals: Iterable[ScriptedHospital] = ()) -> None:
        self.nodes: dict[int, ScriptedHospital] = {}
        self.sent: list[Message] = []
        self.listings: list[set[int]] = []  # what each get_node_ids returned
        # node id -> (listings it is still missing from, the hospital that then comes back on
        # it): a restarted hospital whose registered key gives it back its node id.
        self.returning: dict[int, tuple[int, ScriptedHospital]] = {}
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(7)
        for i, h in enumerate(hospitals):
            self.nodes[1000 + i] = h

    def node_of(self, name: str) -> int:
        return next(n for n, h in self.nodes.items() if h.name == name)

    # -- the Grid interface -----------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        for node, (missing, hospital) in list(self.returning.items()):
            if missing > 0:
                self.returning[node] = (missing - 1, hospital)
            else:
                del self.returning[node]
                self.nodes[node] = hospital
        self.listings.append(set(self.nodes))
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            # The SuperLink's own checks on an instruction message.
            assert msg.metadata.reply_to_message_id == ""
            assert msg.metadata.ttl > 0
            assert msg.metadata.run_id == self._run.run_id
            self.sent.append(msg)
            handler = self.nodes.get(msg.metadata.dst_node_id)
            reply = handler(msg) if handler is not None else None
            if reply is not None:
                assert reply.metadata.reply_to_message_id == msg.metadata.message_id
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- what the tests look at -------------------------------------------------------
    def trains(self, server_round: int) -> list[Message]:
        """TRAIN messages sent for ``server_round``."""
        return [
            m
            for m in self.sent
            if m.metadata.message_type == protocol.TRAIN
            and m.content.config_records[protocol.CONFIG]["server_round"] == server_round
        ]


@dataclass
class Harness:
    grid: FakeGrid
    coordinator: Coordinator
    published: list[dict[str, Any]]
    reported_rounds: list[tuple[int, dict[str, float | None]]]

    @property
    def state(self) -> RunState:
        return self.coordinator.state

    def run(self) -> Weights | None:
        return self.coordinator.run(initial)


def initial(n_features: int) -> Weights:
    return [np.zeros((1, n_features), np.float32), np.zeros(1, np.float32)]


def harness(
    hospitals: list[ScriptedHospital],
    *,
    rounds: int = 2,
    min_hospitals: int = 2,
    target_epsilon: float | None = 10.0,
    round_timeout_s: float = 3.0,
    join_grace_s: float = 1.0,
    round_cost: Callable[[int], tuple[float, float, int]] | None = None,
    registered: dict[int, str] | None = None,
) -> Harness:
    """A coordinator over scripted hospitals; by default a round costs (SIGMA, Q, STEPS)."""
    grid = FakeGrid(hospitals)
    state = RunState.new(
        "demo",
        [h.name for h in hospitals],
        rounds,
        target_epsilon,
        DELTA if target_epsilon is not None else None,
    )
    published: list[dict[str, Any]] = []
    reported: list[tuple[int, dict[str, float | None]]] = []

    def on_round(st: RunState, record: RoundRecord) -> None:
        reported.append((record.round, dict(record.evaluation)))

    coordinator = Coordinator(
        grid=grid,
        state=state,
        settings=CoordinatorSettings(
            rounds=rounds,
            min_hospitals=min_hospitals,
            round_timeout_s=round_timeout_s,
            join_grace_s=join_grace_s,
            privacy_enabled=target_epsilon is not None,
            target_epsilon=target_epsilon,
            delta=DELTA,
            accountant="rdp",
        ),
        aggregate=lambda current, results: aggregate_fedavg(results),
        epsilon_of=accounted,
        publish=lambda st: published.append(to_status(st)),
        on_round=on_round,
        round_cost=round_cost or (lambda n_train: (SIGMA, Q, STEPS)),
        registered=registered,
    )
    return Harness(grid, coordinator, published, reported)


def three(**overrides: dict[str, Any]) -> list[ScriptedHospital]:
    """hospital-a/b/c with 100/200/300 training rows and weight shifts 1/2/3."""
    base = {
        "hospital-a": {"shift": 1.0, "n_train": 100, "n_test": 10, "auroc": 0.6},
        "hospital-b": {"shift": 2.0, "n_train": 200, "n_test": 20, "auroc": 0.7},
        "hospital-c": {"shift": 3.0, "n_train": 300, "n_test": 30, "auroc": 0.8},
    }
    return [
        ScriptedHospital(name, **{**kw, **overrides.get(name, {})}) for name, kw in base.items()
    ]


def hospital_status(h: Harness) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in to_status(h.state)["hospitals"]}


def assert_published_statuses_are_valid(h: Harness) -> None:
    """Every status the loop published is a valid FederatedRun status; the last is final."""
    assert h.published
    for status in h.published:
        FederatedRunStatus.model_validate(status)
    phases = [s["phase"] for s in h.published]
    assert phases[0] == "Running"
    assert phases[-1] in FINAL_PHASES
    final_from = phases.index(phases[-1])
    assert set(phases[final_from:]) == {phases[-1]}  # once final, it stays final


# --------------------------------------------------------------------------- happy path


def test_two_rounds_at_three_hospitals_succeed_with_fedavg_weights() -> None:
    h = harness(three())
    weights = h.run()

    # FedAvg by training rows: mean shift (1·100 + 2·200 + 3·300) / 600 per round.
    shift = (100 + 400 + 900) / 600
    assert weights is not None
    assert np.allclose(weights[0], np.full((1, N_FEATURES), 2 * shift))
    assert np.allclose(weights[1], [2 * shift])
    round2 = h.grid.trains(2)
    assert len(round2) == 3
    sent = round2[0].content.array_records[protocol.WEIGHTS].to_numpy_ndarrays()
    assert np.allclose(sent[0], shift)  # round 2 starts from round 1's aggregate
    assert [m.content.config_records[protocol.CONFIG]["evaluate_first"] for m in round2] == [
        True
    ] * 3
    assert not any(
        m.content.config_records[protocol.CONFIG]["evaluate_first"] for m in h.grid.trains(1)
    )

    st = h.state
    assert (st.phase, st.reason) == ("Succeeded", "RoundsCompleted")
    status = to_status(st)
    assert status["round"] == {"current": 2, "total": 2}
    assert status["progress"] == "2/2"
    assert "2 rounds completed" in status["message"]
    assert {x["state"] for x in status["hospitals"]} == {"Done"}
    assert {x["restarts"] for x in status["hospitals"]} == {0}
    assert_published_statuses_are_valid(h)


def test_metrics_are_example_weighted_per_round() -> None:
    h = harness(three())
    h.run()
    # Test rows 10/20/30; final AUROCs 0.6/0.7/0.8; round-1 model evaluated 0.05 lower.
    final_auroc = (0.6 * 10 + 0.7 * 20 + 0.8 * 30) / 60
    status = to_status(h.state)
    assert status["metrics"]["round"] == 2
    assert status["metrics"]["auroc"] == pytest.approx(final_auroc, abs=1e-4)
    assert status["metrics"]["accuracy"] == pytest.approx(0.9)
    history = to_history(h.state)
    r1, r2 = history["rounds"]
    assert r1["evaluation"]["auroc"] == pytest.approx(final_auroc - 0.05, abs=1e-4)
    assert r2["evaluation"]["auroc"] == pytest.approx(final_auroc, abs=1e-4)
    assert r1["hospitalsTrained"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert r1["trainLoss"] == pytest.approx(0.6)
    assert set(r1["hospitalEvaluation"]) == {"hospital-a", "hospital-b", "hospital-c"}
    # Each round reaches on_round with its evaluation at last (MLflow logging).
    last_report = {rnd: ev for rnd, ev in h.reported_rounds}
    assert last_report[1]["auroc"] == pytest.approx(final_auroc - 0.05)
    assert last_report[2]["auroc"] == pytest.approx(final_auroc)


def test_epsilon_is_accounted_by_the_server_and_the_max_is_shown() -> None:
    # hospital-a claims more than the accountant says, hospital-b less: both show the max.
    h = harness(
        three(**{"hospital-a": {"reported_epsilon": 9.0}, "hospital-b": {"reported_epsilon": 0.1}})
    )
    h.run()
    ha, hb, hc = (h.state.hospitals[n] for n in ("hospital-a", "hospital-b", "hospital-c"))
    for hs in (ha, hb, hc):
        assert hs.history == [(SIGMA, Q, STEPS)] * 2
        assert hs.epsilon_accounted == pytest.approx(EPS_TWO_ROUNDS)
    assert ha.epsilon == 9.0
    assert hb.epsilon == pytest.approx(EPS_TWO_ROUNDS)
    privacy = to_status(h.state)["privacy"]
    assert privacy["epsilonSpent"] == 9.0
    assert [p["steps"] for p in privacy["hospitals"]] == [2 * STEPS] * 3
    assert privacy["hospitals"][1]["epsilon"] == round(EPS_TWO_ROUNDS, 4)


def test_shutdown_reaches_every_connected_hospital() -> None:
    hospitals = three()
    h = harness(hospitals)
    h.run()
    h.coordinator.shutdown_hospitals()
    for hospital in hospitals:
        kinds = [m.metadata.message_type for m in hospital.received]
        assert kinds[-1] == protocol.SHUTDOWN


# --------------------------------------------------------------------------- failures


def test_hospital_with_bad_data_fails_and_the_run_goes_on_without_it() -> None:
    bad = "hospital-c.csv row 7: column 'age' must be a number (got 'old')"
    hospitals = three(**{"hospital-c": {"hello": (Outcome.FAILED, bad)}})
    h = harness(hospitals, min_hospitals=2)
    weights = h.run()

    assert h.state.phase == "Succeeded"
    status = hospital_status(h)
    assert status["hospital-c"]["state"] == "Failed"
    assert status["hospital-c"]["message"] == bad
    assert status["hospital-a"]["state"] == status["hospital-b"]["state"] == "Done"
    assert not [m for m in hospitals[2].received if m.metadata.message_type == protocol.TRAIN]
    shift = (100 * 1 + 200 * 2) / 300  # FedAvg over a and b only
    assert weights is not None
    assert np.allclose(weights[1], [2 * shift])
    assert_published_statuses_are_valid(h)


def test_the_join_grace_counts_from_when_enough_hospitals_joined() -> None:
    """Hospitals that all start slowly (imports, image pulls) still all train round 1: the
    grace is how long the first ``minHospitals`` wait for the rest, not a start deadline."""
    h = harness(three(), min_hospitals=2, round_timeout_s=8.0, join_grace_s=1.0)
    late = {"hospital-a": 8, "hospital-b": 8, "hospital-c": 11}  # listings, 0.2 s apart
    for name, listings in late.items():
        node = h.grid.node_of(name)
        h.grid.returning[node] = (listings, h.grid.nodes.pop(node))
    assert h.run() is not None
    assert {h.grid.nodes[m.metadata.dst_node_id].name for m in h.grid.trains(1)} == set(late)
    assert_published_statuses_are_valid(h)


def test_too_few_hospitals_fails_fast_naming_the_failed_ones() -> None:
    hospitals = three(
        **{
            "hospital-b": {"hello": (Outcome.FAILED, "hospital-b.csv: no such file")},
            "hospital-c": {"hello": (Outcome.FAILED, "hospital-c.csv row 3: bad stroke")},
        }
    )
    h = harness(hospitals, min_hospitals=2, round_timeout_s=3.0, join_grace_s=1.0)
    started = time.monotonic()
    assert h.run() is None
    assert time.monotonic() - started < 2.5  # gave up without waiting out the timeout

    st = h.state
    assert (st.phase, st.reason) == ("Failed", "TooFewHospitals")
    assert st.message.startswith("2 of 3 hospitals failed (hospital-")
    assert st.message.endswith("; the other 1 cannot reach minHospitals 2")
    assert "hospital-b: hospital-b.csv: no such file" in st.message
    assert "hospital-c: hospital-c.csv row 3: bad stroke" in st.message
    assert "hospital-a:" not in st.message
    assert not h.grid.trains(1)
    failed = next(c for c in to_status(st)["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "TooFewHospitals")
    assert_published_statuses_are_valid(h)


def test_hospitals_failing_in_training_stop_the_run() -> None:
    hospitals = three(
        **{"hospital-b": {"train": {1: "failed"}}, "hospital-c": {"train": {1: "failed"}}}
    )
    h = harness(hospitals, min_hospitals=2)
    h.run()
    st = h.state
    assert (st.phase, st.reason) == ("Failed", "TooFewHospitals")
    assert st.message.startswith("round 1: 1 hospitals returned an update")
    assert "hospital-b: hospital-b: disk full" in st.message
    assert st.current_round == 0
    assert hospital_status(h)["hospital-c"]["state"] == "Failed"
    assert not h.grid.trains(2)


def test_hospital_out_of_budget_is_done_and_the_others_finish() -> None:
    hospitals = three(**{"hospital-c": {"train": {2: "budget"}}})
    h = harness(hospitals, min_hospitals=2)
    weights = h.run()

    assert h.state.phase == "Succeeded"
    c = hospital_status(h)["hospital-c"]
    assert c["state"] == "Done"
    assert "would spend too much" in c["message"]
    assert h.state.rounds[1].hospitals_trained == ["hospital-a", "hospital-b"]
    shift1 = (100 + 400 + 900) / 600
    shift2 = (100 + 400) / 300
    assert weights is not None
    assert np.allclose(weights[1], [shift1 + shift2])


def test_budget_refusals_below_min_hospitals_end_in_budget_exhausted() -> None:
    hospitals = three(**{"hospital-c": {"train": {2: "budget"}}})
    h = harness(hospitals, min_hospitals=3)
    h.run()

    st = h.state
    assert (st.phase, st.reason) == ("BudgetExhausted", "BudgetExhausted")
    assert "stopped before round 2" in st.message
    status = to_status(st)
    assert status["progress"] == "1/2"
    assert hospital_status(h)["hospital-c"]["state"] == "Done"
    budget = next(c for c in status["conditions"] if c["type"] == "BudgetExhausted")
    assert budget["status"] == "True"
    assert_published_statuses_are_valid(h)


def test_server_refuses_a_round_that_would_exceed_the_target() -> None:
    # One round costs ε ≈ 2.48, two ≈ 2.97: a target in between allows exactly one round.
    target = (EPS_ONE_ROUND + EPS_TWO_ROUNDS) / 2
    h = harness(three(), rounds=3, min_hospitals=2, target_epsilon=target)
    h.run()

    st = h.state
    assert st.phase == "BudgetExhausted"
    assert len(h.grid.trains(1)) == 3
    assert h.grid.trains(2) == []  # refused before anything was sent
    assert st.current_round == 1
    for hs in st.hospitals.values():
        assert hs.state == "Done" and hs.budget_exhausted
        assert hs.message == "privacy budget reached; no more rounds"
    spent = to_status(st)["privacy"]["epsilonSpent"]
    assert spent == round(EPS_ONE_ROUND, 4)
    assert spent <= target


def test_can_afford_round_projects_one_more_round() -> None:
    hospitals = three()
    for target, affordable in ((EPS_TWO_ROUNDS + 0.01, True), (EPS_TWO_ROUNDS - 0.01, False)):
        h = harness(hospitals, target_epsilon=target)
        a = h.state.hospitals["hospital-a"]
        a.num_train = 100
        a.noise_multiplier, a.sample_rate, a.steps_per_round = SIGMA, Q, STEPS
        a.history = [(SIGMA, Q, STEPS)]
        assert h.coordinator.can_afford_round("hospital-a") is affordable
        # Nothing trained yet: the plan's cost of the first round is checked.
        b = h.state.hospitals["hospital-b"]
        assert not h.coordinator.can_afford_round("hospital-b")  # no row count: no plan
        b.num_train = 200
        assert h.coordinator.can_afford_round("hospital-b")
    no_privacy = harness(hospitals, target_epsilon=None)
    a = no_privacy.state.hospitals["hospital-a"]
    a.noise_multiplier, a.sample_rate, a.steps_per_round = SIGMA, Q, STEPS
    a.history = [(SIGMA, Q, STEPS)] * 50
    assert no_privacy.coordinator.can_afford_round("hospital-a")


def test_server_checks_the_first_round_too() -> None:
    """A plan whose first round alone overspends: no round is sent at all.

    The scripted hospitals train whatever they are sent (they check nothing), so only the
    server's own check stands between the spec and an overspent first round.
    """
    target = EPS_ONE_ROUND / 2
    h = harness(three(), rounds=3, min_hospitals=2, target_epsilon=target)
    h.run()

    assert h.state.phase == "BudgetExhausted"
    assert h.grid.trains(1) == []
    assert to_status(h.state)["privacy"]["epsilonSpent"] == 0.0
    for hs in h.state.hospitals.values():
        assert hs.budget_exhausted and hs.rounds_trained == 0


def test_reported_cost_is_checked_when_it_exceeds_the_plan() -> None:
    """A hospital that reports a lower σ than the plan's is held to what it reported."""
    h = harness(three(), target_epsilon=EPS_ONE_ROUND * 1.5)
    a = h.state.hospitals["hospital-a"]
    a.num_train = 100
    assert h.coordinator.can_afford_round("hospital-a")
    a.noise_multiplier, a.sample_rate, a.steps_per_round = SIGMA / 2, Q, STEPS
    assert not h.coordinator.can_afford_round("hospital-a")


# --------------------------------------------------------------------------- identity


def test_a_node_cannot_speak_for_another_hospital() -> None:
    """hospital-c's node (registered for c's key) says it is hospital-b and reports a failure.

    The claim is refused: hospital-b trains on its own node, and the liar, hospital-c, is
    failed. Before node ids were checked against the registered keys, this failed
    hospital-b and then the run.
    """
    registered = {1000: "hospital-a", 1001: "hospital-b", 1002: "hospital-c"}
    h = harness(three(), min_hospitals=3, registered=registered)
    assert h.grid.node_of("hospital-c") == 1002
    h.grid.nodes[1002] = ScriptedHospital(
        "hospital-b", n_train=300, hello=(Outcome.FAILED, "hospital-b: disk full")
    )
    h.run()

    st = h.state
    b, c = st.hospitals["hospital-b"], st.hospitals["hospital-c"]
    assert b.state != "Failed" and b.node_id == 1001
    assert c.state == "Failed"
    assert "claimed to be another hospital ('hospital-b')" in c.message
    # hospital-c failed, so minHospitals 3 cannot be met: the run says so, naming c only.
    assert (st.phase, st.reason) == ("Failed", "TooFewHospitals")
    assert "hospital-c" in st.message and "hospital-b:" not in st.message


def test_a_node_with_no_registered_key_is_ignored() -> None:
    hospitals = three()
    h = harness(hospitals, min_hospitals=2, registered={1000: "hospital-a", 1001: "hospital-b"})
    h.run()
    st = h.state
    assert st.phase == "Succeeded"
    assert st.hospitals["hospital-c"].node_id is None
    assert st.rounds[0].hospitals_trained == ["hospital-a", "hospital-b"]


# --------------------------------------------------------------------------- restarts


def test_restarted_hospital_is_recognised_and_gets_the_round_again() -> None:
    hospitals = three()
    h = harness(hospitals, target_epsilon=None, round_timeout_s=3.0)
    grid = h.grid
    old_node = grid.node_of("hospital-b")
    new_node = 4242
    reborn = ScriptedHospital("hospital-b", shift=2.0, n_train=200, n_test=20, incarnation="2")

    def crash(msg: Message) -> None:
        """hospital-b's pod dies on round 1; the Job's next pod joins as a new node."""
        del grid.nodes[old_node]
        grid.nodes[new_node] = reborn

    hospitals[1].train[1] = crash
    weights = h.run()

    assert h.state.phase == "Succeeded"
    b = h.state.hospitals["hospital-b"]
    assert b.restarts == 1
    assert (b.node_id, b.incarnation) == (new_node, "2")
    assert hospital_status(h)["hospital-b"]["restarts"] == 1
    resent = [m for m in grid.trains(1) if m.metadata.dst_node_id == new_node]
    assert len(resent) == 1
    first = next(m for m in grid.trains(1) if m.metadata.dst_node_id == old_node)
    for a, b_ in zip(
        first.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays(),
        resent[0].content.array_records[protocol.WEIGHTS].to_numpy_ndarrays(),
        strict=True,
    ):
        assert np.array_equal(a, b_)
    assert [m.metadata.message_type for m in reborn.received][:2] == [
        protocol.HELLO,
        protocol.TRAIN,
    ]
    assert h.state.rounds[0].hospitals_trained == ["hospital-a", "hospital-b", "hospital-c"]
    shift = (100 + 400 + 900) / 600
    assert weights is not None
    assert np.allclose(weights[1], [2 * shift])


# --------------------------------------------------------------------------- rejoin, same node
# With node authentication a node id is the hospital's registered key: a restarted hospital
# comes back on the same node id with a new incarnation, and the SuperLink answers what was
# sent to the lost incarnation with a NODE_UNAVAILABLE error.


def node_unavailable(msg: Message) -> Message:
    """The SuperLink's own answer to a message whose node stopped sending heartbeats."""
    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


@dataclass
class CrashingHospital(ScriptedHospital):
    """A hospital whose ClientApp raises: Flower answers every message with an error."""

    def __call__(self, msg: Message) -> Message | None:
        self.received.append(msg)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ImportError: numpy")
        return Message(error=error, reply_to=msg)


def hellos_to(grid: FakeGrid, node: int) -> list[Message]:
    return [
        m
        for m in grid.sent
        if m.metadata.message_type == protocol.HELLO and m.metadata.dst_node_id == node
    ]


def trains_to(grid: FakeGrid, server_round: int, node: int) -> list[Message]:
    return [m for m in grid.trains(server_round) if m.metadata.dst_node_id == node]


def was_published_lost(h: Harness, name: str) -> bool:
    """Whether some published status showed ``name`` waiting to rejoin."""
    return any(
        x["name"] == name and x["state"] == "Pending" and "lost connection" in x.get("message", "")
        for status in h.published
        for x in status["hospitals"]
    )


def test_the_fake_s_node_unavailable_answer_is_flower_s() -> None:
    """The fake's error reply is what the coordinator keys on (guards the tests below)."""
    msg = Message(RecordDict(), 1001, protocol.TRAIN, ttl=60.0)
    msg.metadata.__dict__["_message_id"] = "m-1"
    reply = node_unavailable(msg)
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert reply.metadata.reply_to_message_id == "m-1"
    assert "Node Unavailable" in (reply.error.reason or "")


@pytest.mark.parametrize(
    ("missing", "incarnation", "restarts"),
    [
        pytest.param(1, "2", 1, id="restart-node-gone-then-back"),
        pytest.param(0, "2", 1, id="restart-node-listed-throughout"),
        # The same SuperNode back after its heartbeats lapsed: no restart, still re-sent.
        pytest.param(1, "1", 0, id="same-incarnation-after-heartbeat-lapse"),
    ],
)
def test_hospital_back_on_its_registered_node_gets_the_round_again(
    monkeypatch: pytest.MonkeyPatch, missing: int, incarnation: str, restarts: int
) -> None:
    monkeypatch.setattr(coordinator_module, "NODE_REFRESH_S", 0.05)
    hospitals = three()
    # A generous deadline: the re-send must come well within it, not at it.
    h = harness(hospitals, target_epsilon=None, round_timeout_s=10.0)
    grid = h.grid
    node = grid.node_of("hospital-b")
    reborn = ScriptedHospital(
        "hospital-b", shift=2.0, n_train=200, n_test=20, incarnation=incarnation
    )

    def crash(msg: Message) -> Message:
        """hospital-b's node goes offline during round 1 and comes back on its node id."""
        del grid.nodes[node]
        grid.returning[node] = (missing, reborn)
        return node_unavailable(msg)

    hospitals[1].train[1] = crash
    started = time.monotonic()
    weights = h.run()

    assert time.monotonic() - started < 5.0
    assert (h.state.phase, h.state.reason) == ("Succeeded", "RoundsCompleted")
    b = h.state.hospitals["hospital-b"]
    assert (b.node_id, b.incarnation, b.restarts) == (node, incarnation, restarts)
    assert hospital_status(h)["hospital-b"]["restarts"] == restarts
    assert was_published_lost(h, "hospital-b")
    if missing:
        assert any(node not in listing for listing in grid.listings)
    else:
        assert all(node in listing for listing in grid.listings)
    # Greeted again on the same node; the round's message sent again, unchanged.
    assert len(hellos_to(grid, node)) == 2
    lost, resent = trains_to(grid, 1, node)
    for x, y in zip(
        lost.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays(),
        resent.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays(),
        strict=True,
    ):
        assert np.array_equal(x, y)
    assert [m.metadata.message_type for m in reborn.received][:2] == [
        protocol.HELLO,
        protocol.TRAIN,
    ]
    # hospital-b's update is in round 1: FedAvg over all three, both rounds.
    assert h.state.rounds[0].hospitals_trained == ["hospital-a", "hospital-b", "hospital-c"]
    assert h.state.rounds[1].hospitals_trained == ["hospital-a", "hospital-b", "hospital-c"]
    shift = (100 + 400 + 900) / 600
    assert weights is not None
    assert np.allclose(weights[1], [2 * shift])
    assert {x["state"] for x in to_status(h.state)["hospitals"]} == {"Done"}
    assert_published_statuses_are_valid(h)


@pytest.mark.parametrize("min_hospitals", [2, 3])
def test_hospital_that_never_comes_back_misses_the_round_at_its_timeout(
    monkeypatch: pytest.MonkeyPatch, min_hospitals: int
) -> None:
    monkeypatch.setattr(coordinator_module, "NODE_REFRESH_S", 0.05)
    timeout_s = 1.0
    hospitals = three()
    h = harness(
        hospitals, target_epsilon=None, min_hospitals=min_hospitals, round_timeout_s=timeout_s
    )
    grid = h.grid
    node = grid.node_of("hospital-b")

    def crash(msg: Message) -> Message:
        """hospital-b goes away for good during round 1."""
        del grid.nodes[node]
        return node_unavailable(msg)

    hospitals[1].train[1] = crash
    started = time.monotonic()
    weights = h.run()
    elapsed = time.monotonic() - started

    b = h.state.hospitals["hospital-b"]
    # Lost, not failed: Flower's error is no verdict on the hospital.
    assert b.state != "Failed"
    assert "client error" not in b.message
    assert (b.node_id, b.restarts) == (None, 0)
    assert was_published_lost(h, "hospital-b")
    assert len(hellos_to(grid, node)) == 1
    assert len(trains_to(grid, 1, node)) == 1  # nothing re-sent to a node that did not return
    assert not trains_to(grid, 2, node)
    assert elapsed >= timeout_s  # round 1 waited for hospital-b until its deadline
    st = h.state
    if min_hospitals == 2:
        # Two updates are enough: the run goes on without hospital-b, which stays Pending.
        assert (st.phase, st.reason) == ("Succeeded", "RoundsCompleted")
        assert st.rounds[0].duration_s >= timeout_s
        assert st.rounds[0].hospitals_trained == ["hospital-a", "hospital-c"]
        assert st.rounds[1].hospitals_trained == ["hospital-a", "hospital-c"]
        assert (b.state, b.message) == ("Pending", "no reply in round 1 within 1s")
        shift = (100 * 1 + 300 * 3) / 400  # FedAvg over a and c only
        assert weights is not None
        assert np.allclose(weights[1], [2 * shift])
    else:
        # Two updates are too few: the run fails at round 1's end, naming no failed hospital.
        assert (st.phase, st.reason) == ("Failed", "TooFewHospitals")
        assert st.message == "round 1: 2 hospitals returned an update, minHospitals is 3."
        assert st.rounds == [] and st.current_round == 0
        assert (b.state, b.message) == ("Pending", "no reply in round 1 within 1s")
    assert_published_statuses_are_valid(h)


def test_a_node_that_went_away_and_came_back_is_greeted_again() -> None:
    hospitals = three()
    h = harness(hospitals)
    grid, coord = h.grid, h.coordinator
    node = grid.node_of("hospital-b")
    b = h.state.hospitals["hospital-b"]

    coord.refresh_nodes(force=True)
    assert (b.state, b.node_id, b.incarnation) == ("Connected", node, "1")
    del grid.nodes[node]
    coord.refresh_nodes(force=True)
    assert (b.state, b.node_id) == ("Pending", None)
    assert "lost connection" in b.message
    reborn = ScriptedHospital("hospital-b", n_train=200, n_test=20, incarnation="2")
    grid.nodes[node] = reborn  # the same registered key, a new SuperNode
    coord.refresh_nodes(force=True)

    assert len(hellos_to(grid, node)) == 2
    assert [m.metadata.message_type for m in reborn.received] == [protocol.HELLO]
    assert (b.state, b.node_id, b.incarnation, b.restarts) == ("Connected", node, "2", 1)
    # A node that stays is greeted once: no hello at every refresh.
    coord.refresh_nodes(force=True)
    assert len(hellos_to(grid, node)) == 2
    for other in ("hospital-a", "hospital-c"):
        assert len(hellos_to(grid, grid.node_of(other))) == 1


def test_a_node_whose_hello_failed_is_greeted_again_once_it_came_back() -> None:
    hospitals = three()
    h = harness(hospitals)
    grid, coord = h.grid, h.coordinator
    node = grid.node_of("hospital-b")
    b = h.state.hospitals["hospital-b"]
    grid.nodes[node] = CrashingHospital("hospital-b")

    coord.refresh_nodes(force=True)
    coord.refresh_nodes(force=True)
    # Flower's error to the hello: ignored, and not asked again while the node stays.
    assert len(hellos_to(grid, node)) == 1
    assert (b.state, b.node_id) == ("Pending", None)
    del grid.nodes[node]
    coord.refresh_nodes(force=True)
    grid.nodes[node] = hospitals[1]  # restarted with a working ClientApp, same key
    coord.refresh_nodes(force=True)

    assert len(hellos_to(grid, node)) == 2
    assert [m.metadata.message_type for m in hospitals[1].received] == [protocol.HELLO]
    assert (b.state, b.node_id, b.restarts) == ("Connected", node, 0)
