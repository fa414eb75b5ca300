"""A server killed mid-run comes back from its checkpoint: real Flower processes, TLS, DP.

The local runner restarts a server process that died, as a Deployment would, on the same
state directory. The new server finds the checkpoint of the last completed round, the
hospitals rejoin on their registered keys, and training goes on at the next round: the run
ends Succeeded with every round trained once and each hospital's ε within its target.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from fedrun_cli.demo_data import write_demo_hospitals
from fedrun_trainer.common.privacy import load_ledger
from fedrun_trainer.server import checkpoint

from .conftest import example_run

TARGET = 1.0


def _cluster(tmp_path: Path, cluster_factory: Any, rounds: int) -> Any:
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(600, 600, 600), seed=8)
    hospitals = [{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())]
    doc = example_run(rounds=rounds, minHospitals=3, roundTimeoutSeconds=120, hospitals=hospitals)
    return cluster_factory(doc)


def _state_dir(cluster: Any) -> Path:
    return cluster.out / "pods" / f"{cluster.run.metadata.name}-server" / "state"


def _privacy(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in (status.get("privacy") or {}).get("hospitals", [])}


@pytest.mark.parametrize(
    ("rounds", "kill_when", "with_hospital"),
    [
        (5, "round 4/5: training", None),  # round 4 in flight: "killed at round 3 of 5"
        (3, "round 2/3 done", None),  # between rounds
        (3, "round 2/3: training", "hospital-b"),  # the server and a hospital together
    ],
    ids=["mid-round", "between-rounds", "with-a-hospital"],
)
def test_a_killed_server_resumes_from_its_checkpoint_and_the_run_succeeds(
    tmp_path: Path, cluster_factory: Any, rounds: int, kill_when: str, with_hospital: str | None
) -> None:
    cluster = _cluster(tmp_path, cluster_factory, rounds)
    cluster.start()
    seen: list[dict[str, Any]] = []
    killed: list[int] = []

    def on_status(status: dict[str, Any]) -> None:
        seen.append(status)
        if not killed and kill_when in status.get("message", ""):
            killed.append(status["round"]["current"])
            cluster.server.kill(signal.SIGKILL)  # the whole process group, like a lost pod
            if with_hospital is not None:
                cluster.kill_hospital(with_hospital)
                cluster.restart_hospital(with_hospital)  # as its Job would, same state dir

    status = cluster.wait(timeout_s=600, on_status=on_status, poll_s=0.3)

    assert killed, f"never saw {kill_when!r}"
    done_before_kill = killed[0]
    assert cluster.server.starts == 2
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["round"] == {"current": rounds, "total": rounds}
    assert status["checkpoint"]["resumedAfterRound"] == done_before_kill
    if with_hospital is not None:
        row = next(h for h in status["hospitals"] if h["name"] == with_hospital)
        assert row["restarts"] >= 1 and row["state"] == "Done"
    history = cluster.history()
    assert history is not None
    assert [r["round"] for r in history["rounds"]] == list(range(1, rounds + 1))
    # Nothing went backwards while the server was down and came back.
    rounds_seen = [s["round"]["current"] for s in seen]
    assert rounds_seen == sorted(rounds_seen), rounds_seen
    uid = str(cluster.run.metadata.uid)
    for name, row in _privacy(status).items():
        series = [_privacy(s).get(name, {}).get("epsilon") or 0.0 for s in seen]
        assert series == sorted(series), (name, series)
        assert 0 < row["epsilon"] <= TARGET
        # Every round charged once: the server's record is the hospital's ledger.
        assert row["steps"] == rounds * row["stepsPerRound"], row
        ledger_file = (
            cluster.out / "pods" / f"stroke-demo-{name}" / "state" / "ledger" / uid / f"{name}.json"
        )
        ledger = load_ledger(str(ledger_file))
        assert ledger is not None
        assert ledger.rounds_trained == list(range(1, rounds + 1))
        assert ledger.steps == row["steps"]
        assert ledger.epsilon == pytest.approx(row["epsilon"], abs=1e-3)
    server_log = cluster.server.log_path.read_text(encoding="utf-8", errors="replace")
    assert f"checkpoint of round {done_before_kill} found" in server_log


def test_a_damaged_checkpoint_fails_the_run_with_the_reason(
    tmp_path: Path, cluster_factory: Any
) -> None:
    cluster = _cluster(tmp_path, cluster_factory, rounds=3)
    cluster.start()
    path = _state_dir(cluster) / "checkpoint" / checkpoint.FILE

    def on_status(status: dict[str, Any]) -> None:
        if cluster.server.starts == 1 and status["round"]["current"] >= 1:
            cluster.server.kill(signal.SIGKILL)
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF  # one bit of the payload
            path.write_bytes(bytes(data))

    status = cluster.wait(timeout_s=400, on_status=on_status, poll_s=0.3)

    assert cluster.server.starts == 2
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CheckpointInvalid"
    assert "checksum mismatch" in status["message"]
    assert str(path) in status["message"]
