"""Lifetime privacy budgets (fedrun_core.budgets): composition across runs, admission, charges.

The composed figure is checked against Opacus' RDPAccountant fed every run's history; the
admission rule is checked by simulating runs that spend up to their reservation and showing
the lifetime ε never passes the limit.
"""

from __future__ import annotations

import math
import random
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from pydantic import ValidationError

from fedrun_core.accounting import DEFAULT_ALPHAS, epsilon, noise_multiplier_for_run
from fedrun_core.budgets import (
    MAX_BUDGET_DELTA,
    Admitted,
    BudgetSpec,
    Charge,
    PrivacyBudget,
    Refused,
    admit,
    charge,
    committed_epsilon,
    composed_epsilon,
    final_history_is_whole,
    release,
    release_unseen,
    summarize,
    summed_epsilon,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SPEC = BudgetSpec(hospital="hospital-a", dataset={"uri": "s3://a/stroke.csv"}, epsilon=4.0)

# Several runs on one dataset, each [(σ, q, steps), ...] as its hospital's accountant saw it.
MULTI_RUN = [
    [[[1.1, 0.02, 500]], [[1.1, 0.02, 500]]],
    [[[0.8, 1 / 19, 95]], [[1.3, 1 / 19, 190], [1.3, 1 / 40, 40]], [[2.0, 0.5, 10]]],
    [[[0.7, 0.01, 3000]]] * 5,
    [[[4.9, 1.0, 5]], [[1.206, 0.5, 10]], [[0.9, 0.004, 10_000]], [[5.0, 0.1, 1]]],
]


def opacus(history: list[list[float]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(s, q, int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("runs", MULTI_RUN)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_composed_epsilon_is_one_accountant_over_every_run(
    runs: list[list[list[float]]], delta: float
) -> None:
    joined = [entry for run in runs for entry in run]
    assert composed_epsilon(runs, delta) == pytest.approx(opacus(joined, delta), rel=1e-6)


@pytest.mark.parametrize("runs", MULTI_RUN)
def test_composed_is_never_more_than_summed(runs: list[list[list[float]]]) -> None:
    composed, summed = composed_epsilon(runs, 1e-5), summed_epsilon(runs, 1e-5)
    assert composed <= summed
    if len(runs) > 1:
        assert composed < summed  # the point of composing: strictly tighter for 2+ runs
    assert summed == pytest.approx(sum(opacus(run, 1e-5) for run in runs), rel=1e-6)


def _conversion_term(alpha: float, delta: float) -> float:
    return (math.log(1 / delta) - math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)


def test_the_budget_delta_cap_is_what_subadditivity_needs() -> None:
    """Admission adds reservations to a composed figure; that is a ceiling only while the
    conversion term is non-negative at every order: true at the cap, false at δ = 0.01."""
    assert all(_conversion_term(a, MAX_BUDGET_DELTA) >= 0 for a in DEFAULT_ALPHAS)
    assert any(_conversion_term(a, 0.01) < 0 for a in DEFAULT_ALPHAS)


def test_composed_epsilon_is_subadditive_at_the_cap() -> None:
    rng = random.Random(7)
    sigmas, rates = (0.5, 0.8, 1.2, 2.0, 5.0), (0.001, 0.01, 0.1, 0.5, 1.0)
    for _ in range(300):  # a grid of (σ, q): the per-step RDP is computed once per pair
        a = [[rng.choice(sigmas), rng.choice(rates), rng.randint(1, 5000)]]
        b = [[rng.choice(sigmas), rng.choice(rates), rng.randint(1, 5000)]]
        together = composed_epsilon([a, b], MAX_BUDGET_DELTA)
        assert together <= epsilon(a, MAX_BUDGET_DELTA) + epsilon(b, MAX_BUDGET_DELTA) + 1e-12


def _admit(charges: list[Charge], uid: str, target: float, **kw: object) -> Admitted | Refused:
    args: dict[str, object] = {
        "run": f"run-{uid}",
        "namespace": "ns",
        "uid": uid,
        "hospital": "hospital-a",
        "target_epsilon": target,
        "delta": 1e-5,
        "now": NOW,
    }
    args.update(kw)
    return admit(SPEC, charges, **args)  # type: ignore[arg-type]


def test_a_run_that_fits_is_reserved_once_however_often_it_is_admitted() -> None:
    first = _admit([], "u1", 1.5)
    assert isinstance(first, Admitted) and first.changed
    (held,) = first.charges
    assert (held.state, held.reserved, held.uid) == ("Reserved", 1.5, "u1")
    again = _admit(first.charges, "u1", 1.5)
    assert isinstance(again, Admitted) and not again.changed
    assert again.charges == first.charges


def test_a_run_that_does_not_fit_is_refused_with_needed_and_remaining() -> None:
    one = _admit([], "u1", 3.0)
    assert isinstance(one, Admitted)
    two = _admit(one.charges, "u2", 1.5)
    assert isinstance(two, Refused)
    assert two.reason == "BudgetUnavailable"
    assert (two.needed, two.remaining) == (1.5, pytest.approx(1.0))
    assert "needs ε=1.5 but the budget has 1 of 4 left" in two.message


def test_runs_racing_for_one_budget_are_decided_one_after_the_other() -> None:
    """Each fits alone; decided in turn (as the operator does through resourceVersion),
    the second sees the first's reservation and is refused."""
    a = _admit([], "a", 2.5)
    b_alone = _admit([], "b", 2.5)
    assert isinstance(a, Admitted) and isinstance(b_alone, Admitted)
    assert isinstance(_admit(a.charges, "b", 2.5), Refused)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"hospital": "hospital-b"}, "the budget is for hospital hospital-a, not hospital-b"),
        ({"delta": 1e-4}, "the run's δ=0.0001 exceeds the budget's δ=1e-05"),
    ],
)
def test_a_run_for_other_terms_is_refused(kw: dict[str, object], message: str) -> None:
    refused = _admit([], "u1", 0.5, **kw)
    assert isinstance(refused, Refused)
    assert refused.reason == "BudgetMismatch" and refused.message == message


