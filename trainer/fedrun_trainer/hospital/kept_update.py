"""The hospital's last model update, kept so that a retried round is answered, not retrained.

When the server loses a round (it restarted mid-round, or the reply was lost on the way),
it asks again for the same round from the same global model. The hospital's ledger
already holds that round's DP steps: training again would spend ε a second time, and
replying with nothing would drop the hospital's contribution. Sending the same update
again costs no privacy (it is the same output of the same DP mechanism), so the hospital
keeps its last update in its state directory and answers a retried round with it when the
global model it is asked to start from is the one it trained from (same SHA-256).

Written before the ledger records the round: a hospital stopped in between trains the
round again (the ledger never charged it) and overwrites this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FILE = "last-update.npz"

Weights = list[npt.NDArray[Any]]


@dataclass(frozen=True)
class KeptUpdate:
    """One round's reply as the hospital sent it, and what it started from."""

    run_uid: str
    server_round: int
    start_digest: str
    weights: Weights
    num_examples: int
    loss: float


def digest(weights: Sequence[npt.NDArray[Any]]) -> str:
    """SHA-256 over the arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(directory: Path, kept: KeptUpdate) -> None:
    """Replace the kept update atomically (one file per hospital state directory)."""
    meta = {
        "runUid": kept.run_uid,
        "round": kept.server_round,
        "start": kept.start_digest,
        "examples": kept.num_examples,
        "loss": kept.loss,
        "arrays": len(kept.weights),
    }
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            arrays = {f"u{i}": np.asarray(w) for i, w in enumerate(kept.weights)}
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, directory / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(
    directory: Path, run_uid: str, server_round: int, start: Sequence[npt.NDArray[Any]]
) -> KeptUpdate | None:
    """The kept update for ``server_round`` of run ``run_uid`` trained from ``start``, or
    None (none kept, another round or run, another starting model, or unreadable)."""
    try:
        with np.load(directory / FILE, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes())
            weights = [npz[f"u{i}"] for i in range(int(meta["arrays"]))]
        kept = KeptUpdate(
            run_uid=str(meta["runUid"]),
            server_round=int(meta["round"]),
            start_digest=str(meta["start"]),
            weights=weights,
            num_examples=int(meta["examples"]),
            loss=float(meta["loss"]),
        )
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if (kept.run_uid, kept.server_round, kept.start_digest) != (
        run_uid,
        server_round,
        digest(start),
    ):
        return None
    return kept
