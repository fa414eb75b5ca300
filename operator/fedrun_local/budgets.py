"""PrivacyBudget files for ``fedrun local --budget B.yaml``: the same lifetime accounting as
on a cluster (fedrun_core.budgets), kept in YAML files on this machine.

Before anything starts, every hospital that names a budget (``budgetRef``) must be admitted
by it; if one refuses, nothing is reserved and the run does not start. While the run goes,
each hospital's accountant history from the server's status is charged to its budget as it
grows, so a run stopped half-way has still charged what it spent; when the run ends, its
reservations are released. Every change is a read-modify-write of the file under an
exclusive lock on a sidecar ``.<file>.lock``, written atomically (a temporary file, then a
rename), so two local runs sharing a budget are decided one after the other and a reader
never sees half a file.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrun_core.api import FederatedRun
from fedrun_core.budgets import (
    BudgetFileError,
    Charge,
    PrivacyBudget,
    Refused,
    admit_run,
    budget_yaml,
    charge,
    final_history_is_whole,
    parse_budget,
    release,
    release_unseen,
    summarize,
    withdraw,
)

__all__ = ["BudgetBook"]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> PrivacyBudget:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BudgetFileError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_budget(text, str(path))


def _write(path: Path, budget: PrivacyBudget) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(budget_yaml(budget))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _charges(budget: PrivacyBudget) -> list[Charge]:
    return list(budget.status.charges) if budget.status else []


def _with_charges(budget: PrivacyBudget, charges: list[Charge]) -> PrivacyBudget:
    status = summarize(budget.spec, charges)
    return budget.model_copy(update={"status": status})


@dataclass
class BudgetBook:
    """The budget files of one local run, by the hospital that charges each."""

    run: FederatedRun
    files: dict[str, Path]  # hospital name -> its budget's file

    @classmethod
    def open(cls, run: FederatedRun, paths: Sequence[Path]) -> BudgetBook:
        """Match the files to the run's ``budgetRef``s by ``metadata.name``.

        Raises BudgetFileError for a file that cannot be read or parsed, or for a hospital
        whose budget was not given.
        """
        by_name: dict[str, Path] = {}
        for path in paths:
            by_name.setdefault(_read(path).metadata.name, path)
        files: dict[str, Path] = {}
        for h in run.spec.hospitals:
            if h.budget_ref is None:
                continue
            if h.budget_ref not in by_name:
                raise BudgetFileError(
                    f"hospital {h.name} names the PrivacyBudget {h.budget_ref}: pass its file "
                    "with --budget"
                )
            files[h.name] = by_name[h.budget_ref]
        return cls(run, files)

    def _update(self, hospital: str, change: Callable[[PrivacyBudget], list[Charge]]) -> None:
        path = self.files[hospital]
        with _locked(path):
            budget = _read(path)
            charges = change(budget)
            if charges != _charges(budget):
                _write(path, _with_charges(budget, charges))

    def reserve(self) -> list[str]:
        """Admit the run at every budget it names, one file after the other; on the first
        refusal the reservations already made are withdrawn. Returns the refusal (empty
        when every budget admitted the run)."""
        now = datetime.now(UTC)
        uid = self.run.metadata.uid or ""
        done: list[str] = []
        for hospital, path in self.files.items():
            refused: list[Refused] = []

            def admitted(
                budget: PrivacyBudget, hospital: str = hospital, refused: list[Refused] = refused
            ) -> list[Charge]:
                charges = budget.status.charges if budget.status else []
                got = admit_run(budget.spec, charges, self.run, hospital, now)
                if isinstance(got, Refused):
                    refused.append(got)
                    return list(charges)
                return got.charges

            self._update(hospital, admitted)
            if refused:
                for earlier in done:
                    self._update(earlier, lambda b: withdraw(_charges(b), uid))
                name = _read(path).metadata.name
                return [f"{hospital}: PrivacyBudget {name} ({path}): {refused[0].message}"]
            done.append(hospital)
        return []

    def charge(self, status: Mapping[str, Any], *, final: bool = False) -> None:
        """Charge each hospital's history in the run's ``status`` (the server's, as the
        operator reads it); with ``final``, also release the reservations, or, when the run
        did not end between rounds (it failed, or was interrupted), leave them Unsettled:
        its whole reservation stays spent (fedrun_core.budgets.final_history_is_whole)."""
        now = datetime.now(UTC)
        uid = self.run.metadata.uid or ""
        histories = {
            str(h.get("name")): h.get("history") or []
            for h in (status.get("privacy") or {}).get("hospitals") or []
            if isinstance(h, Mapping)
        }
        for hospital in self.files:
            history = histories.get(hospital, [])

            def change(budget: PrivacyBudget, history: Any = history) -> list[Charge]:
                charges = _charges(budget)
                try:
                    if history:
                        charges = charge(budget.spec, charges, uid, history, now)
                except (ValueError, TypeError, KeyError):
                    # A history that does not read as one: keep the whole reservation held
                    # (never release on a figure that cannot be checked).
                    return charges
                if not final:
                    return charges
                if final_history_is_whole(status):
                    return release(charges, uid, now)
                return release_unseen(charges, uid, now)

            self._update(hospital, change)
