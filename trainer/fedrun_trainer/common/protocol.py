"""The messages fedrun's ServerApp and hospital ClientApp exchange, and their encoding.

Every reply carries a ``ConfigRecord`` under ``INFO`` with the hospital's name and an
outcome (``ok``, ``failed`` or ``budget``), so the server can attribute replies to
hospitals even after a hospital restarts with a new Flower node id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

# Message types: Flower routes "<category>.<action>" to the handler registered for it.
HELLO = "query.hello"
SHUTDOWN = "query.shutdown"
TRAIN = "train.round"
EVALUATE = "evaluate.final"

# Record keys
INFO = "info"
WEIGHTS = "weights"
METRICS = "metrics"
EVAL = "eval"
PRIVACY = "privacy"
CONFIG = "config"
SCORES = "scores"  # per-bin counts of test scores per class (common.scores)


class Outcome(StrEnum):
    """What a hospital says about a request."""

    OK = "ok"
    FAILED = "failed"  # the hospital cannot take part any more (bad data, crash)
    BUDGET = "budget"  # the hospital refused: the round would exceed its target ε


@dataclass(frozen=True)
class HospitalReply:
    """A hospital's reply, decoded: who, what happened, and the numbers it sent."""

    hospital: str
    outcome: Outcome
    message: str = ""
    incarnation: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    weights: list[np.ndarray] | None = None
    #: "negatives" and "positives": per-bin counts, as sent (checked by the server).
    scores: dict[str, list[float]] = field(default_factory=dict)
