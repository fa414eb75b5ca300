"""The Argo CD health check for PrivacyBudgets (examples/argocd/health-privacybudget.lua).

Run as test_argocd_health.py runs the FederatedRun check: Lua 5.1 with only what Argo CD's
sandbox opens, the object in the global `obj`. Statuses are built with the budget's own
models (BudgetStatus, and `summarize` over real charges), so they have the shape the
operator writes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fedrun_core.budgets import BudgetSpec, BudgetStatus, Charge, summarize

from .test_argocd_health import GITOPS_DOC, SANDBOX, lupa51, to_lua, yaml_blocks

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "argocd" / "health-privacybudget.lua"
RUN_SCRIPT = ROOT / "examples" / "argocd" / "health.lua"
CM_KEY = "resource.customizations.health.fedrun.io_PrivacyBudget"
RUN_CM_KEY = "resource.customizations.health.fedrun.io_FederatedRun"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the PrivacyBudget check on `obj`; the table it returns as a dict."""
    lua = lupa51.LuaRuntime(unpack_returned_tuples=True)
    result = lua.execute(SANDBOX, SCRIPT.read_text(encoding="utf-8"), to_lua(lua, obj))
    return dict(result.items())


SPEC: dict[str, Any] = {
    "hospital": "hospital-a",
    "dataset": {"uri": "s3://hospital-a-data/stroke.csv", "label": "stroke-2026"},
    "epsilon": 5.0,
    "delta": 1e-5,
    "accountant": "rdp",
}


