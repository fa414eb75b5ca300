"""The server's checkpoint: what a restarted server needs to go on where its run stopped.

After every aggregated round, and once more when the run ends, the ServerApp writes one
file, :data:`FILE`, in the run's checkpoint directory: a header line (JSON: format, payload
length, the payload's SHA-256) and the payload, an ``.npz`` archive holding the global
weights, the strategy's state (FedAdam's moments) and a JSON document of the run's state
(:func:`fedrun_trainer.server.run_state.state_to_json`: round, history, every hospital's
accountant history, the MLflow run id, the start time). The file is written beside its
final name, flushed to disk and renamed over the previous one: a reader finds the whole
new checkpoint or the whole previous one, never a mix.

A checkpoint is only taken back by the run that wrote it: its run name, uid and the
fingerprint of the spec it trained under (:func:`spec_fingerprint`) must match, its size
must be within :data:`MAX_BYTES` and its checksum must hold. Anything else raises
:class:`CheckpointInvalid`, and the run fails with reason ``CheckpointInvalid``: a
checkpoint silently ignored would train again rounds whose ε was already spent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedrun_core.api import FederatedRun

FORMAT = "fedrun-checkpoint/1"
FILE = "checkpoint.bin"
#: The largest checkpoint read back: far above any tabular model fedrun trains.
MAX_BYTES = 1 << 30
#: The longest header line read before the payload.
MAX_HEADER_BYTES = 4096

Arrays = list[npt.NDArray[Any]]


class CheckpointInvalid(ValueError):  # noqa: N818 - the domain's name (the status reason)
    """A checkpoint that cannot be taken back; the message says which and why."""


@dataclass(frozen=True)
class Checkpoint:
    """One run's state after ``round`` completed rounds.

    ``lineage`` names the chain of server incarnations that share this training: minted when
    a server starts without a checkpoint, carried by every checkpoint after it, so whoever
    reads the status can tell a resumed server (same lineage, history continued) from one
    that started over (new lineage). ``strategy`` holds named lists of arrays (FedAdam's
    ``m`` and ``v``); ``state`` the run's state as :func:`state_to_json` wrote it.
    """

    run_name: str
    run_uid: str
    spec_fingerprint: str
    lineage: str
    round: int
    weights: Arrays
    state: dict[str, Any]
    strategy: dict[str, Arrays] = field(default_factory=dict)


def new_lineage() -> str:
    """A fresh lineage id, for a server that starts without a checkpoint."""
    return uuid.uuid4().hex


#: The parts of a spec that decide what the rounds train: a checkpoint written under other
#: values of any of them is foreign. The rest (pod settings, image, deadlines, MLflow,
#: suspend) may change while a run is suspended without making its checkpoint so.
TRAINING_TERMS = ("rounds", "strategy", "training", "data", "privacy")


def spec_fingerprint(run: FederatedRun) -> str:
    """SHA-256 of the spec's terms of training (:data:`TRAINING_TERMS`, and each hospital's
    name and data): what a checkpoint's rounds were trained under."""
    spec = run.spec.model_dump(mode="json", by_alias=True)
    terms = {key: spec.get(key) for key in TRAINING_TERMS}
    terms["hospitals"] = [[h["name"], h["dataUri"]] for h in spec["hospitals"]]
    text = json.dumps(terms, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def encode(cp: Checkpoint) -> bytes:
    """The checkpoint as bytes: header line, then the ``.npz`` payload."""
    meta = {
        "format": FORMAT,
        "run": cp.run_name,
        "uid": cp.run_uid,
        "spec": cp.spec_fingerprint,
        "lineage": cp.lineage,
        "round": cp.round,
        "weights": len(cp.weights),
        "strategy": {name: len(arrays) for name, arrays in sorted(cp.strategy.items())},
        "state": cp.state,
    }
    arrays: dict[str, npt.NDArray[Any]] = {f"w{i}": np.asarray(a) for i, a in enumerate(cp.weights)}
    for name, values in cp.strategy.items():
        arrays.update({f"s_{name}_{i}": np.asarray(a) for i, a in enumerate(values)})
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    payload = buffer.getvalue()
    header = {"format": FORMAT, "length": len(payload), "sha256": _sha256(payload)}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(data: bytes, source: str = FILE) -> Checkpoint:
    """The checkpoint in ``data``; :class:`CheckpointInvalid` says what is wrong with it."""
    end = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if end < 0:
        raise CheckpointInvalid(f"{source}: not a fedrun checkpoint (no header)")
    try:
        header = json.loads(data[:end])
    except ValueError:
        raise CheckpointInvalid(f"{source}: not a fedrun checkpoint (bad header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointInvalid(f"{source}: not a {FORMAT} checkpoint")
    payload = data[end + 1 :]
    if header.get("length") != len(payload) or header.get("sha256") != _sha256(payload):
        raise CheckpointInvalid(f"{source}: checksum mismatch (the file is damaged or cut)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays["meta"].tobytes())
        weights = [arrays[f"w{i}"] for i in range(int(meta["weights"]))]
        strategy = {
            str(name): [arrays[f"s_{name}_{i}"] for i in range(int(count))]
            for name, count in dict(meta["strategy"]).items()
        }
        cp = Checkpoint(
            run_name=str(meta["run"]),
            run_uid=str(meta["uid"]),
            spec_fingerprint=str(meta["spec"]),
            lineage=str(meta["lineage"]),
            round=int(meta["round"]),
            weights=weights,
            state=dict(meta["state"]),
            strategy=strategy,
        )
        arrays_ok = all(
            np.issubdtype(a.dtype, np.floating) and bool(np.all(np.isfinite(a)))
            for a in [*weights, *(a for values in strategy.values() for a in values)]
        )
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise CheckpointInvalid(f"{source}: unreadable payload ({type(err).__name__})") from None
    if cp.round < 0 or not arrays_ok:
        raise CheckpointInvalid(f"{source}: a negative round, or arrays that are not finite floats")
    if not re.fullmatch(r"[0-9a-f]{1,64}", cp.lineage):
        raise CheckpointInvalid(f"{source}: its lineage is not an id")
    return cp


def check_owner(cp: Checkpoint, run: FederatedRun, source: str = FILE) -> None:
    """Refuse a checkpoint another run, or this run under other terms, wrote."""
    uid = run.metadata.uid or ""
    if cp.run_name != run.metadata.name or cp.run_uid != uid:
        raise CheckpointInvalid(
            f"{source} belongs to run {cp.run_name!r} (uid {cp.run_uid or 'none'}), not to "
            f"{run.metadata.name!r} (uid {uid or 'none'})"
        )
    if cp.spec_fingerprint != spec_fingerprint(run):
        raise CheckpointInvalid(
            f"{source} was written under another spec (fingerprint {cp.spec_fingerprint[:12]}, "
            f"this spec's is {spec_fingerprint(run)[:12]})"
        )


def write(directory: Path, cp: Checkpoint) -> int:
    """Write ``cp`` atomically as ``directory/FILE``; returns its size in bytes."""
    data = encode(cp)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash of the node
        finally:
            os.close(dir_fd)
    return len(data)


def read(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none.

    Raises :class:`CheckpointInvalid` for a file that is there but cannot be taken back
    (too large, damaged, not a checkpoint); :func:`check_owner` checks whose it is.
    """
    path = directory / FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_BYTES:
        raise CheckpointInvalid(f"{path}: {size} bytes, over the {MAX_BYTES}-byte limit")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointInvalid(f"{path}: cannot be read ({err.strerror or err})") from None
    return decode(data, str(path))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
