"""The ServerApp's round loop: who trains, what comes back, when the run ends.

It talks to hospitals only through Flower's public ``Grid`` (push/pull with a short
poll instead of ``send_and_receive``'s 3 s one), attributes every reply to a hospital,
accounts each hospital's ε on its own from (σ, q, steps), and stops with
``BudgetExhausted`` rather than let a round take a hospital over its target.

Which node is which hospital: with node authentication (every secure run) each hospital's
node id is the one Flower gave its registered public key, and the coordinator is given that
map (``registered``): a node's claim to be another hospital is refused, and fails the
hospital whose key the node holds. Without it (an insecure run) a node is whichever
hospital it says it is, and a restarted hospital may come back on a new node id.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedrun_core.accounting import over_target
from fedrun_core.schema import MAX_ROWS, DataCounts
from fedrun_core.states import STARTING_MESSAGE, HospitalState, Phase, Reason
from fedrun_core.times import now_rfc3339
from fedrun_trainer.common import protocol
from fedrun_trainer.common.protocol import HospitalReply, Outcome
from fedrun_trainer.common.scores import BINS, auroc_from_counts, checked_counts
from fedrun_trainer.server.run_state import RoundRecord, RunState

log = logging.getLogger("fedrun.server")

Weights = list[np.ndarray]
POLL_S = 0.05
NODE_REFRESH_S = 1.0
TRAIN_TTL_S = 3600.0
#: The most steps a hospital's ledger may claim (a larger figure is ignored, not trusted).
MAX_LEDGER_STEPS = 10**9


#: What one more round costs a hospital: (σ, q, steps), from the spec and its row count.
RoundCost = tuple[float, float, int]


@dataclass(frozen=True)
class CoordinatorSettings:
    """The parts of the spec the round loop needs."""

    rounds: int
    min_hospitals: int
    round_timeout_s: float
    join_grace_s: float
    privacy_enabled: bool
    target_epsilon: float | None
    delta: float
    accountant: str


def decode_reply(msg: Message) -> HospitalReply | None:
    """The hospital's reply, or ``None`` when Flower delivered an error instead."""
    if msg.has_error():
        return None
    info = msg.content.config_records.get(protocol.INFO)
    if info is None:
        return None
    metric = msg.content.metric_records

    def numbers(key: str) -> dict[str, float]:
        rec = metric.get(key)
        return {k: float(v) for k, v in rec.items()} if rec is not None else {}  # type: ignore[arg-type]

    return HospitalReply(
        hospital=str(info["hospital"]),
        outcome=Outcome(str(info["outcome"])),
        message=str(info.get("message", "")),
        incarnation=str(info.get("incarnation", "")),
        metrics=numbers(protocol.METRICS),
        evaluation=numbers(protocol.EVAL),
        privacy=numbers(protocol.PRIVACY),
        scores=count_lists(metric.get(protocol.SCORES)),
        weights=(
            msg.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays()
            if protocol.WEIGHTS in msg.content.array_records
            else None
        ),
    )


def count_lists(record: Any) -> dict[str, list[float]]:
    """The list entries of a reply's scores record (anything else is dropped)."""
    if record is None:
        return {}
    return {
        k: [float(x) for x in v]
        for k, v in record.items()
        if k in ("negatives", "positives") and isinstance(v, list)
    }


def pooled_auroc(
    per_hospital: dict[str, dict[str, list[float]]], examples: dict[str, float]
) -> float | None:
    """The AUROC of every hospital's test rows together, from their summed score counts
    (:mod:`fedrun_trainer.common.scores`); a hospital whose counts are not well-formed
    (wrong length, not whole, more than its test rows) is left out, and None is returned
    when no hospital's counts can be used."""
    negatives = [0] * BINS
    positives = [0] * BINS
    used = 0
    for name, counts in per_hospital.items():
        rows = examples.get(name, 0.0)
        if not (math.isfinite(rows) and 0 <= rows <= MAX_ROWS):
            continue  # the evaluation itself is not well-formed
        limit = int(rows)
        neg = checked_counts(counts.get("negatives", []), limit)
        pos = checked_counts(counts.get("positives", []), limit)
        if neg is None or pos is None or sum(neg) + sum(pos) != limit:
            log.warning("%s: its score counts are not well-formed; left out of pooled AUROC", name)
            continue
        negatives = [a + b for a, b in zip(negatives, neg, strict=True)]
        positives = [a + b for a, b in zip(positives, pos, strict=True)]
        used += 1
    return auroc_from_counts(negatives, positives) if used else None


