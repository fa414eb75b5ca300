"""A hospital killed mid-run rejoins, and its ε keeps rising from where it was."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fedrun_cli.demo_data import write_demo_hospitals
from fedrun_trainer.common.privacy import load_ledger

from .conftest import example_run


def _epsilon(status: dict[str, Any], name: str) -> float:
    for h in (status.get("privacy") or {}).get("hospitals", []):
        if h["name"] == name:
            return float(h["epsilon"])
    return 0.0


def _wait_for(cluster, predicate, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.status()
        if status is not None and predicate(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"condition not reached within {timeout_s}s: {cluster.status()}")


@pytest.mark.parametrize("ledger_survives", [True, False], ids=["ledger-kept", "ledger-lost"])
def test_killed_hospital_rejoins_and_its_epsilon_never_goes_down(
    tmp_path, cluster_factory, ledger_survives
):
    """With its ledger, or without (a new pod on an emptyDir): ε resumes, never from zero."""
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(700, 700, 700), seed=8)
    hospitals = [{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())]
    doc = example_run(rounds=4, minHospitals=3, roundTimeoutSeconds=120, hospitals=hospitals)
    cluster = cluster_factory(doc)
    victim = "hospital-b"
    ledger_file = (
        cluster.out
        / "pods"
        / f"stroke-demo-{victim}"
        / "state"
        / "ledger"
        / str(cluster.run.metadata.uid)
    )
    ledger_uri = str(ledger_file / f"{victim}.json")
    cluster.start()

    before = _wait_for(cluster, lambda s: s["round"]["current"] >= 2, timeout_s=300)
    eps_before = _epsilon(before, victim)
    ledger_before = load_ledger(ledger_uri)
    assert ledger_before is not None and ledger_before.epsilon > 0

    cluster.kill_hospital(victim)  # SIGKILL to the whole process group, like a lost pod
    assert cluster.hospitals[victim].exit_code == -9
    if not ledger_survives:
        (ledger_file / f"{victim}.json").unlink()  # the server's record must take over
    cluster.restart_hospital(victim)

    seen: list[dict[str, Any]] = []
    status = cluster.wait(timeout_s=400, on_status=seen.append)

    assert status["phase"] == "Succeeded", status.get("message")
    entry = next(h for h in status["hospitals"] if h["name"] == victim)
    assert entry["restarts"] >= 1
    assert entry["state"] == "Done"
    # ε never went down: not in the status over time, not in the hospital's own ledger.
    series = [_epsilon(s, victim) for s in seen]
    assert all(e >= eps_before - 1e-9 for e in series), series
    assert series == sorted(series), series
    ledger_after = load_ledger(ledger_uri)
    assert ledger_after is not None
    assert ledger_after.epsilon > ledger_before.epsilon
    assert ledger_after.steps > ledger_before.steps
    assert ledger_after.epsilon <= 1.0 + 1e-9
    assert _epsilon(status, victim) >= ledger_after.epsilon - 1e-3
    log_text = cluster.hospitals[victim].log_path.read_text(encoding="utf-8", errors="replace")
    assert ("resuming from the server's record" in log_text) is (not ledger_survives)
