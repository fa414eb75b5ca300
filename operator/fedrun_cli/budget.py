"""``fedrun budget``: what DP-SGD will cost each hospital before anything runs.

For each hospital: training rows, Opacus sample rate, steps per round, the noise
multiplier σ calibrated for the whole run, and ε after each round. The same functions
the hospitals use compute it, so the plan and the run agree. With ``--budget B.yaml``
(PrivacyBudget files), each hospital that names a budget also shows the budget's lifetime
figures and what the run would reserve and leave, or why the budget would refuse it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from fedrun_core.api import FederatedRun, Hospital, load_run
from fedrun_core.budgets import (
    BudgetFileError,
    PrivacyBudget,
    Refused,
    admit_run,
    parse_budget,
    summarize,
)


def load_budgets(files: Sequence[Path]) -> dict[str, PrivacyBudget]:
    """The PrivacyBudget files by ``metadata.name``; BudgetFileError names a bad one."""
    found: dict[str, PrivacyBudget] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise BudgetFileError(f"cannot read {path}: {err.strerror or err}") from None
        budget = parse_budget(text, str(path))
        if budget.metadata.name in found:
            raise BudgetFileError(f"{path}: a second budget named {budget.metadata.name}")
        found[budget.metadata.name] = budget
    return found


def _budget_lines(
    run: FederatedRun, hospital: Hospital, budgets: dict[str, PrivacyBudget]
) -> tuple[str, bool]:
    """What charging ``hospital``'s budget would do (the run is not recorded), and whether
    the budget would admit the run."""
    name = hospital.budget_ref
    budget = budgets.get(name or "")
    if budget is None:
        return f"    budget {name}: not given (pass its file with --budget)\n", False
    charges = budget.status.charges if budget.status else []
    spec, now = budget.spec, datetime.now(UTC)
    before = summarize(spec, charges)
    head = (
        f"    budget {name}: lifetime ε={spec.epsilon:g} (δ={spec.delta:g}); spent "
        f"{before.spent:.3f} composed ({before.summed:.3f} if added) over {before.runs} "
        f"run(s), {before.reserved:.3f} held for running ones"
    )
    decision = admit_run(spec, charges, run, hospital.name, now)
    if isinstance(decision, Refused):
        return f"{head}\n      refused ({decision.reason}): {decision.message}\n", False
    after = summarize(spec, decision.charges)
    text = (
        f"{head}\n      this run reserves ε={run.spec.privacy.target_epsilon:g} and would "
        f"leave {after.remaining:.3f}\n"
    )
    return text, True


def print_budget(file: Path, rows: int | None = None, budget_files: Sequence[Path] = ()) -> int:
    """Print the per-hospital privacy plan of the run in ``file``, and what it would take
    from each hospital's PrivacyBudget given in ``budget_files``; 1 if a hospital's data
    fails or a budget would refuse the run."""
    from fedrun_trainer.common.data import DataError, load_hospital_data
    from fedrun_trainer.common.privacy import epsilon_of, new_ledger, plan_terms

    run = load_run(file)
    budgets = load_budgets(budget_files)
    spec = run.spec
    p, t = spec.privacy, spec.training
    if not p.enabled:
        sys.stdout.write("privacy is disabled for this run: no DP guarantee, ε is not tracked\n")
        return 0
    code = 0
    sys.stdout.write(
        f"run {run.metadata.name}: {spec.rounds} rounds x {t.local_epochs} local epoch(s), "
        f"batch {t.batch_size}, target ε={p.target_epsilon}, δ={p.delta}, {p.accountant}\n"
    )
    for h in spec.hospitals:
        budget_text, admitted = "", True
        if h.budget_ref is not None:
            budget_text, admitted = _budget_lines(run, h, budgets)
            code |= 0 if admitted else 1
        n = rows
        if n is None:
            try:
                train = load_hospital_data(h.data_uri, spec.data, t.test_fraction, t.seed).train
            except DataError as err:  # a local command: the value found may be shown
                sys.stdout.write(f"  {h.name}: cannot read data: {err.detail}\n{budget_text}")
                code = 1
                continue
            n = len(train)
        ledger = new_ledger(
            hospital=h.name,
            n_train=n,
            **plan_terms(spec),
        )
        per_round = [
            epsilon_of(
                [(ledger.noise_multiplier, ledger.sample_rate, ledger.steps_per_round * r)],
                p.delta,
                p.accountant,
            )
            for r in range(1, spec.rounds + 1)
        ]
        sys.stdout.write(
            f"  {h.name}: {n} training rows, q={ledger.sample_rate:.4f}, "
            f"{ledger.steps_per_round} steps/round, σ={ledger.noise_multiplier:.3f}\n"
            f"    ε after each round: " + ", ".join(f"{e:.3f}" for e in per_round) + "\n"
        )
        sys.stdout.write(budget_text)
        if p.delta * n >= 1:
            sys.stdout.write(
                f"    warning: δ={p.delta} is not below 1/{n} (one over the training "
                "rows): the guarantee would allow one patient's record to leak outright\n"
            )
    return code