def test_charges_only_grow_and_release_returns_the_unspent_part() -> None:
    held = _admit([], "u1", 2.0)
    assert isinstance(held, Admitted)
    after_1 = charge(SPEC, held.charges, "u1", [[1.2, 0.05, 40]], NOW)
    after_2 = charge(SPEC, after_1, "u1", [[1.2, 0.05, 80]], NOW)
    stale = charge(SPEC, after_2, "u1", [[1.2, 0.05, 40]], NOW)  # an older reading
    assert stale == after_2
    assert after_2[0].history == [[1.2, 0.05, 80.0]]
    assert after_2[0].spent == pytest.approx(epsilon([(1.2, 0.05, 80)], SPEC.delta))
    assert committed_epsilon(after_2, SPEC.delta) == 2.0  # held in full while running
    done = release(after_2, "u1", NOW)
    assert done[0].state == "Released"
    assert committed_epsilon(done, SPEC.delta) == pytest.approx(after_2[0].spent)
    assert release(done, "u1", NOW) == done
    with pytest.raises(KeyError):
        charge(SPEC, done, "nobody", [[1.0, 0.1, 1]], NOW)


def test_a_reading_in_another_form_is_charged_only_if_it_costs_more() -> None:
    """The operator may charge the server's history or the plan's over the same steps
    (another σ): the dearer reading stands, and the two are never added up."""
    held = _admit([], "u1", 3.0)
    assert isinstance(held, Admitted)
    reported = charge(SPEC, held.charges, "u1", [[1.2, 0.05, 40]], NOW)
    by_plan = charge(SPEC, reported, "u1", [[1.0, 0.05, 40]], NOW)  # less noise: dearer
    assert by_plan[0].history == [[1.0, 0.05, 40.0]]
    assert by_plan[0].spent == pytest.approx(epsilon([(1.0, 0.05, 40)], SPEC.delta))
    back = charge(SPEC, by_plan, "u1", [[1.2, 0.05, 40]], NOW)  # cheaper again: kept
    assert back == by_plan


def test_a_run_that_ends_unseen_keeps_its_whole_reservation() -> None:
    held = _admit([], "u1", 1.5)
    assert isinstance(held, Admitted)
    charged = charge(SPEC, held.charges, "u1", [[1.2, 0.05, 40]], NOW)
    gone = release_unseen(charged, "u1", NOW)
    assert gone[0].state == "Unsettled"
    assert release_unseen(gone, "u1", NOW) == gone  # idempotent
    assert release(gone, "u1", NOW) == gone  # and final
    status = summarize(SPEC, gone)
    assert status.committed == pytest.approx(1.5)
    assert status.spent == pytest.approx(1.5)  # unknown spend counts as all of it
    assert status.reserved == 0.0
    refused = _admit(gone, "u2", 3.0)
    assert isinstance(refused, Refused)  # 1.5 + 3.0 > 4.0


def test_a_budget_for_another_hospital_refuses_even_a_run_it_holds() -> None:
    """Two hospitals of one run naming one budget: the second is refused, not taken for
    the first's charge."""
    held = _admit([], "u1", 1.0)
    assert isinstance(held, Admitted)
    other = _admit(held.charges, "u1", 1.0, hospital="hospital-b")
    assert isinstance(other, Refused) and other.reason == "BudgetMismatch"


def test_summary_shows_composed_beside_summed() -> None:
    charges = []
    for uid, steps in (("a", 300), ("b", 300), ("c", 300)):
        got = _admit(charges, uid, 1.0)
        assert isinstance(got, Admitted)
        charges = release(charge(SPEC, got.charges, uid, [[1.1, 0.02, steps]], NOW), uid, NOW)
    status = summarize(SPEC, charges)
    assert status.runs == 3 and status.reserved == 0.0
    assert status.spent < status.summed
    assert status.remaining == pytest.approx(SPEC.epsilon - status.spent)


