"""The hospital's ClientApp handlers: hello, train a round, final evaluation, shutdown.

Each handler reads the run's configuration and the hospital's own data locally (nothing
but model weights and aggregate figures ever leaves the hospital), and always answers
with an explicit outcome instead of raising, so the server can name the hospital and the
reason in the run's status. A failure is also written to the hospital's state directory,
where ``fedrun client`` picks it up and exits non-zero with the same message.

A failure's message leaves the hospital (server, run status, Kubernetes Events), so it
names file, line, column and the kind of problem but never a value from the data: for bad
data it is :class:`~fedrun_trainer.common.data.DataError`'s public text, for an unexpected
exception only the exception's type. What was found (the value, the exception's text and
traceback) is logged once at ERROR here, in the hospital's own pod log.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrun_trainer.common import protocol
from fedrun_trainer.common.protocol import Outcome

log = logging.getLogger("fedrun.hospital")

FAILED_MARKER = "failed.json"
DONE_MARKER = "done.json"


@dataclass(frozen=True)
class NodeSettings:
    """What the wrapper tells its SuperNode (``--node-config``) about this hospital."""

    hospital: str
    config_path: str
    state_dir: Path
    incarnation: str

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        """Read the node config that ``fedrun client`` passed to ``flower-supernode``."""
        cfg = context.node_config
        return cls(
            hospital=str(cfg["hospital"]),
            config_path=str(cfg["fedrun-config"]),
            state_dir=Path(str(cfg["state-dir"])),
            incarnation=str(cfg.get("incarnation", "")),
        )


def write_marker(state_dir: Path, name: str, payload: dict[str, Any]) -> None:
    """Atomically write a JSON marker the wrapper watches for."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, state_dir / name)


def _reply(
    msg: Message,
    node: NodeSettings,
    outcome: Outcome,
    message: str = "",
    *,
    weights: list[Any] | None = None,
    metrics: dict[str, float] | None = None,
    evaluation: dict[str, float] | None = None,
    privacy: dict[str, float] | None = None,
    scores: dict[str, list[int]] | None = None,
) -> Message:
    content = RecordDict(
        {
            protocol.INFO: ConfigRecord(
                {
                    "hospital": node.hospital,
                    "outcome": outcome.value,
                    "message": message,
                    "incarnation": node.incarnation,
                }
            )
        }
    )
    if weights is not None:
        content[protocol.WEIGHTS] = ArrayRecord(weights)
    for key, values in (
        (protocol.METRICS, metrics),
        (protocol.EVAL, evaluation),
        (protocol.PRIVACY, privacy),
    ):
        if values:
            content[key] = MetricRecord({k: float(v) for k, v in values.items()})
    if scores:
        content[protocol.SCORES] = MetricRecord(dict(scores))  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


def _fail(
    msg: Message,
    node: NodeSettings,
    message: str,
    *,
    detail: str | None = None,
    exc_info: bool = False,
) -> Message:
    """Report a failure: ``message`` to the server and ``failed.json``, ``detail`` to the log.

    ``message`` leaves the hospital and must hold no value from the data; ``detail`` (by
    default ``message``) may, as it is only logged here, once, at ERROR, with the
    traceback of the exception being handled when ``exc_info`` is set.
    """
    log.error("hospital %s failed: %s", node.hospital, detail or message, exc_info=exc_info)
    write_marker(node.state_dir, FAILED_MARKER, {"hospital": node.hospital, "message": message})
    return _reply(msg, node, Outcome.FAILED, message)


def server_history(cfg: ConfigRecord) -> list[tuple[float, float, int]]:
    """The server's record of this hospital's DP steps, ``[(σ, q, steps), ...]``."""
    if "spent_steps" not in cfg:
        return []
    sigmas: Any = cfg["spent_sigma"]
    rates: Any = cfg["spent_q"]
    steps: Any = cfg["spent_steps"]
    return [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)]


def _guarded(kind: str, msg: Message, context: Context) -> Message:
    node = NodeSettings.from_context(context)
    from fedrun_trainer.common.data import DataError
    from fedrun_trainer.hospital import session  # heavy imports (torch, Opacus) only when needed

    try:
        site = session.HospitalSession.open(node.config_path, node.hospital, node.state_dir)
        if kind == "hello":
            site.open_ledger()  # a refused ledger fails the hospital before any round
            return _reply(msg, node, Outcome.OK, metrics=site.summary())
        if kind == "evaluate":
            weights = msg.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays()
            evaluation, scores = site.evaluate(weights)
            return _reply(msg, node, Outcome.OK, evaluation=evaluation, scores=scores)
        cfg = msg.content.config_records[protocol.CONFIG]
        weights = msg.content.array_records[protocol.WEIGHTS].to_numpy_ndarrays()
        outcome = site.train(
            weights,
            server_round=int(cfg["server_round"]),  # type: ignore[arg-type]
            evaluate_first=bool(cfg["evaluate_first"]),
            server_history=server_history(cfg),
            lineage=str(cfg.get("lineage", "")),
        )
        return _reply(
            msg,
            node,
            outcome.outcome,
            outcome.message,
            weights=outcome.weights,
            metrics=outcome.metrics,
            evaluation=outcome.evaluation,
            privacy=outcome.privacy,
            scores=outcome.scores,
        )
    except DataError as err:  # file, line, column and kind leave; the value is logged
        return _fail(msg, node, err.public, detail=err.detail)
    except session.HospitalConfigError as err:  # names only hospitals of the spec
        return _fail(msg, node, str(err))
    except session.LedgerRefused as err:  # names the ledger, the runs and the terms
        return _fail(msg, node, str(err))
    except Exception as err:  # a crash must reach the status, not vanish in a log...
        # ...but its text can quote the data (a pandas or torch error), so only its type
        # leaves; the text and the traceback stay in this hospital's log.
        return _fail(
            msg,
            node,
            f"{kind} failed: {type(err).__name__}; see the hospital's log",
            detail=f"{kind} failed: {type(err).__name__}: {err}",
            exc_info=True,
        )


def hello(msg: Message, context: Context) -> Message:
    """Say which hospital this node is and check its data (fails early on bad data)."""
    return _guarded("hello", msg, context)


def train(msg: Message, context: Context) -> Message:
    """Evaluate the incoming global model (after round 1), then train one DP round."""
    return _guarded("train", msg, context)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the final global model on this hospital's held-out split."""
    return _guarded("evaluate", msg, context)


def shutdown(msg: Message, context: Context) -> Message:
    """The run is over for this hospital: leave the marker that lets ``fedrun client`` exit.

    It exits 0, or 1 when this hospital had failed (the server has its reason by now).
    """
    node = NodeSettings.from_context(context)
    write_marker(node.state_dir, DONE_MARKER, {"hospital": node.hospital})
    return _reply(msg, node, Outcome.OK)
