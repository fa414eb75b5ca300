"""Privacy maths against Opacus, and the ledger that carries it across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedrun_trainer.common.privacy import (
    MAX_HISTORY,
    MAX_LEDGER_BYTES,
    BudgetExceeded,
    LedgerRefused,
    PrivacyLedger,
    checked_history,
    epsilon_of,
    load_ledger,
    new_ledger,
    noise_multiplier_for_run,
    open_ledger,
    save_ledger,
    steps_per_epoch,
)
from fedrun_trainer.hospital.session import resume_from_server

DELTA = 1e-5


def test_epsilon_matches_opacus_reference_figures() -> None:
    # docs/facts.md: σ=1, q=1/13 gives ε=3.05 after 13 steps and 4.24 after 39, not 3 x 3.05.
    assert epsilon_of([(1.0, 1 / 13, 13)], DELTA) == pytest.approx(3.05, abs=0.01)
    three_rounds = [(1.0, 1 / 13, 13)] * 3
    assert epsilon_of(three_rounds, DELTA) == pytest.approx(4.24, abs=0.01)
    assert epsilon_of(three_rounds, DELTA) == pytest.approx(epsilon_of([(1.0, 1 / 13, 39)], DELTA))
    assert epsilon_of([], DELTA) == 0.0


def test_prv_accountant_is_available() -> None:
    rdp = epsilon_of([(1.0, 1 / 13, 39)], DELTA, "rdp")
    prv = epsilon_of([(1.0, 1 / 13, 39)], DELTA, "prv")
    assert 0 < prv < rdp  # PRV is the tighter bound
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon_of([(1.0, 0.1, 1)], DELTA, "gdp-ish")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_covers_the_whole_run(accountant: str) -> None:
    q, per_round, rounds = 1 / 19, 19, 5
    sigma = noise_multiplier_for_run(1.0, DELTA, q, rounds * per_round, accountant)
    history = [(sigma, q, per_round)] * rounds
    eps = epsilon_of(history, DELTA, accountant)
    assert 0.97 <= eps <= 1.0  # at the target, not far under it
    # One round's worth of σ would overspend massively over the run.
    one_round = noise_multiplier_for_run(1.0, DELTA, q, per_round, accountant)
    assert epsilon_of([(one_round, q, per_round)] * rounds, DELTA, accountant) > 1.5


def test_steps_per_epoch_is_loader_length() -> None:
    assert steps_per_epoch(1190, 64) == 19
    assert steps_per_epoch(64, 64) == 1
    with pytest.raises(ValueError, match="n_train"):
        steps_per_epoch(0, 64)


def fresh(**overrides: object) -> PrivacyLedger:
    args: dict[str, object] = dict(
        hospital="hospital-a",
        n_train=1190,
        batch_size=64,
        local_epochs=1,
        rounds=5,
        target_epsilon=1.0,
        delta=DELTA,
        run_uid="uid-1",
    )
    args.update(overrides)
    return new_ledger(**args)  # type: ignore[arg-type]


def test_new_ledger_plans_the_run() -> None:
    ledger = fresh()
    assert ledger.sample_rate == pytest.approx(1 / 19)
    assert ledger.steps_per_round == 19
    assert ledger.epsilon_after(5 * 19) == pytest.approx(0.995, abs=0.005)
    assert fresh(noise_multiplier=3.0).noise_multiplier == 3.0


def test_ledger_round_trip_and_resume_never_decreases(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/ledger/hospital-a.json"
    assert load_ledger(uri) is None
    ledger = fresh()
    for server_round in (1, 2):
        ledger = ledger.with_round(
            server_round, [(ledger.noise_multiplier, ledger.sample_rate, 19 * server_round)]
        )
    save_ledger(uri, ledger)
    assert not list((tmp_path / "ledger").glob("*.tmp"))  # atomic: no temp file left
    loaded = load_ledger(uri)
    assert loaded == ledger.record()
    resumed = open_ledger(uri, **ARGS)
    assert resumed == ledger
    assert resumed.rounds_done == 2 and resumed.steps == 38 and resumed.epsilon > 0
    assert resumed.epsilon_after(19) > resumed.epsilon
    # A restart with other data (another q) keeps the history; σ and q are the new plan's.
    other_rows = open_ledger(uri, **{**ARGS, "n_train": 600})
    assert other_rows.history == ledger.history
    assert other_rows.sample_rate == pytest.approx(1 / 10)
    with pytest.raises(LedgerRefused, match="belongs to hospital 'hospital-a'"):
        open_ledger(uri, **{**ARGS, "hospital": "hospital-b"})


ARGS: dict[str, Any] = dict(
    hospital="hospital-a",
    n_train=1190,
    batch_size=64,
    local_epochs=1,
    rounds=5,
    target_epsilon=1.0,
    delta=DELTA,
    run_uid="uid-1",
)


def test_leftover_ledger_with_looser_terms_is_refused(tmp_path: Path) -> None:
    """The audit's case: a ledger saved with target 8 and δ 1e-3 must not set σ for a run
    whose spec says target 1.0 and δ 1e-5 (it ran every round at σ 0.66 instead of 2.4)."""
    uri = f"file://{tmp_path}/a.json"
    save_ledger(uri, fresh(target_epsilon=8.0, delta=1e-3, run_uid="uid-1"))
    with pytest.raises(LedgerRefused, match=r"target ε=8\.0, δ=0\.001.*refused"):
        open_ledger(uri, **ARGS)
    # Stricter stored terms are refused as well: the spec of a running run cannot change.
    save_ledger(uri, fresh(target_epsilon=0.5, run_uid="uid-1"))
    with pytest.raises(LedgerRefused, match=r"target ε=0\.5"):
        open_ledger(uri, **ARGS)
    save_ledger(uri, fresh(accountant="prv", run_uid="uid-1"))
    with pytest.raises(LedgerRefused, match="accountant prv"):
        open_ledger(uri, **ARGS)


def test_ledger_of_another_run_is_refused(tmp_path: Path) -> None:
    """A run deleted and created again under the same name has a new uid."""
    uri = f"file://{tmp_path}/a.json"
    old = fresh(run_uid="uid-0").with_round(1, [(2.0, 1 / 19, 19)])
    save_ledger(uri, old)
    with pytest.raises(LedgerRefused, match=r"another run \(uid uid-0\).*not this one"):
        open_ledger(uri, **ARGS)


def test_sigma_is_always_the_spec_calibration(tmp_path: Path) -> None:
    """Whatever a ledger file says, σ and the target come from the spec."""
    uri = f"file://{tmp_path}/a.json"
    planned = open_ledger(uri, **ARGS)
    save_ledger(uri, planned.with_round(1, [(0.3, 0.5, 19)]))  # a history spent at σ 0.3
    text = (tmp_path / "a.json").read_text()
    assert "noise_multiplier" not in text and "noiseMultiplier" not in text  # history only
    resumed = open_ledger(uri, **ARGS)
    assert resumed.noise_multiplier == planned.noise_multiplier
    assert resumed.sample_rate == planned.sample_rate
    assert resumed.history == [(0.3, 0.5, 19)]
    assert resumed.epsilon == pytest.approx(epsilon_of([(0.3, 0.5, 19)], DELTA))


def test_resume_from_server_takes_the_spend_not_the_noise() -> None:
    ledger = fresh(run_uid="uid-1")
    server = [(0.5, 0.9, 19), (0.5, 0.9, 19)]  # a longer record with a low σ
    resumed = resume_from_server(ledger, server)
    assert resumed.history == server
    assert resumed.noise_multiplier == ledger.noise_multiplier
    assert resumed.sample_rate == ledger.sample_rate
    assert resume_from_server(resumed, [(2.0, 0.05, 1)]) is resumed  # shorter: kept


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([(1.0, float("nan"), 19)], "non-finite"),
        ([(float("inf"), 0.1, 19)], "non-finite"),
        ([(0.0, 0.1, 19)], "σ must be > 0"),
        ([(1.0, 1.5, 19)], "q must be in"),
        ([(1.0, 0.1, 1.5)], "whole number"),
        ([(1.0, 0.1, -1)], "whole number"),
        ([(1.0, 0.1)], "not \\[σ, q, steps\\]"),
        ([("1", 0.1, 1)], "not a number"),
        ([(True, 0.1, 1)], "not a number"),
        ("abc", "must be a list"),
        ([(1.0, 0.1, 1)] * (MAX_HISTORY + 1), "at most"),
    ],
)
def test_checked_history_refuses_what_no_accountant_should_see(history: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        checked_history(history, "the server's record")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": 1, "hospital": "hospital-a"}',
        '{"format": 2, "hospital": "hospital-a", "runUid": "uid-1", "accountant": "rdp", '
        '"delta": 1e-5, "targetEpsilon": 1.0, "history": [[1.0, NaN, 3]]}',
        '{"format": 2, "hospital": "hospital-a", "runUid": "uid-1", "accountant": "rdp", '
        '"delta": "1e-5", "targetEpsilon": 1.0}',
    ],
)
def test_unreadable_ledger_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(LedgerRefused):
        open_ledger(path.as_uri(), **ARGS)


def test_oversized_ledger_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b" " * (MAX_LEDGER_BYTES + 10))
    with pytest.raises(LedgerRefused, match="larger than"):
        load_ledger(path.as_uri())


def test_with_round_refuses_a_shorter_history() -> None:
    ledger = fresh().with_round(1, [(2.0, 0.05, 19)])
    with pytest.raises(ValueError, match="shorter"):
        ledger.with_round(2, [(2.0, 0.05, 5)])


def test_budget_exceeded_before_overspending() -> None:
    ledger = fresh()
    for server_round in range(1, 6):
        ledger.check_budget(19)
        ledger = ledger.with_round(
            server_round, [(ledger.noise_multiplier, ledger.sample_rate, 19 * server_round)]
        )
    assert ledger.epsilon <= 1.0
    with pytest.raises(BudgetExceeded, match=r"hospital-a.*target ε=1\.0"):
        ledger.check_budget(19)  # a sixth round would go over
