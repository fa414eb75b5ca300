"""The operator's side of PrivacyBudgets: reserve before a run's children exist, charge as
the run spends, release when it ends.

The rules are :mod:`fedrun_core.budgets` (pure); this module reads a budget, applies one
rule and writes the budget's status back with a PUT that carries the ``resourceVersion``
it read. When another writer (another run's reconcile, another operator replica, a human)
changed the budget meanwhile, the API server answers 409 and the decision is made again on
a fresh read. So concurrent runs racing for one budget are decided one after the other by
the API server, never by a lock in this process, and the sum of reservations and spend
never passes the limit whatever runs at once.

A run names its budgets per hospital (``spec.hospitals[].budgetRef``, a PrivacyBudget in the
run's namespace). The run's own status records where it stands with each
(``status.budgets``: Waiting, Reserved, Released), so a restarted operator knows whether a
run was admitted; the budget's charges are keyed by the run's uid, so repeating a step
after a restart changes nothing (idempotent per uid).

What is charged: per hospital, the accountant history behind the ε the operator enforces
(``fedrun_operator.status.Decision.histories``): the server's reported history, carried
across suspends, or the spec's plan over the same steps when that costs more. A run that
ends with a final history read from its server is released; one that ends *unseen*
(deleted, or final while its server could not be read) is Unsettled: its whole
reservation stays committed (:func:`fedrun_core.budgets.release_unseen`).

A run's budget terms (which budgets, its targetEpsilon and δ) are fixed at admission and
recorded in ``status.budgets``; a run whose spec names other terms afterwards (edited
while Pending or Suspended) is failed, not run on terms nobody reserved
(:func:`terms_changed`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from fedrun_core import names as c
from fedrun_core.api import FederatedRun, History
from fedrun_core.budgets import (
    Admitted,
    Charge,
    PrivacyBudget,
    Refused,
    admit_run,
    charge,
    release,
    release_unseen,
    summarize,
    withdraw,
)
from fedrun_operator import metrics
from fedrun_operator.kube import ConflictError, Kube

log = logging.getLogger("fedrun.operator")

Obj = dict[str, Any]

#: Read-decide-write attempts of one budget before the reconcile gives up (kopf retries it).
MAX_ATTEMPTS = 60

#: How a run ended, for :meth:`BudgetKeeper.settle`: None while it runs; "seen" when its
#: final history was read from its server; "unseen" otherwise (deleted, or ended while its
#: server could not be read); "withdrawn" when nothing of it was ever created.
End = Literal["seen", "unseen", "withdrawn"] | None

Change = Callable[[PrivacyBudget, list[Charge]], "list[Charge] | Refused"]


@dataclass(frozen=True)
class Refusal:
    """One budget that did not admit the run."""

    hospital: str
    budget: str
    refused: Refused

    @property
    def text(self) -> str:
        return f"{self.hospital}: PrivacyBudget {self.budget}: {self.refused.message}"


# --------------------------------------------------------------------------- pure


def refs(run: FederatedRun) -> dict[str, str]:
    """Hospital → the PrivacyBudget it names, for the hospitals that name one."""
    return {h.name: h.budget_ref for h in run.spec.hospitals if h.budget_ref is not None}


def budget_rows(run: FederatedRun, state: str) -> list[Obj]:
    """``status.budgets`` with every budget in ``state``."""
    return [
        {
            "hospital": hospital,
            "name": name,
            "state": state,
            "reserved": run.spec.privacy.target_epsilon,
            "delta": run.spec.privacy.delta,
        }
        for hospital, name in refs(run).items()
    ]


def recorded(status: Mapping[str, Any]) -> dict[str, str]:
    """Hospital → budget, as the run's status recorded them at admission."""
    return {str(r.get("hospital")): str(r.get("name")) for r in status.get("budgets") or []}


def terms_changed(run: FederatedRun, status: Mapping[str, Any]) -> str:
    """Why the run's spec no longer matches the budget terms it was admitted on (its
    budgets, targetEpsilon and δ, as ``status.budgets`` recorded them); empty when it does."""
    rows = status.get("budgets") or []
    if not rows or not admitted(status):
        return ""
    now = {(r["hospital"], r["name"], r["reserved"], r["delta"]) for r in budget_rows(run, "")}
    then = {
        (
            r.get("hospital"),
            r.get("name"),
            r.get("reserved"),
            r.get("delta", run.spec.privacy.delta),
        )
        for r in rows
    }
    if now == then:
        return ""
    return (
        "spec.privacy or spec.hospitals[].budgetRef changed after the run was admitted at its "
        "PrivacyBudgets (admitted: "
        + ", ".join(f"{h} at {n} with ε={e:g}" for h, n, e, _ in sorted(then, key=str))
        + "); a run keeps the terms it reserved: create a new FederatedRun instead"
    )


