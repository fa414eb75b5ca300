"""The operator's torch-free accountant against Opacus' own ``RDPAccountant``."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Sequence

import pytest
from opacus.accountants import RDPAccountant

from fedrun_core.accounting import (
    DEFAULT_ALPHAS,
    EPSILON_SLACK,
    collapse,
    epsilon,
    epsilon_after,
    fits_budget,
    over_target,
)
from fedrun_trainer.common.privacy import epsilon_of

REL = 1e-9
DELTAS = (1e-5, 1e-7)
SIGMAS = (0.3, 0.7, 1.0, 2.5, 10.0)
SAMPLE_RATES = (1e-4, 1e-2, 1 / 13, 0.5, 1.0)
STEPS = (1, 100, 10_000)


def opacus_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        # Opacus warns when the best order is the first or last one; the figure stands.
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def test_default_orders_are_opacus_orders() -> None:
    assert list(DEFAULT_ALPHAS) == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("q", SAMPLE_RATES)
def test_single_entry_matches_opacus(sigma: float, q: float) -> None:
    for steps in STEPS:
        for delta in DELTAS:
            history = [(sigma, q, steps)]
            expected = opacus_epsilon(history, delta)
            assert epsilon(history, delta) == pytest.approx(expected, rel=REL), (steps, delta)


@pytest.mark.parametrize(
    "history",
    [
        # A server's per-round record: one entry per round, same (σ, q).
        [(1.1, 1 / 13, 13)] * 5,
        # A hospital restarted with a new σ, then its data grew (new q).
        [(1.0, 0.01, 100), (1.5, 0.02, 50), (1.5, 0.01, 7)],
        # Interleaved entries, q = 1 and a tiny q in one history.
        [(0.8, 1.0, 3), (4.0, 1e-4, 10_000), (0.8, 1.0, 2), (0.35, 0.3, 40)],
    ],
)
@pytest.mark.parametrize("delta", DELTAS)
def test_multi_entry_history_matches_opacus(
    history: list[tuple[float, float, int]], delta: float
) -> None:
    expected = opacus_epsilon(history, delta)
    assert epsilon(history, delta) == pytest.approx(expected, rel=REL)
    assert epsilon(collapse(history), delta) == pytest.approx(expected, rel=REL)


def test_collapse_merges_equal_sigma_and_q_in_first_seen_order() -> None:
    history = [(1.0, 0.1, 5), (2.0, 0.1, 3), (1.0, 0.1, 7), (1.0, 0.2, 0), (2.0, 0.1, 1)]
    assert collapse(history) == [(1.0, 0.1, 12), (2.0, 0.1, 4)]
    assert collapse([]) == []


def test_facts_figures_hold_at_delta_1e_5_only() -> None:
    # docs/facts.md: σ=1, q=1/13 gives ε=3.05 after 13 steps and 4.24 after 39 (one vs three
    # rounds). Find the δ among the usual powers of ten that gives both figures.
    matching = [
        delta
        for delta in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
        if round(epsilon([(1.0, 1 / 13, 13)], delta), 2) == 3.05
        and round(epsilon([(1.0, 1 / 13, 39)], delta), 2) == 4.24
    ]
    assert matching == [1e-5]
    three_rounds = [(1.0, 1 / 13, 13)] * 3
    assert epsilon(three_rounds, 1e-5) == pytest.approx(epsilon([(1.0, 1 / 13, 39)], 1e-5))
    assert epsilon(three_rounds, 1e-5) < 3 * epsilon([(1.0, 1 / 13, 13)], 1e-5)


def test_no_noise_spends_infinite_epsilon() -> None:
    assert epsilon([(0.0, 0.1, 10)], 1e-5) == math.inf
    assert epsilon([(1.0, 0.1, 10), (0.0, 1.0, 1)], 1e-5) == math.inf
    assert opacus_epsilon([(0.0, 0.1, 10)], 1e-5) == math.inf


def test_nothing_released_spends_nothing() -> None:
    assert epsilon([], 1e-5) == 0.0 == opacus_epsilon([], 1e-5)
    assert epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0
    assert epsilon([(0.0, 0.1, 0)], 1e-5) == 0.0  # no noise, but no step either
    # Opacus answers a positive ε for a zero-step entry (the RDP-to-DP conversion term
    # alone); the trainer drops such entries, and so does the operator.
    assert opacus_epsilon([(1.0, 0.1, 0)], 1e-5) > 0
    assert epsilon_of([(1.0, 0.1, 0)], 1e-5) == 0.0
    mixed = [(1.0, 0.1, 0), (1.2, 0.05, 40)]
    assert epsilon(mixed, 1e-5) == pytest.approx(opacus_epsilon(mixed[1:], 1e-5), rel=REL)


def test_zero_sample_rate_matches_opacus() -> None:
    assert epsilon([(1.0, 0.0, 10)], 1e-5) == pytest.approx(
        opacus_epsilon([(1.0, 0.0, 10)], 1e-5), rel=REL
    )


def test_agrees_with_the_servers_accounting() -> None:
    # The server accounts with Opacus through the trainer's epsilon_of: both must agree,
    # or the operator would stop runs the server considers within budget (or the reverse).
    history = [(1.3, 1 / 20, 20)] * 4 + [(1.3, 1 / 20, 0)]
    assert epsilon(history, 1e-5) == pytest.approx(epsilon_of(history, 1e-5), rel=REL)


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([(-1.0, 0.1, 1)], "noise multiplier"),
        ([(math.nan, 0.1, 1)], "noise multiplier"),
        ([(math.inf, 0.1, 1)], "noise multiplier"),
        ([(1.0, 1.5, 1)], "sample rate"),
        ([(1.0, -0.1, 1)], "sample rate"),
        ([(1.0, math.nan, 1)], "sample rate"),
        ([(1.0, 0.1, -1)], "steps"),
        ([(1.0, 0.1, 2.5)], "steps"),
        ([(1.0, 0.1)], "history entry"),
    ],
)
def test_malformed_history_is_refused(history: list[tuple[float, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        epsilon(history, 1e-5)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_delta_outside_the_open_unit_interval_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon([(1.0, 0.1, 1)], delta)


def test_epsilon_after_matches_opacus_stepping_on() -> None:
    history = [(1.0, 0.01, 100), (1.2, 0.05, 40)]
    acc = RDPAccountant()
    acc.history = list(history)
    for _ in range(20):
        acc.step(noise_multiplier=1.2, sample_rate=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = float(acc.get_epsilon(1e-5))
    assert epsilon_after(history, 20, 1e-5) == pytest.approx(expected, rel=REL)
    assert epsilon_after(history, 20, 1e-5) > epsilon(history, 1e-5)


def test_epsilon_after_nothing_is_epsilon() -> None:
    history = [(1.0, 0.01, 100)]
    assert epsilon_after(history, 0, 1e-5) == epsilon(history, 1e-5)
    assert epsilon_after([], 50, 1e-5) == 0.0  # no (σ, q) known yet
    with pytest.raises(ValueError, match="extra_steps"):
        epsilon_after(history, -1, 1e-5)


def test_fits_budget_is_the_stop_rule() -> None:
    history = [(1.0, 1 / 13, 13)] * 2
    now = epsilon(history, 1e-5)
    after = epsilon_after(history, 13, 1e-5)
    target = (now + after) / 2
    assert fits_budget(history, 1e-5, target)
    assert not fits_budget(history, 1e-5, target, extra_steps=13)
    # Within the hospitals' relative slack the round goes ahead; beyond it, it does not.
    assert fits_budget(history, 1e-5, after * (1 - EPSILON_SLACK / 10), extra_steps=13)
    assert not fits_budget(history, 1e-5, after * (1 - EPSILON_SLACK * 10), extra_steps=13)
    assert not fits_budget([(0.0, 0.1, 1)], 1e-5, 1000.0)


@pytest.mark.parametrize("eps", [math.nan, math.inf, 1.0 + 2e-6])
def test_a_figure_that_cannot_be_compared_is_over_the_target(eps: float) -> None:
    assert over_target(eps, 1.0)
    assert not over_target(1.0 + 1e-7, 1.0)  # within the slack


def test_import_pulls_in_neither_torch_nor_numpy() -> None:
    probe = (
        "import sys, fedrun_core.accounting as a\n"
        "assert a.epsilon([(1.0, 0.1, 10)], 1e-5) > 0\n"
        "heavy = {'torch', 'numpy', 'scipy', 'opacus'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("sigma", [50.0, 1000.0])
def test_epsilon_is_never_negative_where_opacus_dips_below_zero(sigma: float) -> None:
    """A very noisy history at a large δ: the RDP → (ε, δ) conversion goes below 0 (Opacus
    reports it as is); a negative bound implies ε = 0, and a negative ε would read as a refund
    in a budget, so fedrun reports 0.0."""
    history, delta = [(sigma, 0.01, 10)], 0.01  # the largest δ a run may ask for
    assert opacus_epsilon(history, delta) < 0
    assert epsilon(history, delta) == 0.0
    assert epsilon_after(history, 10, delta) == 0.0