def test_admitted_runs_that_spend_up_to_their_reservation_never_pass_the_limit() -> None:
    """The safety property: whatever the runs do within their own targets, the lifetime
    ε composed from what they actually spent stays within the budget."""
    rng = random.Random(11)
    spec = BudgetSpec(
        hospital="hospital-a", dataset={"label": "stroke-v1"}, epsilon=5.0, delta=MAX_BUDGET_DELTA
    )
    for _ in range(20):
        charges: list[Charge] = []
        for i in range(rng.randint(2, 8)):
            target = rng.uniform(0.3, 2.5)
            got = admit(
                spec,
                charges,
                run=f"r{i}",
                namespace="ns",
                uid=str(i),
                hospital="hospital-a",
                target_epsilon=target,
                delta=MAX_BUDGET_DELTA,
                now=NOW,
            )
            if isinstance(got, Refused):
                continue
            q, steps = rng.choice([0.01, 0.05, 0.3]), rng.randint(20, 2000)
            sigma = noise_multiplier_for_run(target, MAX_BUDGET_DELTA, q, steps)
            used = rng.randint(1, steps)  # a run may stop early
            charges = release(
                charge(spec, got.charges, str(i), [[sigma, q, used]], NOW), str(i), NOW
            )
        assert composed_epsilon([c.history for c in charges], spec.delta) <= spec.epsilon


def test_a_budget_reads_as_a_resource() -> None:
    doc = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "hospital-a-stroke", "namespace": "fedrun"},
        "spec": {"hospital": "hospital-a", "dataset": {"uri": "s3://a/s.csv"}, "epsilon": 8},
    }
    budget = PrivacyBudget.model_validate(doc)
    assert budget.spec.delta == 1e-5 and budget.spec.accountant == "rdp"
    assert budget.metadata.name == "hospital-a-stroke"


# --------------------------------------------------------------------------- the CRD

BUDGET_DOC = {
    "apiVersion": "fedrun.io/v1alpha1",
    "kind": "PrivacyBudget",
    "metadata": {"name": "hospital-a-stroke", "namespace": "fedrun"},
    "spec": {"hospital": "hospital-a", "dataset": {"uri": "s3://a/s.csv"}, "epsilon": 8},
}
BAD_SPECS = [
    ({"delta": 0.01}, "spec.delta"),
    ({"dataset": {}}, "spec.dataset"),
    ({"epsilon": 0}, "spec.epsilon"),
    ({"accountant": "prv"}, "spec.accountant"),
    ({"hospital": "Hospital A"}, "spec.hospital"),
    ({"epsilonn": 1}, "spec"),
]


def test_the_committed_crds_are_the_generated_one() -> None:
    from fedrun_render.crd import crd_yaml

    root = Path(__file__).resolve().parents[2]
    for path in (root / "crds", root / "charts" / "fedrun" / "files" / "crds"):
        text = (path / "privacybudget.yaml").read_text(encoding="utf-8")
        assert text == crd_yaml("PrivacyBudget"), f"{path}: run `make crds`"


def test_the_crd_admits_a_budget_and_defaults_it() -> None:
    from fedrun_render.admission import Admission
    from fedrun_render.crd import build_budget_crd

    admission = Admission(build_budget_crd())
    assert admission.admit(BUDGET_DOC) == []
    stored = admission.prepare(BUDGET_DOC)
    assert stored["spec"]["delta"] == 1e-5 and stored["spec"]["accountant"] == "rdp"


@pytest.mark.parametrize(("change", "field"), BAD_SPECS)
def test_the_crd_and_the_models_refuse_the_same_budgets(
    change: dict[str, object], field: str
) -> None:
    from fedrun_render.admission import Admission
    from fedrun_render.crd import build_budget_crd

    doc = {**BUDGET_DOC, "spec": {**BUDGET_DOC["spec"], **change}}  # type: ignore[dict-item]
    problems = Admission(build_budget_crd()).admit(doc)
    assert problems and all(p.startswith(field) for p in problems), problems
    with pytest.raises(ValidationError):
        PrivacyBudget.model_validate(doc)


@pytest.mark.parametrize(
    ("phase", "reason", "whole"),
    [
        ("Succeeded", "RoundsCompleted", True),
        ("BudgetExhausted", "BudgetWouldBeExceeded", True),
        ("BudgetExhausted", "BudgetExhausted", True),
        ("BudgetExhausted", "BudgetExceeded", False),  # someone misreported
        ("Failed", "DeadlineExceeded", False),  # possibly mid-round
        ("Failed", "TooFewHospitals", False),
        ("Running", "Training", False),  # interrupted
    ],
)
def test_only_a_run_that_ended_between_rounds_is_released_on_its_history(
    phase: str, reason: str, whole: bool
) -> None:
    status = {"phase": phase, "conditions": [{"type": phase, "status": "True", "reason": reason}]}
    assert final_history_is_whole(status) is whole
