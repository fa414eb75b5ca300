"""What kube-apiserver does to a FederatedRun before storing it: `fedrun validate`'s check.

kube-apiserver's order for a custom resource: drop unknown fields (or refuse them under
strict field validation, kubectl's default), prune nulls, apply the schema's defaults,
validate the OpenAPI schema, and only if that passed, evaluate every
`x-kubernetes-validations` rule (transition rules, the ones that name `oldSelf`, only on
updates) with cel-python, numbers typed as the schema says. The schema and the rules are
the generated CRD's (`fedrun_render.crd.build_crd`), so this checks exactly what a cluster
with fedrun's chart installed would check. The tests' emulated API server uses it too, and
tests/cluster compares it with a real kube-apiserver.

Needs the `validate` extra (jsonschema, cel-python); import this module only where that
is installed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel

CEL = celpy.Environment()

# Every object carries these whatever its schema says; kube-apiserver never prunes them.
ROOT_FIELDS = ("apiVersion", "kind", "metadata")


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema; objects refuse unknown fields."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    for bound, key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(key)
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True  # the API server refuses a set's duplicate items
    return out


def prune_nulls(obj: Any) -> Any:
    """The API server drops nulls in non-nullable fields (no field here is nullable)."""
    if isinstance(obj, dict):
        return {k: prune_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [prune_nulls(v) for v in obj]
    return obj


def prune_unknown(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Drop, in place, the fields `schema` does not declare; return their dotted paths.

    This is what kube-apiserver does without strict field validation (it only warns);
    with `fieldValidation=Strict` (kubectl's default) the same paths are an error.
    """
    dropped: list[str] = []
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(obj):
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                dropped += prune_unknown(props[key], obj[key], where)
            elif isinstance(extra, dict):
                dropped += prune_unknown(extra, obj[key], where)
            elif props is not None and not (path == "" and key in ROOT_FIELDS):
                del obj[key]
                dropped.append(where)
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            dropped += prune_unknown(schema["items"], item, f"{path}[{i}]")
    return dropped


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill in the schema's `default`s where a field is absent (mutates and returns `obj`)."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(sub, obj[name])
        if "additionalProperties" in schema:
            for key in obj:
                obj[key] = apply_defaults(schema["additionalProperties"], obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def typed(schema: dict[str, Any], obj: Any) -> Any:
    """Values as CEL sees them: `number` fields are doubles even when written as 1."""
    if schema.get("type") == "number" and isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", {})
        return {k: typed(props.get(k, extra), v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [typed(schema.get("items", {}), v) for v in obj]
    return obj


def rules_at(
    schema: dict[str, Any], obj: Any, old: Any, path: str
) -> Iterator[tuple[str, dict[str, str], Any, Any]]:
    """(path, rule, self, oldSelf) for every rule that applies somewhere in `obj`."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, obj, old
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                sub_old = old.get(name) if isinstance(old, dict) else None
                yield from rules_at(sub, obj[name], sub_old, f"{path}.{name}" if path else name)
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            yield from rules_at(schema["items"], item, None, f"{path}[{i}]")


@functools.cache
def program(rule: str) -> Any:
    """The compiled CEL program of one rule (compiling is the slow part, so it is cached)."""
    return CEL.program(CEL.compile(rule))


def evaluate(rule: str, self_: Any, old: Any = None) -> bool:
    """Evaluate one `x-kubernetes-validations` rule on `self` (and `oldSelf`, when given)."""
    activation = {"self": json_to_cel(self_)}
    if old is not None:
        activation["oldSelf"] = json_to_cel(old)
    result = program(rule).evaluate(activation)
    if not isinstance(result, celpy.celtypes.BoolType):
        raise AssertionError(f"rule {rule!r} did not give a bool: {result!r}")
    return bool(result)


class Admission:
    """kube-apiserver's schema handling for one version of one CRD.

    `prepare` gives the object as the API server would store it (nulls pruned, defaults
    applied); `admit` gives the problems it would report, each `<field path>: <message>`.
    """

    def __init__(self, crd: dict[str, Any], version: str | None = None) -> None:
        versions = crd["spec"]["versions"]
        chosen = next(v for v in versions if version is None or v["name"] == version)
        self.kind: str = crd["spec"]["names"]["kind"]
        self.group: str = crd["spec"]["group"]
        self.schema: dict[str, Any] = chosen["schema"]["openAPIV3Schema"]
        self.validator = jsonschema.Draft202012Validator(to_jsonschema(self.schema))

    def prepare(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of `obj` with nulls pruned and the schema's defaults applied."""
        out: dict[str, Any] = apply_defaults(self.schema, prune_nulls(copy.deepcopy(obj)))
        return out

    def prune_unknown(self, obj: dict[str, Any]) -> list[str]:
        """Drop undeclared fields from `obj` in place; return their paths."""
        return prune_unknown(self.schema, obj)

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        """Problems kube-apiserver would report for a create (or an update from `old`)."""
        new = self.prepare(obj)
        errors = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in self.validator.iter_errors(new)
        ]
        if errors:
            return errors  # the API server stops before CEL when the schema fails
        before = typed(self.schema, self.prepare(old)) if old is not None else None
        found = rules_at(self.schema, typed(self.schema, new), before, "")
        for path, rule, self_, old_self in found:
            is_transition = "oldSelf" in rule["rule"]
            if is_transition and old_self is None:
                continue  # transition rules only run on updates
            if not evaluate(rule["rule"], self_, old_self if is_transition else None):
                errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
        return errors


@functools.cache
def fedrun_admission() -> Admission:
    """The FederatedRun CRD's admission, built from the operator's models."""
    from .crd import build_crd

    return Admission(build_crd())


@functools.cache
def budget_admission() -> Admission:
    """The PrivacyBudget CRD's admission, built from the operator's models."""
    from .crd import build_budget_crd

    return Admission(build_budget_crd())


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Problems kube-apiserver would report for this FederatedRun (strict field validation)."""
    return fedrun_admission().admit(obj, old)
