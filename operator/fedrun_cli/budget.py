"""``fedrun budget``: what DP-SGD will cost each hospital before anything runs.

For each hospital: training rows, Opacus sample rate, steps per round, the noise
multiplier σ calibrated for the whole run, and ε after each round. The same functions
the hospitals use compute it, so the plan and the run agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedrun_core.api import load_run


def print_budget(file: Path, rows: int | None = None) -> int:
    """Print the per-hospital privacy plan of the run in ``file``; 1 if a hospital's data fails."""
    from fedrun_trainer.common.data import DataError, load_hospital_data
    from fedrun_trainer.common.privacy import epsilon_of, new_ledger, plan_terms

    run = load_run(file)
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
        n = rows
        if n is None:
            try:
                train = load_hospital_data(h.data_uri, spec.data, t.test_fraction, t.seed).train
            except DataError as err:  # a local command: the value found may be shown
                sys.stdout.write(f"  {h.name}: cannot read data: {err.detail}\n")
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
        if p.delta * n >= 1:
            sys.stdout.write(
                f"    warning: δ={p.delta} is not below 1/{n} (one over the training "
                "rows): the guarantee would allow one patient's record to leak outright\n"
            )
    return code
