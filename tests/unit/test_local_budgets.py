"""`fedrun local --budget`: PrivacyBudget files reserved, charged round by round, released.

The run's status is given as the server writes it (privacy.hospitals[].history); the files
are real files read back after every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core.accounting import epsilon
from fedrun_core.api import FederatedRun, load_run
from fedrun_core.budgets import BudgetFileError
from fedrun_local.budgets import BudgetBook
from fedrun_local.runner import with_uid

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "federatedrun-local.yaml"


def _run(tmp_path: Path, refs: dict[int, str]) -> FederatedRun:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for index, ref in refs.items():
        doc["spec"]["hospitals"][index]["budgetRef"] = ref
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return with_uid(load_run(path))


def _budget(tmp_path: Path, name: str, hospital: str, limit: float) -> Path:
    path = tmp_path / f"{name}.yaml"
    doc = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": name},
        "spec": {"hospital": hospital, "dataset": {"label": "demo"}, "epsilon": limit},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _status(path: Path) -> dict[str, Any]:
    status: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")).get("status", {})
    return status


def _server_status(phase: str = "Running", **histories: list[list[float]]) -> dict[str, Any]:
    rows = [{"name": h, "history": v} for h, v in histories.items()]
    return {"phase": phase, "privacy": {"hospitals": rows}}


def test_a_run_is_reserved_charged_as_it_goes_and_released_at_the_end(tmp_path: Path) -> None:
    run = _run(tmp_path, {0: "a-budget"})
    path = _budget(tmp_path, "a-budget", "hospital-a", 3.0)
    book = BudgetBook.open(run, [path])
    assert book.reserve() == []
    held = _status(path)
    assert held["reserved"] == 1.0 and held["remaining"] == 2.0
    assert held["charges"][0]["uid"] == run.metadata.uid

    book.charge(_server_status(**{"hospital-a": [[2.3, 0.05, 20]]}))
    book.charge(_server_status(**{"hospital-a": [[2.3, 0.05, 40]]}))
    mid = _status(path)
    assert mid["charges"][0]["history"] == [[2.3, 0.05, 40.0]]
    assert mid["spent"] == pytest.approx(epsilon([(2.3, 0.05, 40)], 1e-5))
    assert mid["reserved"] == 1.0  # still held in full while the run goes

    book.charge(_server_status("Succeeded", **{"hospital-a": [[2.3, 0.05, 60]]}), final=True)
    done = _status(path)
    assert done["charges"][0]["state"] == "Released"
    assert done["reserved"] == 0.0
    assert done["remaining"] == pytest.approx(3.0 - epsilon([(2.3, 0.05, 60)], 1e-5))


def test_a_refusal_reserves_nothing_anywhere(tmp_path: Path) -> None:
    """hospital-a's budget admits the run first, hospital-b's refuses: a's reservation is
    withdrawn, so the run that never started holds nothing."""
    run = _run(tmp_path, {0: "a-budget", 1: "b-budget"})
    a = _budget(tmp_path, "a-budget", "hospital-a", 3.0)
    b = _budget(tmp_path, "b-budget", "hospital-b", 0.5)
    refusals = BudgetBook.open(run, [a, b]).reserve()
    assert len(refusals) == 1
    assert refusals[0].startswith(f"hospital-b: PrivacyBudget b-budget ({b}): the run needs ε=1")
    assert _status(a)["charges"] == [] and _status(a)["reserved"] == 0.0
    assert "status" not in yaml.safe_load(b.read_text(encoding="utf-8"))


def test_a_history_that_does_not_read_keeps_the_reservation(tmp_path: Path) -> None:
    run = _run(tmp_path, {0: "a-budget"})
    path = _budget(tmp_path, "a-budget", "hospital-a", 3.0)
    book = BudgetBook.open(run, [path])
    assert book.reserve() == []
    book.charge(_server_status(**{"hospital-a": [[-1.0, 0.05, 20]]}), final=True)
    after = _status(path)
    assert after["charges"][0]["state"] == "Reserved" and after["reserved"] == 1.0


def test_two_runs_on_one_budget_are_decided_in_turn(tmp_path: Path) -> None:
    path = _budget(tmp_path, "a-budget", "hospital-a", 1.5)
    first = BudgetBook.open(_run(tmp_path, {0: "a-budget"}), [path])
    second = BudgetBook.open(_run(tmp_path, {0: "a-budget"}), [path])
    assert first.reserve() == []
    assert "has 0.5 of 1.5 left" in second.reserve()[0]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "hospital hospital-a names the PrivacyBudget a-budget: pass its file with --budget"),
        (["missing.yaml"], "cannot read"),
    ],
)
def test_budget_files_that_do_not_match_the_run_are_refused(
    tmp_path: Path, files: list[str], message: str
) -> None:
    run = _run(tmp_path, {0: "a-budget"})
    with pytest.raises(BudgetFileError, match=message):
        BudgetBook.open(run, [tmp_path / f for f in files])


def test_a_budget_file_with_a_wrong_field_is_named(tmp_path: Path) -> None:
    path = _budget(tmp_path, "a-budget", "hospital-a", 3.0)
    path.write_text(path.read_text(encoding="utf-8").replace("epsilon: 3.0", "epsilon: -1"))
    with pytest.raises(BudgetFileError, match=rf"invalid PrivacyBudget in {path}:\n  spec.epsilon"):
        BudgetBook.open(_run(tmp_path, {0: "a-budget"}), [path])


def test_a_run_that_fails_keeps_its_whole_reservation_spent(tmp_path: Path) -> None:
    """A failed (or interrupted) run may have stopped mid-round, after its hospitals trained
    a round its server never recorded: its charge is Unsettled, the reservation kept."""
    run = _run(tmp_path, {0: "a-budget"})
    path = _budget(tmp_path, "a-budget", "hospital-a", 3.0)
    book = BudgetBook.open(run, [path])
    assert book.reserve() == []
    book.charge(_server_status("Failed", **{"hospital-a": [[2.3, 0.05, 20]]}), final=True)
    done = _status(path)
    assert done["charges"][0]["state"] == "Unsettled"
    assert done["committed"] == 1.0 and done["remaining"] == 2.0
