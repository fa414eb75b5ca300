"""Privacy maths against Opacus, and the ledger that carries it across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrun_trainer.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    epsilon_of,
    load_ledger,
    new_ledger,
    noise_multiplier_for_run,
    open_ledger,
    save_ledger,
    steps_per_epoch,
)

DELTA = 1e-5


def test_epsilon_matches_opacus_reference_figures() -> None:
    # FACTS.md: σ=1, q=1/13 gives ε=3.05 after 13 steps and 4.24 after 39, not 3 x 3.05.
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
    assert loaded == ledger
    assert loaded.rounds_done == 2 and loaded.steps == 38 and loaded.epsilon > 0
    # A restart with other data (other q) and a fresh σ keeps the ledger's history and σ.
    resumed = open_ledger(
        uri,
        hospital="hospital-a",
        n_train=600,
        batch_size=64,
        local_epochs=1,
        rounds=5,
        target_epsilon=1.0,
        delta=DELTA,
    )
    assert resumed == ledger
    assert resumed.epsilon_after(19) > resumed.epsilon
    with pytest.raises(ValueError, match="belongs to 'hospital-a'"):
        open_ledger(
            uri,
            hospital="hospital-b",
            n_train=600,
            batch_size=64,
            local_epochs=1,
            rounds=5,
            target_epsilon=1.0,
            delta=DELTA,
        )


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