def admitted(status: Mapping[str, Any]) -> bool:
    """Whether the run's status says its budgets admitted it (Reserved, or settled since)."""
    rows = status.get("budgets") or []
    return bool(rows) and all(r.get("state") in ("Reserved", "Released", "Unsettled") for r in rows)


def released(status: Mapping[str, Any]) -> bool:
    """Whether the run's status says its budgets were settled (it ended): Released, or
    Unsettled when it ended unseen."""
    rows = status.get("budgets") or []
    return bool(rows) and all(r.get("state") in ("Released", "Unsettled") for r in rows)


def _budget(obj: Mapping[str, Any]) -> PrivacyBudget:
    meta = obj.get("metadata", {})
    return PrivacyBudget.model_validate(
        {
            "apiVersion": obj.get("apiVersion", c.API_VERSION),
            "kind": obj.get("kind", c.BUDGET_KIND),
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid") if meta.get(k)},
            "spec": obj.get("spec", {}),
            "status": obj.get("status") or None,
        }
    )


def _trial(run: FederatedRun, hospital: str, now: datetime) -> Change:
    """A change that decides the run's admission at a budget and writes nothing."""

    def decide(budget: PrivacyBudget, charges: list[Charge]) -> list[Charge] | Refused:
        got = admit_run(budget.spec, charges, run, hospital, now)
        return got if isinstance(got, Refused) else charges

    return decide


# --------------------------------------------------------------------------- I/O