def budget_obj(status: BudgetStatus | dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A PrivacyBudget as the API server returns it, with `status` (through the model)."""
    obj: dict[str, Any] = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "hospital-a-stroke", "namespace": "fedrun", "generation": 1},
        "spec": {**SPEC, **spec},
    }
    if status is not None:
        model = status if isinstance(status, BudgetStatus) else BudgetStatus.model_validate(status)
        obj["status"] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def figures(spent: float, committed: float, limit: float = 5.0, **extra: Any) -> dict[str, Any]:
    return {
        "spent": spent,
        "summed": spent,
        "reserved": 0.0,
        "committed": committed,
        "remaining": limit - committed,
        **extra,
    }


def ready(status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-12-07T12:00:00Z",
    }


def charge(uid: str, state: str, reserved: float, history: list[list[float]]) -> Charge:
    return Charge(
        run=f"run-{uid}",
        namespace="fedrun",
        uid=uid,
        state=state,  # type: ignore[arg-type]
        reserved=reserved,
        delta=1e-5,
        history=history,
        updated=NOW,
    )


# --------------------------------------------------------------------------- not accounted


def test_no_status_yet_is_progressing() -> None:
    assert health(budget_obj()) == {"status": "Progressing", "message": "not accounted yet"}


def test_empty_status_is_progressing() -> None:
    obj = budget_obj()
    obj["status"] = {}
    assert health(obj) == {"status": "Progressing", "message": "not accounted yet"}


def test_status_with_only_a_ready_condition_is_progressing() -> None:
    obj = budget_obj()
    obj["status"] = {"conditions": [ready("True", "Accounted")]}
    assert health(obj) == {"status": "Progressing", "message": "not accounted yet"}


def test_bare_object_is_progressing() -> None:
    obj = {"apiVersion": "fedrun.io/v1alpha1", "kind": "PrivacyBudget", "metadata": {"name": "x"}}
    assert health(obj) == {"status": "Progressing", "message": "not accounted yet"}


# --------------------------------------------------------------------------- healthy


def test_budget_with_room_is_healthy() -> None:
    assert health(budget_obj(figures(1.23, 2.23))) == {
        "status": "Healthy",
        "message": "ε spent 1.23 of 5 (committed 2.23)",
    }


def test_fresh_budget_is_healthy_with_nothing_spent() -> None:
    status = summarize(BudgetSpec.model_validate(SPEC), [])
    assert health(budget_obj(status)) == {
        "status": "Healthy",
        "message": "ε spent 0 of 5 (committed 0)",
    }


def test_status_from_real_charges_is_healthy_while_room_is_left() -> None:
    spec = BudgetSpec.model_validate(SPEC)
    charges = [
        charge("a", "Released", 1.0, [[1.1, 0.02, 500.0]]),
        charge("b", "Reserved", 1.5, [[1.1, 0.02, 200.0]]),
    ]
    status = summarize(spec, charges)
    assert 0 < status.spent < status.committed < spec.epsilon
    result = health(budget_obj(status))
    assert result["status"] == "Healthy"
    shown = re.fullmatch(
        r"ε spent (\d+(?:\.\d+)?) of 5 \(committed (\d+(?:\.\d+)?)\)", result["message"]
    )
    assert shown is not None, result
    assert abs(float(shown.group(1)) - status.spent) <= 0.0005 + 1e-9
    assert abs(float(shown.group(2)) - status.committed) <= 0.0005 + 1e-9


def test_ready_true_does_not_change_a_healthy_budget() -> None:
    sample = figures(1.0, 2.0, conditions=[ready("True", "Accounted", "all charges summed")])
    assert health(budget_obj(sample))["status"] == "Healthy"


def test_remaining_missing_is_worked_out_from_the_limit() -> None:
    obj = budget_obj(figures(1.0, 2.0))
    del obj["status"]["remaining"]
    assert health(obj) == {"status": "Healthy", "message": "ε spent 1 of 5 (committed 2)"}
    obj["status"]["committed"] = 5.0
    assert health(obj)["status"] == "Degraded"


# --------------------------------------------------------------------------- degraded


def test_nothing_remaining_is_degraded() -> None:
    assert health(budget_obj(figures(4.2, 5.0))) == {
        "status": "Degraded",
        "message": "ε spent 4.2 of 5 (committed 5): nothing left for a new run",
    }


def test_overcommitted_budget_is_degraded() -> None:
    # Unsettled charges (runs that ended unseen) keep their whole reservation committed.
    assert health(budget_obj(figures(5.0, 5.5))) == {
        "status": "Degraded",
        "message": "ε spent 5 of 5 (committed 5.5): nothing left for a new run",
    }


def test_status_from_real_charges_is_degraded_when_reservations_fill_it() -> None:
    spec = BudgetSpec.model_validate(SPEC)
    # An ended run's spending, and a running run holding the rest of the limit.
    released = [charge("a", "Released", 1.0, [[1.1, 0.02, 500.0]])]
    rest = spec.epsilon - summarize(spec, released).committed
    status = summarize(spec, [*released, charge("b", "Reserved", rest, [[1.1, 0.02, 100.0]])])
    assert status.remaining <= 0
    assert health(budget_obj(status))["status"] == "Degraded"


def test_a_little_left_is_still_healthy() -> None:
    assert health(budget_obj(figures(4.0, 4.999)))["status"] == "Healthy"


def test_ready_false_is_degraded_with_its_reason_and_message() -> None:
    sample = figures(
        1.0,
        2.0,
        conditions=[ready("False", "DatasetConflict", "budget b2 covers the same dataset")],
    )
    assert health(budget_obj(sample)) == {
        "status": "Degraded",
        "message": (
            "ε spent 1 of 5 (committed 2): not ready (DatasetConflict): "
            "budget b2 covers the same dataset"
        ),
    }


def test_ready_false_before_accounting_is_degraded() -> None:
    obj = budget_obj()
    obj["status"] = {"conditions": [ready("False", "InvalidSpec")]}
    assert health(obj) == {
        "status": "Degraded",
        "message": "not accounted yet: not ready (InvalidSpec)",
    }


def test_other_conditions_false_do_not_degrade() -> None:
    sample = figures(
        1.0, 2.0, conditions=[{**ready("False", "NoRuns"), "type": "Charging"}, ready("True", "Ok")]
    )
    assert health(budget_obj(sample))["status"] == "Healthy"


# --------------------------------------------------------------------------- robustness


def test_wrongly_typed_fields_do_not_break_the_check() -> None:
    obj = budget_obj()
    obj["status"] = {"spent": "a lot", "committed": None, "conditions": "Ready"}
    assert health(obj) == {"status": "Progressing", "message": "not accounted yet"}
    obj["status"] = {"spent": 1.0, "remaining": 3.0, "conditions": ["Ready", {"type": 7}]}
    obj["spec"]["epsilon"] = "five"
    assert health(obj) == {"status": "Healthy", "message": "ε spent 1 of ? (committed ?)"}


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.1 + 0.2, "0.3"), (0.9996, "1"), (0.996, "0.996"), (12.0, "12"), (3.0004, "3")],
)
def test_figures_are_shown_with_at_most_three_decimals(value: float, text: str) -> None:
    assert health(budget_obj(figures(value, 4.0)))["message"] == (
        f"ε spent {text} of 5 (committed 4)"
    )


def test_the_status_fields_read_are_the_models() -> None:
    """A rename in BudgetStatus or BudgetSpec must not leave the script reading nothing."""
    status_fields = {f.alias or name for name, f in BudgetStatus.model_fields.items()}
    assert {"spent", "committed", "remaining", "conditions"} <= status_fields
    assert "epsilon" in BudgetSpec.model_fields


# --------------------------------------------------------------------------- the sandbox


def test_script_uses_no_library_argo_cd_lacks() -> None:
    code = "\n".join(
        line.split("--", 1)[0] for line in SCRIPT.read_text(encoding="utf-8").splitlines()
    )
    assert not re.search(r"\b(string|math|io|debug|coroutine)\s*[.\[]", code)
    assert not re.search(r"\b(require|load|loadstring|dofile)\s*\(", code)
    # Method calls on strings need the string library's metatable.
    assert not re.search(r"[\w)\]]:\w+\s*\(", code)


def test_decimal_is_the_run_checks() -> None:
    """Both scripts format numbers the same way (one function, copied)."""

    def body(path: Path, name: str) -> list[str]:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = lines.index("local function decimal(value)")
        end = lines.index("end", start)
        return [line.replace(name, "out") for line in lines[start : end + 1]]

    assert body(SCRIPT, "out") == body(RUN_SCRIPT, "text")


# --------------------------------------------------------------------------- the docs


def test_gitops_doc_snippet_holds_both_scripts() -> None:
    blocks = yaml_blocks(GITOPS_DOC.read_text(encoding="utf-8"))
    [cm] = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "ConfigMap"]
    assert set(cm["data"]) == {RUN_CM_KEY, CM_KEY}
    assert cm["data"][CM_KEY] == SCRIPT.read_text(encoding="utf-8")
    assert cm["data"][RUN_CM_KEY] == RUN_SCRIPT.read_text(encoding="utf-8")
