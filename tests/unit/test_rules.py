"""Every cross-field rule of the API is one `Rule`, and each one proves itself on both sides.

A `Rule` (fedrun_core.api) carries the CEL expression the API server checks and the Python
check the models run, with one object the rule accepts and one it refuses. For every rule:
the CRD side (the rule's CEL, evaluated with cel-python as kube-apiserver would) and the
models side (pydantic validation) accept the first and refuse the second, naming the same
field with the same message. And every CEL rule in the generated CRD comes from a `Rule`,
but the one transition rule (a Running run's spec is immutable), which needs an old object.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from fedrun_core import api
from fedrun_core.api import Rule, RuleError
from fedrun_render.admission import evaluate
from fedrun_render.crd import build_crd

MODELS: list[type[BaseModel]] = [
    obj
    for obj in vars(api).values()
    if isinstance(obj, type) and issubclass(obj, BaseModel) and getattr(obj, "RULES", ())
]
RULES: list[tuple[type[BaseModel], Rule]] = [
    (model, rule)
    for model in MODELS
    for rule in model.RULES  # type: ignore[attr-defined]
]


def _id(case: tuple[type[BaseModel], Rule]) -> str:
    model, rule = case
    return f"{model.__name__}:{rule.message[:40]}"


def _crd_rules(node: Any) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for key, value in node.items():
            if key != "x-kubernetes-validations":
                yield from _crd_rules(value)
    elif isinstance(node, list):
        for value in node:
            yield from _crd_rules(value)


def _at_scope(rule: Rule, obj: dict[str, Any]) -> Any:
    return obj[rule.scope] if rule.scope else obj


def _rule_errors(model: type[BaseModel], obj: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(field, message) of every problem the model finds in `obj`."""
    try:
        model.model_validate(obj)
    except ValidationError as err:
        out = []
        for e in err.errors():
            cause = (e.get("ctx") or {}).get("error")
            if isinstance(cause, RuleError):
                out.append((tuple(e["loc"]) + cause.loc, str(cause)))
            else:
                out.append((tuple(e["loc"]), e["msg"]))
        return out
    return []


def test_there_are_rules_on_every_object_that_had_cel() -> None:
    names = {model.__name__ for model in MODELS}
    assert {"StrategySpec", "TrainingSpec", "Feature", "DataSpec", "PrivacySpec"} <= names
    assert {"FederatedRunSpec", "FederatedRun"} <= names
    assert len(RULES) >= 16


def test_every_cel_rule_in_the_crd_comes_from_a_rule_object() -> None:
    in_crd = [r["rule"] for r in _crd_rules(build_crd())]
    transition = [r for r in in_crd if "oldSelf" in r]
    assert len(transition) == 1
    # As sets: a model used in several places (a Volume in the server's, the hospitals'
    # and the defaults' pod settings) carries its rules at each place.
    assert {r for r in in_crd if "oldSelf" not in r} == {r.cel for _, r in RULES}


@pytest.mark.parametrize("case", RULES, ids=_id)
def test_the_crd_side_accepts_one_and_refuses_the_other(
    case: tuple[type[BaseModel], Rule],
) -> None:
    _, rule = case
    assert evaluate(rule.cel, _at_scope(rule, dict(rule.accepts))) is True
    assert evaluate(rule.cel, _at_scope(rule, dict(rule.refuses))) is False


@pytest.mark.parametrize("case", RULES, ids=_id)
def test_the_models_side_accepts_one_and_refuses_the_other(
    case: tuple[type[BaseModel], Rule],
) -> None:
    model, rule = case
    assert _rule_errors(model, dict(rule.accepts)) == []
    problems = _rule_errors(model, dict(rule.refuses))
    assert problems, f"{model.__name__} accepted {rule.refuses}"
    # Refused by the rule itself, at its field; or by a bound on that same field that the
    # CRD's schema carries too (noiseMultiplier > 0 is also its exclusiveMinimum).
    field = rule.loc()
    by_rule = [loc for loc, message in problems if message == rule.message]
    by_bound = [loc for loc, _ in problems if field and loc[-len(field) :] == field]
    assert by_rule or by_bound, problems
    assert all(loc[len(loc) - len(field) :] == field for loc in by_rule), problems


def test_a_rule_s_python_check_refuses_what_its_cel_refuses() -> None:
    """The rule's own check, not only the model, refuses its refused object (once built
    with the rule's check switched off)."""
    for model, rule in RULES:
        original = model.RULES  # type: ignore[attr-defined]
        model.RULES = tuple(r for r in original if r is not rule)  # type: ignore[attr-defined]
        try:
            try:
                built = model.model_validate(dict(rule.refuses))
            except ValidationError:
                continue  # a field bound refuses it before any rule runs
            assert rule.check(built) is False, rule.message
            assert rule.check(model.model_validate(dict(rule.accepts))) is True
        finally:
            model.RULES = original  # type: ignore[attr-defined]