class BudgetKeeper:
    """Reads and writes PrivacyBudgets for the reconciles (one per operator)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def update(self, namespace: str, name: str, change: Change) -> Refused | None:
        """Apply ``change`` to the budget ``namespace/name``'s charges: read, decide, write
        with the read's resourceVersion, and on 409 read and decide again.

        Returns the refusal ``change`` made, or one for a budget that does not exist or
        cannot be read. Raises ConflictError after :data:`MAX_ATTEMPTS` lost races.
        """
        for attempt in range(MAX_ATTEMPTS):
            obj = await self.kube.get(c.API_VERSION, c.BUDGET_KIND, namespace, name)
            if obj is None:
                return Refused(
                    "BudgetUnavailable",
                    f"no PrivacyBudget {name} in namespace {namespace}",
                    0.0,
                    0.0,
                )
            try:
                budget = _budget(obj)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                return Refused("BudgetMismatch", f"cannot be read: {where}: {first['msg']}", 0, 0)
            charges = list(budget.status.charges) if budget.status else []
            got = change(budget, charges)
            if isinstance(got, Refused):
                self._observe(namespace, budget)
                return got
            if got == charges:
                self._observe(namespace, budget)
                return None
            status = summarize(budget.spec, got)
            if budget.status is not None:
                status.conditions = list(budget.status.conditions)
            written = {
                **obj,
                "status": status.model_dump(mode="json", by_alias=True, exclude_none=True),
            }
            try:
                await self.kube.replace_status(written)
            except ConflictError:
                # Someone wrote the budget since it was read: decide again on a fresh read,
                # after a short random pause so racing writers spread out.
                await asyncio.sleep(random.uniform(0, 0.02 * min(attempt + 1, 10)))  # noqa: S311 (jitter)
                continue
            self._observe(namespace, budget.model_copy(update={"status": status}))
            return None
        raise ConflictError(
            409, "Conflict", f"PrivacyBudget {namespace}/{name}: {MAX_ATTEMPTS} writes lost races"
        )

    def _observe(self, namespace: str, budget: PrivacyBudget) -> None:
        st = budget.status
        metrics.observe_budget(
            namespace,
            budget.metadata.name,
            budget.spec.hospital,
            budget.spec.epsilon,
            st.spent if st else 0.0,
            st.committed if st else 0.0,
        )

    async def sweep(self, obj: Mapping[str, Any]) -> None:
        """One look at a budget: export its gauges, and release each reservation whose run
        no longer exists (by name and uid: deleted while no operator watched) as a run that
        ended unseen (Unsettled)."""
        try:
            budget = _budget(obj)
        except ValidationError:
            return
        ns, now = budget.metadata.namespace, datetime.now(UTC)
        self._observe(ns, budget)
        for held in budget.status.charges if budget.status else []:
            if held.state != "Reserved":
                continue
            run = await self.kube.get(c.API_VERSION, c.KIND, held.namespace, held.run)
            if run is not None and run.get("metadata", {}).get("uid") == held.uid:
                continue
            log.info(
                "run %s/%s is gone: releasing its reservation at PrivacyBudget %s",
                held.namespace,
                held.run,
                budget.metadata.name,
            )

            def gone(b: PrivacyBudget, charges: list[Charge], uid: str = held.uid) -> list[Charge]:
                return release_unseen(charges, uid, now)

            await self.update(ns, budget.metadata.name, gone)

    async def reserve(self, run: FederatedRun, now: datetime) -> list[Refusal]:
        """Admit ``run`` at every budget it names (in the budgets' name order, so two runs
        never hold one each of two budgets they both need); on the first refusal, withdraw
        what was reserved here. Returns the refusal, or nothing when every budget admitted
        the run. Idempotent per run uid."""
        ns, uid = run.metadata.namespace, run.metadata.uid or run.name
        ordered = sorted(refs(run).items(), key=lambda item: (item[1], item[0]))
        # First only read: a run that some budget refuses writes nothing anywhere (a run
        # waiting for budget asks every poll; a race lost after this is handled below).
        for hospital, name in ordered:
            seen = await self.update(ns, name, _trial(run, hospital, now))
            if seen is not None:
                # An earlier pass may have reserved at another budget and stopped before
                # it could withdraw: take that back (no write where nothing is held).
                for other in {n for _, n in ordered} - {name}:
                    await self.update(ns, other, lambda _b, ch: withdraw(ch, uid))
                return [Refusal(hospital, name, seen)]
        done: list[str] = []
        for hospital, name in ordered:

            def admit(
                budget: PrivacyBudget, charges: list[Charge], hospital: str = hospital
            ) -> list[Charge] | Refused:
                got = admit_run(budget.spec, charges, run, hospital, now)
                return got.charges if isinstance(got, Admitted) else got

            refused = await self.update(ns, name, admit)
            if refused is not None:
                for earlier in done:
                    await self.update(ns, earlier, lambda _b, ch: withdraw(ch, uid))
                return [Refusal(hospital, name, refused)]
            done.append(name)
        return []

    async def settle(
        self,
        run: FederatedRun,
        spent: Mapping[str, Sequence[Sequence[float]]],
        now: datetime,
        end: End = None,
        names: Mapping[str, str] | None = None,
    ) -> bool:
        """Charge each budget the hospital's history in ``spent``; when the run has ended
        (``end``), release its reservations too (Unsettled when unseen, withdrawn when it
        never started). ``names``: hospital → budget (default: the run's ``budgetRef``s).

        Returns whether every budget took the change (False: one was missing, unreadable or
        held no charge for the run; it is logged, and the caller tries again later).
        """
        ns, uid = run.metadata.namespace, run.metadata.uid or run.name
        ok = True
        for hospital, name in (refs(run) if names is None else names).items():
            history: History = [[float(x) for x in e] for e in spent.get(hospital, [])]
            missing: list[str] = []

            def change(
                budget: PrivacyBudget,
                charges: list[Charge],
                history: History = history,
                missing: list[str] = missing,
            ) -> list[Charge] | Refused:
                if not any(ch.uid == uid for ch in charges):
                    missing.append("no charge")
                    return charges
                if history:
                    charges = charge(budget.spec, charges, uid, history, now)
                if end == "seen":
                    return release(charges, uid, now)
                if end == "unseen":
                    return release_unseen(charges, uid, now)
                if end == "withdrawn":
                    return withdraw(charges, uid)
                return charges

            refused = await self.update(ns, name, change)
            if refused is not None or missing:
                ok = False
                log.warning(
                    "cannot charge PrivacyBudget %s for run %s: %s",
                    name,
                    run.name,
                    refused.message if refused is not None else "it lists no charge for the run",
                    extra={"run": run.name},
                )
        return ok
