"""Generate the FederatedRun CustomResourceDefinition from the pydantic models.

`python -m fedrun_render.crd > crds/federatedrun.yaml` writes the CRD; a unit test
fails when the committed file drifts from the models.

Pydantic emits JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3 schema:
every node typed, no `$ref`, no `anyOf` except int-or-string, no `additionalProperties: false`
beside `properties`, numeric exclusive bounds as booleans, and optional fields left out rather
than nullable (the API server prunes a null in a non-nullable field, so `field: null` in a
manifest still means "unset").
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from fedrun_core import api, budgets
from fedrun_core import names as c

__all__ = [
    "build_budget_crd",
    "build_crd",
    "crd_yaml",
    "main",
    "openapi_schema",
    "to_structural",
]

HEADER = "# Generated from fedrun_core.api by `python -m fedrun_render.crd`. Do not edit.\n"
BUDGET_HEADER = (
    "# Generated from fedrun_core.budgets by `python -m fedrun_render.crd PrivacyBudget`. "
    "Do not edit.\n"
)

# JSON Schema keywords copied as they are; anything else is refused so that nothing the
# API server would reject (or silently ignore) slips into the CRD.
_KEPT = frozenset(
    {
        "type",
        "description",
        "default",
        "enum",
        "format",
        "pattern",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "maxProperties",
        "required",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
    }
)
_DROPPED = frozenset({"title"})


def to_structural(
    node: dict[str, Any], defs: dict[str, Any], *, defaults: bool = True
) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 schema node.

    `defs` holds pydantic's `$defs`; references are inlined. With `defaults=False` every
    `default` is left out (used for status, which only the operator writes).
    """
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").removeprefix("#/$defs/")]
        # Keys beside the $ref (the field's description, default, ...) win over the model's.
        return to_structural({**target, **node}, defs, defaults=defaults)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = node.pop("anyOf")
        typed = [o for o in options if o != {"type": "null"}]
        if len(typed) != 1:
            raise ValueError(f"cannot express anyOf {options!r} in a structural schema")
        # Optional[X]: X without null; the outer keys (description, default) win.
        return to_structural({**typed[0], **node}, defs, defaults=defaults)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or (key == "default" and (value is None or not defaults)):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {
                name: to_structural(sub, defs, defaults=defaults) for name, sub in value.items()
            }
        elif key == "items":
            out[key] = to_structural(value, defs, defaults=defaults)
        elif key == "additionalProperties":
            if value is False:
                continue  # unknown fields are pruned (and refused by kubectl's strict validation)
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out[key] = to_structural(value, defs, defaults=defaults)
        elif (
            key == "anyOf" or key in _KEPT
        ):  # int-or-string: the one anyOf a structural schema allows
            out[key] = value
        else:
            raise ValueError(f"JSON Schema keyword {key!r} has no structural equivalent")
    if "required" in out and not out["required"]:
        del out["required"]
    if out.get("type") == "object" and not (
        {"properties", "additionalProperties", "x-kubernetes-preserve-unknown-fields"} & out.keys()
    ):
        raise ValueError(f"object schema {node!r} declares no fields")
    return out


def _model_schema(model: type[BaseModel], *, defaults: bool) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return to_structural(schema, defs, defaults=defaults)


def _object_schema(
    kind: str,
    resource: type[BaseModel],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
) -> dict[str, Any]:
    """The `openAPIV3Schema` of a resource with a spec (defaults applied by the API server)
    and a status (written by fedrun only, so without defaults)."""
    spec = _model_schema(spec_model, defaults=True)
    status = _model_schema(status_model, defaults=False)
    spec["description"] = spec_model.__doc__ or ""
    status["description"] = status_model.__doc__ or ""
    return {
        "type": "object",
        "description": resource.__doc__ or "",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": f"Versioned schema of this object: {c.API_VERSION}.",
            },
            "kind": {"type": "string", "description": f"{kind}."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def openapi_schema() -> dict[str, Any]:
    """The CRD's `openAPIV3Schema` for FederatedRun."""
    schema = _object_schema(c.KIND, api.FederatedRun, api.FederatedRunSpec, api.FederatedRunStatus)
    schema["x-kubernetes-validations"] = api.ROOT_VALIDATIONS
    return schema


def budget_openapi_schema() -> dict[str, Any]:
    """The PrivacyBudget CRD's `openAPIV3Schema`."""
    return _object_schema(
        c.BUDGET_KIND, budgets.PrivacyBudget, budgets.BudgetSpec, budgets.BudgetStatus
    )


PRINTER_COLUMNS: list[dict[str, str]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Epsilon", "type": "number", "jsonPath": ".status.privacy.epsilonSpent"},
    {"name": "AUROC", "type": "number", "jsonPath": ".status.metrics.auroc"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

BUDGET_PRINTER_COLUMNS: list[dict[str, str]] = [
    {"name": "Hospital", "type": "string", "jsonPath": ".spec.hospital"},
    {"name": "Dataset", "type": "string", "jsonPath": ".spec.dataset.uri"},
    {"name": "Limit", "type": "number", "jsonPath": ".spec.epsilon"},
    {"name": "Spent", "type": "number", "jsonPath": ".status.spent"},
    {"name": "Reserved", "type": "number", "jsonPath": ".status.reserved"},
    {"name": "Remaining", "type": "number", "jsonPath": ".status.remaining"},
    {"name": "Runs", "type": "integer", "jsonPath": ".status.runs"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _crd(
    kind: str,
    plural: str,
    singular: str,
    short_names: tuple[str, ...],
    schema: dict[str, Any],
    columns: list[dict[str, str]],
) -> dict[str, Any]:
    """A namespaced CustomResourceDefinition of fedrun's group, one served version with a
    status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{c.GROUP}",
            "labels": {c.LABEL_PART_OF: c.PART_OF},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def build_crd() -> dict[str, Any]:
    """The FederatedRun CustomResourceDefinition (apiextensions.k8s.io/v1) as a dict."""
    return _crd(c.KIND, c.PLURAL, c.SINGULAR, c.SHORT_NAMES, openapi_schema(), PRINTER_COLUMNS)


def build_budget_crd() -> dict[str, Any]:
    """The PrivacyBudget CustomResourceDefinition (apiextensions.k8s.io/v1) as a dict."""
    return _crd(
        c.BUDGET_KIND,
        c.BUDGET_PLURAL,
        c.BUDGET_SINGULAR,
        c.BUDGET_SHORT_NAMES,
        budget_openapi_schema(),
        BUDGET_PRINTER_COLUMNS,
    )


class _Dumper(yaml.SafeDumper):
    """Writes shared sub-trees out in full: no YAML anchors or aliases in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml(kind: str = c.KIND) -> str:
    """The CRD of ``kind`` (FederatedRun or PrivacyBudget) as YAML text, byte-for-byte
    reproducible."""
    budget = kind == c.BUDGET_KIND
    crd = build_budget_crd() if budget else build_crd()
    body = yaml.dump(crd, Dumper=_Dumper, sort_keys=True, width=100, allow_unicode=True)
    return (BUDGET_HEADER if budget else HEADER) + body


def main() -> None:
    """Write a CRD to standard output: FederatedRun's, or the kind named by the argument."""
    kind = sys.argv[1] if len(sys.argv) > 1 else c.KIND
    if kind not in (c.KIND, c.BUDGET_KIND):
        sys.exit(f"usage: python -m fedrun_render.crd [{c.KIND}|{c.BUDGET_KIND}]")
    sys.stdout.write(crd_yaml(kind))


if __name__ == "__main__":
    main()