def _from(msg: Message, node_id: int) -> bool:
    """Whether a reply came from the node its message was sent to (else it is dropped)."""
    if msg.metadata.src_node_id == node_id:
        return True
    log.warning(
        "a reply meant to come from node %s came from node %s; ignored",
        node_id,
        msg.metadata.src_node_id,
    )
    return False


def weighted_mean(values: Iterable[tuple[float | None, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, skipping missing values; ``None`` if nothing is left."""
    pairs = [(v, w) for v, w in values if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return None if total == 0 else sum(v * w for v, w in pairs) / total


def aggregate_evaluation(
    per_hospital: dict[str, dict[str, float]],
    scores: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, float | None]:
    """Example-weighted means of each hospital's held-out metrics and, from the hospitals'
    score counts, ``pooledAuroc``: the AUROC of all their test rows together."""
    keys = ("loss", "auroc", "auprc", "accuracy")
    out: dict[str, float | None] = {}
    for key in keys:
        out[key] = weighted_mean(
            (ev.get(key), ev.get("num_examples", 0.0)) for ev in per_hospital.values()
        )
    if scores:
        examples = {n: ev.get("num_examples", 0.0) for n, ev in per_hospital.items()}
        out["pooledAuroc"] = pooled_auroc(
            {n: s for n, s in scores.items() if n in per_hospital}, examples
        )
    return out


class Coordinator:
    """Drives one run over a Flower ``Grid``; state changes are published via ``publish``."""

    def __init__(
        self,
        grid: Grid,
        state: RunState,
        settings: CoordinatorSettings,
        aggregate: Callable[[Weights, list[tuple[Weights, int]]], Weights],
        epsilon_of: Callable[[list[tuple[float, float, int]]], float],
        publish: Callable[[RunState], None],
        on_round: Callable[[RunState, RoundRecord], None] | None = None,
        round_cost: Callable[[int], RoundCost] | None = None,
        registered: dict[int, str] | None = None,
        on_checkpoint: Callable[[RunState, Weights], None] | None = None,
    ) -> None:
        """``round_cost(n_train)`` is what a round costs a hospital with ``n_train`` rows
        under the spec (its plan); with privacy on and no way to tell, no round is sent.
        ``registered`` maps each registered node id to its hospital (node authentication);
        None when the run has no node authentication. ``on_checkpoint(state, weights)`` is
        called after every aggregated round with the new global weights, before the round
        is published as done.
        """
        self.grid = grid
        self.state = state
        self.settings = settings
        self.aggregate = aggregate
        self.epsilon_of = epsilon_of
        self.publish = publish
        self.on_round = on_round
        self.round_cost = round_cost
        self.registered = dict(registered) if registered is not None else None
        self.on_checkpoint = on_checkpoint
        self._node_hospital: dict[int, str] = {}
        self._dead_nodes: set[int] = set()
        self._hello_pending: dict[int, str] = {}
        self._last_refresh = 0.0

    # -- nodes ------------------------------------------------------------------------
    def _send(
        self, node_id: int, message_type: str, content: RecordDict, ttl: float = TRAIN_TTL_S
    ) -> str:
        msg = Message(content=content, dst_node_id=node_id, message_type=message_type, ttl=ttl)
        return next(iter(self.grid.push_messages([msg])))

    def refresh_nodes(self, force: bool = False) -> None:
        """Greet nodes that appeared, and attribute the answers that came in to hospitals.

        Never blocks: a hello stays pending until its node answers (a hospital's executor
        can take a while to start on a busy machine) or the node disappears.
        """
        if not force and time.monotonic() - self._last_refresh < NODE_REFRESH_S:
            return
        self._last_refresh = time.monotonic()
        current = set(self.grid.get_node_ids())
        for node_id, hospital in list(self._node_hospital.items()):
            if node_id not in current:
                self._lose(node_id, hospital)
        # A node id is its hospital's registered key: a node that went away may come back
        # (a restarted hospital), and is then greeted again.
        self._dead_nodes &= current
        for node_id in list(self._hello_pending):
            if node_id not in current:
                del self._hello_pending[node_id]
        for node_id in current:
            known = node_id in self._node_hospital or node_id in self._dead_nodes
            if not known and node_id not in self._hello_pending:
                self._hello_pending[node_id] = self._send(
                    node_id, protocol.HELLO, RecordDict(), ttl=self.settings.round_timeout_s
                )
        if not self._hello_pending:
            return
        by_id = {mid: node for node, mid in self._hello_pending.items()}
        for reply_msg in self.grid.pull_messages(list(by_id)):
            node_id = by_id[reply_msg.metadata.reply_to_message_id]
            del self._hello_pending[node_id]
            reply = decode_reply(reply_msg) if _from(reply_msg, node_id) else None
            if reply is None:
                self._dead_nodes.add(node_id)  # Flower error: ignore; a restart reconnects
                continue
            owner = self._owner(node_id, reply)
            if owner is None:
                self._dead_nodes.add(node_id)
                continue
            self._node_hospital[node_id] = owner
            self._attach(node_id, reply)

    def _owner(self, node_id: int, reply: HospitalReply) -> str | None:
        """The hospital a node speaks for, or None when its claim is refused.

        With registered keys the node speaks only for the hospital whose key it holds: a
        claim to be another hospital fails the key's own hospital (a node that lies about
        who it is cannot be trusted to train) and is never attributed to the one it named.
        """
        if self.registered is None:
            return reply.hospital
        owner = self.registered.get(node_id)
        if owner is None:
            log.warning("node %s holds no registered key of this run; ignored", node_id)
            return None
        if reply.hospital != owner:
            log.error(
                "node %s holds hospital %s's key but says it is %r: refused",
                node_id,
                owner,
                reply.hospital,
            )
            h = self.state.hospitals.get(owner)
            if h is not None and h.state != HospitalState.FAILED:
                h.node_id = node_id
                self._fail_hospital(
                    owner,
                    f"its node (registered for {owner}) claimed to be another hospital "
                    f"({reply.hospital!r}); the claim was refused",
                )
                self.publish(self.state)
            return None
        return owner

    def _lose(self, node_id: int, hospital: str) -> None:
        """Forget a node that went offline; its hospital waits to rejoin (same or new node)."""
        self._node_hospital.pop(node_id, None)
        h = self.state.hospitals.get(hospital)
        if (
            h is not None
            and h.node_id == node_id
            and h.state not in (HospitalState.DONE, HospitalState.FAILED)
        ):
            h.state, h.node_id = HospitalState.PENDING, None
            h.message = "lost connection; waiting for the hospital to rejoin"
            self.publish(self.state)

    def _attach(self, node_id: int, reply: HospitalReply) -> None:
        h = self.state.hospitals.get(reply.hospital)
        if h is None:
            log.warning("node %s says it is unknown hospital %r; ignored", node_id, reply.hospital)
            return
        if h.incarnation and reply.incarnation != h.incarnation:
            h.restarts += 1
            log.info("hospital %s rejoined (restart %d)", h.name, h.restarts)
        h.incarnation = reply.incarnation
        h.node_id = node_id
        h.num_train = int(reply.metrics.get("num_train", h.num_train))
        h.num_test = int(reply.metrics.get("num_test", h.num_test))
        h.num_features = int(reply.metrics.get("num_features", h.num_features))
        h.data = DataCounts.from_metrics(reply.metrics, list(self.state.columns)) or h.data
        if reply.outcome is Outcome.FAILED:
            self._fail_hospital(h.name, reply.message)
        elif h.state in (HospitalState.PENDING, HospitalState.CONNECTED):
            h.state, h.message = HospitalState.CONNECTED, ""
        self.publish(self.state)

    def _fail_hospital(self, name: str, message: str) -> None:
        h = self.state.hospitals[name]
        h.state, h.message = HospitalState.FAILED, message
        log.error("hospital %s failed: %s", name, message)
        if h.node_id is not None:
            # The acknowledgement lets the hospital's wrapper exit knowing the server has
            # the reason; without it the wrapper could stop before the reply was delivered.
            self._send(h.node_id, protocol.SHUTDOWN, RecordDict(), ttl=60.0)

    def _collect(self, message_ids: list[str], timeout_s: float) -> list[Message]:
        got: dict[str, Message] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(message_ids) and time.monotonic() < deadline:
            for m in self.grid.pull_messages([i for i in message_ids if i not in got]):
                got[m.metadata.reply_to_message_id] = m
            if len(got) < len(message_ids):
                time.sleep(POLL_S)
        return list(got.values())

    def connected(self) -> list[str]:
        """Hospitals that have a live node and can still train."""
        return [n for n, h in self.state.hospitals.items() if h.node_id is not None and h.active]

    def wait_for_hospitals(self) -> bool:
        """Wait until every hospital joined, or ``minHospitals`` did and the grace ran out.

        The grace (``join_grace_s``) counts from the moment ``minHospitals`` had joined: it
        is how long the first ones wait for the rest, however long the first took to start.
        """
        start = time.monotonic()
        hard = start + self.settings.round_timeout_s
        enough_since: float | None = None
        while True:
            self.refresh_nodes(force=True)
            ready = self.connected()
            alive = [h for h in self.state.hospitals.values() if h.state != HospitalState.FAILED]
            enough = len(ready) >= self.settings.min_hospitals
            if not enough:
                enough_since = None
            elif enough_since is None:
                enough_since = time.monotonic()
            if len(ready) == len(alive) and enough:
                return True
            if enough_since is not None and (
                time.monotonic() - enough_since >= self.settings.join_grace_s
            ):
                return True
            if len(alive) < self.settings.min_hospitals:
                return False
            if time.monotonic() >= hard:
                return enough
            self.state.message = (
                f"waiting for hospitals: {len(ready)}/{len(self.state.hospitals)} connected, "
                f"{self.settings.min_hospitals} needed"
            )
            for h in alive:
                if h.node_id is None and not h.message:
                    h.message = STARTING_MESSAGE
            self.publish(self.state)
            time.sleep(0.2)

    # -- privacy ----------------------------------------------------------------------
    def round_costs(self, name: str) -> list[RoundCost]:
        """What one more round may cost ``name``: the plan's figure for its row count, and
        the (σ, q, steps) it last reported when that differs (whichever costs more wins)."""
        h = self.state.hospitals[name]
        costs: list[RoundCost] = []
        if self.round_cost is not None and h.num_train > 0:
            costs.append(self.round_cost(h.num_train))
        reported = (h.noise_multiplier, h.sample_rate, h.steps_per_round)
        if h.steps_per_round > 0 and h.noise_multiplier > 0 and reported not in costs:
            costs.append(reported)
        return costs

    def can_afford_round(self, name: str) -> bool:
        """Server-side budget check before every round, the first included.

        Would one more round, at the spec's plan for this hospital's rows (and at what the
        hospital last reported), take it over the target? With privacy on and no cost known
        (no row count, no report), the answer is no: a round is refused, never guessed.
        """
        h = self.state.hospitals[name]
        target = self.settings.target_epsilon
        if not self.settings.privacy_enabled or target is None:
            return True
        costs = self.round_costs(name)
        if not costs:
            return False
        return not any(over_target(self.epsilon_of([*h.history, cost]), target) for cost in costs)

    def _record_privacy(self, name: str, privacy: dict[str, float]) -> None:
        h = self.state.hospitals[name]
        if not privacy:
            return
        h.epsilon_reported = max(h.epsilon_reported, privacy.get("epsilon", 0.0))
        total = privacy.get("total_steps", 0.0)
        if math.isfinite(total) and 0 <= total <= MAX_LEDGER_STEPS:
            h.ledger_steps = max(h.ledger_steps, int(total))
        sigma, q = privacy.get("noise_multiplier", 0.0), privacy.get("sample_rate", 0.0)
        steps = int(privacy.get("steps", 0))
        if steps > 0 and sigma > 0:
            # A reply's steps may include a catch-up of steps the server's record lacked;
            # one round's steps are the hospital's own figure.
            per_round = int(privacy.get("steps_per_round", 0)) or steps
            h.noise_multiplier, h.sample_rate, h.steps_per_round = sigma, q, per_round
            h.history.append((sigma, q, steps))
            h.epsilon_accounted = self.epsilon_of(h.history)
        elif sigma > 0:
            h.noise_multiplier = sigma
            h.sample_rate = q
            h.steps_per_round = int(privacy.get("steps_per_round", h.steps_per_round))

    # -- rounds -----------------------------------------------------------------------
    def _train_content(
        self, name: str, weights: Weights, server_round: int, evaluate_first: bool
    ) -> RecordDict:
        config: dict[str, Any] = {
            "server_round": server_round,
            "evaluate_first": evaluate_first,
            # Round numbers count within a lineage: a hospital's ledger tells a retried
            # round of this lineage from a round of an earlier server that started over.
            "lineage": self.state.lineage,
        }
        history = self.state.hospitals[name].history
        if history:
            # The server's own record of this hospital's spend: a hospital whose ledger was
            # lost (a new pod on an emptyDir) resumes from it instead of from zero.
            config["spent_sigma"] = [float(s) for s, _, _ in history]
            config["spent_q"] = [float(q) for _, q, _ in history]
            config["spent_steps"] = [int(n) for _, _, n in history]
        return RecordDict(
            {protocol.WEIGHTS: ArrayRecord(weights), protocol.CONFIG: ConfigRecord(config)}
        )

    def _exchange(
        self,
        names: list[str],
        message_type: str,
        content_for: Callable[[str], RecordDict],
        timeout_s: float,
    ) -> dict[str, HospitalReply]:
        """Send to each named hospital, re-sending to a hospital that rejoined meanwhile.

        A hospital rejoins on a new node, or (with node authentication, where a node is its
        registered key) on the same node with a new incarnation: Flower then answers the
        message sent to the lost incarnation with "node unavailable", and the message is
        sent again once the hospital has greeted the server anew.
        """
        pending: dict[str, tuple[int, str, str]] = {}

        def send(name: str) -> None:
            h = self.state.hospitals[name]
            assert h.node_id is not None
            mid = self._send(h.node_id, message_type, content_for(name))
            pending[name] = (h.node_id, h.incarnation, mid)

        for name in names:
            if self.state.hospitals[name].node_id is not None:
                send(name)
        replies: dict[str, HospitalReply] = {}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            by_id = {mid: name for name, (_, _, mid) in pending.items() if mid}
            for msg in self.grid.pull_messages(list(by_id)):
                name = by_id[msg.metadata.reply_to_message_id]
                node = pending[name][0]
                reply = decode_reply(msg) if _from(msg, node) else None
                if msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                    log.info("%s: node %s unavailable; waiting for it to rejoin", name, node)
                    self._lose(node, name)
                    pending[name] = (node, self.state.hospitals[name].incarnation, "")
                    continue
                del pending[name]
                if reply is None:
                    err = msg.error.reason if msg.has_error() else "malformed reply"
                    replies[name] = HospitalReply(name, Outcome.FAILED, f"client error: {err}")
                else:
                    replies[name] = reply
            self.refresh_nodes()
            for name, (node, incarnation, mid) in list(pending.items()):
                h = self.state.hospitals[name]
                if h.state == HospitalState.FAILED:
                    del pending[name]
                elif h.node_id is not None and (
                    h.node_id != node or h.incarnation != incarnation or not mid
                ):
                    log.info("re-sending %s to %s, which rejoined", message_type, name)
                    send(name)
            if pending:
                time.sleep(POLL_S)
        return replies

    def run(
        self, make_initial: Callable[[int], Weights], resume: Weights | None = None
    ) -> Weights | None:
        """Run every round; returns the final global weights. The outcome is in ``state``.

        ``make_initial`` builds the round-0 model for the number of features the hospitals
        reported when they joined (they must agree). ``resume`` is the global model after
        ``state.current_round`` rounds, from a checkpoint that already restored ``state``:
        the hospitals rejoin and training goes on at the next round (a run whose restored
        state is final is only published again). Its shapes must be those ``make_initial``
        gives, or the run fails with ``CheckpointInvalid``.
        """
        st, cfg = self.state, self.settings
        if resume is not None and st.final:
            self.publish(st)
            return resume
        if resume is None:
            st.start_time = now_rfc3339()
        st.phase, st.reason = Phase.RUNNING, Reason.WAITING_FOR_HOSPITALS
        self.publish(st)
        if not self.wait_for_hospitals():
            st.finish(Phase.FAILED, Reason.TOO_FEW_HOSPITALS, self.join_failure())
            self.publish(st)
            return None
        sizes = {
            h.name: h.num_features for h in st.hospitals.values() if h.active and h.num_features
        }
        if len(set(sizes.values())) != 1:
            st.finish(
                Phase.FAILED,
                Reason.INCONSISTENT_DATA,
                f"hospitals disagree on the number of model features: {sizes}",
            )
            self.publish(st)
            return None
        weights = make_initial(next(iter(sizes.values())))
        if resume is not None:
            shapes = [np.shape(w) for w in weights]
            if [np.shape(w) for w in resume] != shapes:
                st.finish(
                    Phase.FAILED,
                    Reason.CHECKPOINT_INVALID,
                    f"the checkpoint's model has shapes {[np.shape(w) for w in resume]}, "
                    f"this run's model {shapes}",
                )
                self.publish(st)
                return None
            weights = [np.asarray(w, dtype=np.float32) for w in resume]
            log.info("resuming after round %d of %d", st.current_round, cfg.rounds)
        elif self.on_checkpoint is not None:
            # Round 0 too: a server lost during round 1 comes back in this lineage, so the
            # hospitals' round 1 is a retried round (answered, not trained again).
            self.on_checkpoint(st, weights)
        for server_round in range(st.current_round + 1, cfg.rounds + 1):
            outcome = self._round(server_round, weights)
            if outcome is None:
                return weights
            weights = outcome
        self._final_evaluation(weights)
        st.finish(
            Phase.SUCCEEDED,
            Reason.ROUNDS_COMPLETED,
            f"{cfg.rounds} rounds completed; ε spent {self._epsilon_text()}",
        )
        self.publish(st)
        return weights

    def _round(self, server_round: int, weights: Weights) -> Weights | None:
        st, cfg = self.state, self.settings
        t0 = time.monotonic()
        st.current_round = server_round - 1
        st.reason = Reason.TRAINING
        self.refresh_nodes(force=True)
        # Wait for a hospital that is restarting, up to the round timeout.
        deadline = time.monotonic() + cfg.round_timeout_s
        while True:
            for name in self.connected():
                if not self.can_afford_round(name):
                    st.hospitals[name].budget_exhausted = True
                    st.hospitals[name].state = HospitalState.DONE
                    st.hospitals[name].message = "privacy budget reached; no more rounds"
            eligible = self.connected()
            if len(eligible) >= cfg.min_hospitals:
                break
            if self._budget_bound():
                self._stop_for_budget(server_round)
                return None
            waiting = [h for h in st.hospitals.values() if h.active and h.node_id is None]
            if not waiting or time.monotonic() >= deadline:
                st.finish(
                    Phase.FAILED,
                    Reason.TOO_FEW_HOSPITALS,
                    f"round {server_round}: {len(eligible)} hospitals available, "
                    f"minHospitals is {cfg.min_hospitals}. {self._failures()}".strip(),
                )
                self.publish(st)
                return None
            st.message = f"round {server_round}: waiting for hospitals to rejoin"
            self.publish(st)
            time.sleep(0.2)
            self.refresh_nodes()
        for name in eligible:
            st.hospitals[name].state = HospitalState.TRAINING
        st.message = f"round {server_round}/{cfg.rounds}: training at {len(eligible)} hospitals"
        self.publish(st)
        replies = self._exchange(
            eligible,
            protocol.TRAIN,
            lambda name: self._train_content(name, weights, server_round, server_round > 1),
            cfg.round_timeout_s,
        )
        # The replies' "evaluate_first" figures judge the previous round's global model.
        results: list[tuple[Weights, int]] = []
        record = RoundRecord(round=server_round)
        prev = st.rounds[-1] if st.rounds else None
        per_eval: dict[str, dict[str, float]] = {}
        per_scores: dict[str, dict[str, list[float]]] = {}
        losses: list[tuple[float | None, float]] = []
        for name in eligible:
            h = st.hospitals[name]
            reply = replies.get(name)
            if reply is None:
                h.state = HospitalState.PENDING if h.node_id is None else HospitalState.CONNECTED
                h.message = f"no reply in round {server_round} within {cfg.round_timeout_s:.0f}s"
                continue
            self._record_privacy(name, reply.privacy)
            if reply.evaluation:
                per_eval[name] = reply.evaluation
                per_scores[name] = reply.scores
            if reply.outcome is Outcome.FAILED:
                self._fail_hospital(name, reply.message)
            elif reply.outcome is Outcome.BUDGET:
                h.budget_exhausted, h.state, h.message = True, HospitalState.DONE, reply.message
            else:
                h.state, h.message = HospitalState.CONNECTED, ""
                h.rounds_trained += 1
                examples = reply.metrics.get("num_examples", 0.0)
                if reply.weights is None or not (
                    math.isfinite(examples) and 0 <= examples <= MAX_ROWS
                ):
                    what = "no model update" if reply.weights is None else "a bad example count"
                    self._fail_hospital(name, f"reply carried {what}")
                    continue
                n = int(examples)
                results.append((reply.weights, n))
                record.hospitals_trained.append(name)
                losses.append((reply.metrics.get("loss"), float(n)))
        if prev is not None and per_eval:
            prev.per_hospital_eval = dict(per_eval)
            prev.evaluation = aggregate_evaluation(per_eval, per_scores)
        for h in st.hospitals.values():
            record.epsilon[h.name] = h.epsilon
        if len(results) < cfg.min_hospitals:
            if self._budget_bound():
                self._stop_for_budget(server_round)
            else:
                st.finish(
                    Phase.FAILED,
                    Reason.TOO_FEW_HOSPITALS,
                    f"round {server_round}: {len(results)} hospitals returned an update, "
                    f"minHospitals is {cfg.min_hospitals}. {self._failures()}".strip(),
                )
            self.publish(st)
            return None
        # Hospitals that only answered a round they had trained before (its update lost)
        # add no examples: with nothing new, the global model stays as it was.
        fresh = any(n > 0 for _, n in results)
        new_weights = self.aggregate(weights, results) if fresh else weights
        record.train_loss = weighted_mean(losses)
        record.duration_s = time.monotonic() - t0
        st.rounds.append(record)
        st.current_round = server_round
        st.message = f"round {server_round}/{cfg.rounds} done; ε spent {self._epsilon_text()}"
        if self.on_checkpoint is not None:
            # Before the round is published as done: a status that says round k is done
            # always has a checkpoint of round k behind it.
            self.on_checkpoint(st, new_weights)
        self.publish(st)
        if self.on_round is not None and prev is not None:
            self.on_round(st, prev)  # complete now: it has its global model's evaluation
        return new_weights

    def _final_evaluation(self, weights: Weights) -> None:
        st = self.state
        names = [
            n
            for n, h in st.hospitals.items()
            if h.node_id is not None and h.state != HospitalState.FAILED
        ]
        content = RecordDict({protocol.WEIGHTS: ArrayRecord(weights)})
        replies = self._exchange(
            names, protocol.EVALUATE, lambda _: content, self.settings.round_timeout_s
        )
        per_eval = {n: r.evaluation for n, r in replies.items() if r.evaluation}
        per_scores = {n: r.scores for n, r in replies.items() if r.evaluation}
        if st.rounds and per_eval:
            st.rounds[-1].per_hospital_eval = per_eval
            st.rounds[-1].evaluation = aggregate_evaluation(per_eval, per_scores)
        if st.rounds and self.on_round is not None:
            self.on_round(st, st.rounds[-1])
        for name, h in st.hospitals.items():
            if h.state != HospitalState.FAILED and name in replies:
                h.state = HospitalState.DONE

    def shutdown_hospitals(self) -> None:
        """Tell every connected hospital the run is over, so its wrapper exits 0."""
        nodes = [h.node_id for h in self.state.hospitals.values() if h.node_id is not None]
        ids = [self._send(n, protocol.SHUTDOWN, RecordDict(), ttl=60.0) for n in nodes]
        self._collect(ids, timeout_s=15.0)

    def _budget_bound(self) -> bool:
        """Whether too few hospitals remain because of their privacy budgets."""
        st = self.state
        capable = [h for h in st.hospitals.values() if h.state != HospitalState.FAILED]
        exhausted = [h for h in capable if h.budget_exhausted]
        return bool(exhausted) and len(capable) - len(exhausted) < self.settings.min_hospitals

    def _stop_for_budget(self, server_round: int) -> None:
        st = self.state
        st.finish(
            Phase.BUDGET_EXHAUSTED,
            Reason.BUDGET_EXHAUSTED,
            f"stopped before round {server_round}: another round would take hospitals "
            f"over targetEpsilon {self.settings.target_epsilon}; ε spent "
            f"{self._epsilon_text()}",
        )
        self.publish(st)

    def _epsilon_text(self) -> str:
        spent = max((h.epsilon for h in self.state.hospitals.values()), default=0.0)
        target = self.settings.target_epsilon
        return f"{spent:.3f}" + (f" of {target}" if target is not None else "")

    def join_failure(self) -> str:
        """Why the run cannot start: who failed and why, who is still starting, and
        whether the rest can reach ``minHospitals``."""
        hospitals = self.state.hospitals.values()
        failed = [h for h in hospitals if h.state == HospitalState.FAILED]
        joined = self.connected()
        starting = [
            h.name for h in hospitals if h.state != HospitalState.FAILED and h.name not in joined
        ]
        total, needed = len(self.state.hospitals), self.settings.min_hospitals
        parts = []
        if failed:
            reasons = "; ".join(f"{h.name}: {h.message or 'failed'}" for h in failed)
            parts.append(f"{len(failed)} of {total} hospitals failed ({reasons})")
        others = total - len(failed)
        if starting and others >= needed:
            parts.append(
                f"{len(joined)} joined and {len(starting)} still starting "
                f"({', '.join(sorted(starting))}) when the round timeout "
                f"({self.settings.round_timeout_s:.0f} s) ran out; minHospitals is {needed}"
            )
        else:
            still = f", {len(starting)} of them still starting" if starting else ""
            parts.append(
                f"the other {others} cannot reach minHospitals {needed}{still}"
                if failed
                else f"{others} hospitals cannot reach minHospitals {needed}"
            )
        return "; ".join(parts)

    def _failures(self) -> str:
        failed = [
            f"{h.name}: {h.message}"
            for h in self.state.hospitals.values()
            if h.state == HospitalState.FAILED
        ]
        return ("Failed hospitals: " + "; ".join(failed)) if failed else ""
