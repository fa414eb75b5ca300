"""The FederatedRun API: pydantic models for spec and status, loading and defaults.

These models are the single source of truth for the resource: `crd.py` generates the
CustomResourceDefinition from them, so every field description here is what
`kubectl explain federatedrun.spec...` shows. Each cross-field rule is written once, as a
:class:`Rule` in its model's ``RULES``: its CEL expression goes into the CRD's
``x-kubernetes-validations`` (checked on `kubectl apply`), its Python check runs when the
models parse a run (`fedrun local`, `fedrun render`, the operator), both with one message.
tests/unit/test_rules.py shows every rule accepting and refusing the same objects on both
sides.

Every string, list and map in the spec is bounded: the API server estimates the cost of a CEL
rule from these bounds (the immutability rule compares the whole spec) and refuses a CRD
whose rules might cost too much.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fedrun_core import names as c
from fedrun_core.states import ConditionStatus, HospitalState, Phase
from fedrun_core.values import DEFAULT_MISSING_VALUES, category_key

__all__ = [
    "Condition",
    "DataSpec",
    "Feature",
    "FederatedRun",
    "FederatedRunSpec",
    "FederatedRunStatus",
    "History",
    "Hospital",
    "HospitalPrivacyStatus",
    "HospitalStatus",
    "MetricsStatus",
    "MlflowSpec",
    "ObjectMeta",
    "PodDefaults",
    "PodSettings",
    "PrivacySpec",
    "PrivacyStatus",
    "Resources",
    "RoundStatus",
    "SecuritySpec",
    "ServerSpec",
    "SpecError",
    "SpecUnreadableError",
    "StrategySpec",
    "Toleration",
    "TrainingSpec",
    "ledger_uri",
    "load_run",
    "merge_pod_settings",
    "parse_pod_defaults",
    "parse_run",
    "pvc_claim",
    "pvc_mount_path",
    "pvc_pod_path",
    "yaml_problem",
]

# Kubernetes names. Services need DNS-1035 labels (leading letter), the rest DNS-1123 labels.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# `<run>-server` must stay a 63-character label.
MAX_RUN_NAME = c.MAX_LABEL_LENGTH - len(c.SERVER_SUFFIX)
# `<run>-<hospital>` (ServiceAccount, Job and the Job's pod label) must stay a label too.
MAX_RUN_PLUS_HOSPITAL = c.MAX_LABEL_LENGTH - 1
# The largest δ a run may ask for: beyond it an (ε, δ) guarantee says little (a δ of 1/n
# allows releasing one patient's record outright), and the ε conversion loses meaning.
MAX_DELTA = 0.01

# pvc://<claim>/<path>: a file on a PersistentVolumeClaim of the run's namespace. The claim
# is a DNS-1123 subdomain; the path is relative and has no empty, '.' or '..' segment, so it
# cannot name anything outside the claim. Written without lookahead: the API server's
# regular expressions (RE2) have none.
PVC_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
PVC_SEGMENT = r"([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)"
PVC_URI = rf"pvc://{PVC_CLAIM}/{PVC_SEGMENT}(/{PVC_SEGMENT})*"
MAX_PVC_CLAIM = 253
# s3://bucket/key, file:///absolute, file:relative (to the reader's working directory),
# an absolute path inside the pod (a mounted volume), or pvc://claim/path.
DATA_URI = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+|file:///.+|file:[^/].*|/.+|" + PVC_URI + ")$"
)
ROLE_ARN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$"
# Kubernetes resource.Quantity as a string, e.g. 500m, 2Gi, 1.5.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

DEFAULT_PROXIMAL_MU = 0.01
DEFAULT_SERVER_LEARNING_RATE = 0.1
DEFAULT_HIDDEN_SIZES = (32, 16)


# --------------------------------------------------------------------------- helpers


class RuleError(ValueError):
    """A cross-field rule broken at `loc` (a path relative to the model that raised it)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class Rule:
    """One cross-field rule of a spec object, written once for both sides.

    The API server checks ``cel`` (``self`` is the object, or its field ``scope``) when a run
    is applied; the models check ``check`` (on the validated model) when fedrun parses a
    run. Both report ``message`` at ``field``. ``accepts`` and ``refuses`` are two objects
    of the model's kind (camelCase, as in YAML) that differ in what the rule is about:
    tests/unit/test_rules.py shows each side accepts the first and refuses the second.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    accepts: Mapping[str, Any]
    refuses: Mapping[str, Any]
    field: str | None = None
    scope: str | None = None
    # Whether the CEL entry names `field` as its fieldPath (the API server accepts a
    # fieldPath only into the schema's own properties: not into metadata).
    cel_field: bool = True

    def entry(self) -> dict[str, str]:
        """The rule's ``x-kubernetes-validations`` entry."""
        out = {"rule": self.cel, "message": self.message}
        if self.field is not None and self.scope is None and self.cel_field:
            out["fieldPath"] = f".{self.field}"
        return out

    def loc(self) -> tuple[str, ...]:
        """Where the models report the rule: its field (dotted), relative to the model."""
        name = self.scope or self.field
        return tuple(name.split(".")) if name else ()


def rules_schema(rules: Sequence[Rule], scope: str | None = None) -> dict[str, Any]:
    """The ``x-kubernetes-validations`` of ``rules`` placed at ``scope`` (None: the object)."""
    return {"x-kubernetes-validations": [r.entry() for r in rules if r.scope == scope]}


def _check_quantity(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"must be an integer or a Kubernetes quantity string such as '500m' (got {value!r})"
        )
    if isinstance(value, str) and not re.match(QUANTITY, value):
        raise ValueError(f"must be a Kubernetes quantity such as '500m' or '2Gi' (got {value!r})")
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


class _Spec(BaseModel):
    """Base of spec models: camelCase in YAML, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    #: The object's cross-field rules; the CRD carries their CEL, the models run their checks.
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules_hold(self) -> Any:
        for rule in type(self).RULES:
            if not rule.check(self):
                raise RuleError(rule.loc(), rule.message)
        return self


class _Status(BaseModel):
    """Base of status models: camelCase, unknown fields ignored (newer writers may add some)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, alias_generator=to_camel)


# --------------------------------------------------------------------------- spec


class StrategySpec(_Spec):
    """How the server combines the hospitals' updates each round."""

    RULES = (
        Rule(
            "self.name == 'FedProx' || !has(self.proximalMu)",
            "proximalMu is only meaningful for strategy FedProx",
            lambda s: s.name == "FedProx" or s.proximal_mu is None,
            accepts={"name": "FedProx", "proximalMu": 0.5},
            refuses={"name": "FedAvg", "proximalMu": 0.5},
            field="proximalMu",
        ),
        Rule(
            "self.name == 'FedAdam' || !has(self.serverLearningRate)",
            "serverLearningRate is only meaningful for strategy FedAdam",
            lambda s: s.name == "FedAdam" or s.server_learning_rate is None,
            accepts={"name": "FedAdam", "serverLearningRate": 0.5},
            refuses={"name": "FedProx", "serverLearningRate": 0.5},
            field="serverLearningRate",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    name: Literal["FedAvg", "FedProx", "FedAdam"] = Field(
        "FedAvg",
        description=(
            "Aggregation strategy. FedAvg: average of the hospitals' weights, weighted by "
            "their number of training examples. FedProx: FedAvg plus a proximal term in each "
            "hospital's loss (for hospitals whose data differ). FedAdam: the server applies "
            "Adam to the averaged update."
        ),
    )
    proximal_mu: float | None = Field(
        None,
        ge=0,
        le=1000,
        description=(
            f"FedProx only: weight of the proximal term mu/2 * ||w - w_global||^2. "
            f"Defaults to {DEFAULT_PROXIMAL_MU}."
        ),
    )
    server_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=(
            f"FedAdam only: the server optimiser's learning rate. "
            f"Defaults to {DEFAULT_SERVER_LEARNING_RATE}."
        ),
    )

    @model_validator(mode="after")
    def _strategy_defaults(self) -> StrategySpec:
        if self.name == "FedProx" and self.proximal_mu is None:
            self.proximal_mu = DEFAULT_PROXIMAL_MU
        if self.name == "FedAdam" and self.server_learning_rate is None:
            self.server_learning_rate = DEFAULT_SERVER_LEARNING_RATE
        return self


class TrainingSpec(_Spec):
    """The model every hospital trains and how each hospital trains it locally per round."""

    RULES = (
        Rule(
            "self.model == 'mlp' || !has(self.hiddenSizes)",
            "hiddenSizes is only meaningful for model mlp",
            lambda s: s.model == "mlp" or s.hidden_sizes is None,
            accepts={"model": "mlp", "hiddenSizes": [8]},
            refuses={"model": "logistic", "hiddenSizes": [8]},
            field="hiddenSizes",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    model: Literal["logistic", "mlp"] = Field(
        "logistic",
        description=(
            "logistic: logistic regression (one linear layer). mlp: a multilayer perceptron "
            "with ReLU hidden layers of hiddenSizes."
        ),
    )
    hidden_sizes: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description=(
            f"mlp only: width of each hidden layer, input side first. "
            f"Defaults to {list(DEFAULT_HIDDEN_SIZES)}."
        ),
    )
    local_epochs: int = Field(
        1,
        ge=1,
        le=1000,
        description="Passes over its training split each hospital makes per round.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description=(
            "Expected batch size. With privacy enabled, batches are Poisson-sampled with "
            "sample rate batchSize / (number of training rows), so sizes vary around this."
        ),
    )
    learning_rate: float = Field(
        2.0,
        gt=0,
        le=100,
        description=(
            "Learning rate of each hospital's local SGD optimiser. DP-SGD clips every "
            "example's gradient (maxGradNorm) and adds noise, so it wants a larger step than "
            "plain SGD: on the stroke table, rates from 2 to 8 trained about equally well."
        ),
    )
    test_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description=(
            "Fraction of each hospital's rows held out (stratified by the target) for "
            "federated evaluation; never used for training."
        ),
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**31 - 1,
        description="Seed for the train/test split, model initialisation and sampling.",
    )

    @model_validator(mode="after")
    def _hidden_sizes_for_mlp(self) -> TrainingSpec:
        if self.model == "mlp" and self.hidden_sizes is None:
            self.hidden_sizes = list(DEFAULT_HIDDEN_SIZES)
        return self


#: A categorical feature that imputes a category: the rules' examples start from it.
_SEX_IMPUTED = {
    "name": "sex",
    "type": "categorical",
    "categories": ["F"],
    "missing": "impute",
    "fillCategory": "F",
}


class Feature(_Spec):
    """One input column of the hospitals' tables, and how every hospital reads it.

    What a cell means (missing markers, category matching, booleans) is defined in
    :mod:`fedrun_core.values`; what a hospital does with a missing or unknown cell is this
    feature's declared, agreed policy, never something learnt from any hospital's data.
    """

    RULES = (
        Rule(
            "self.type == 'categorical' || !has(self.categories)",
            "categories are only meaningful for categorical features",
            lambda f: f.type == "categorical" or f.categories is None,
            accepts={"name": "sex", "type": "categorical", "categories": ["F", "M"]},
            refuses={"name": "sex", "type": "numeric", "categories": ["F", "M"]},
            field="categories",
        ),
        Rule(
            "self.type != 'categorical' || (has(self.categories) && size(self.categories) > 0)",
            "a categorical feature needs its categories",
            lambda f: f.type != "categorical" or bool(f.categories),
            accepts={"name": "sex", "type": "categorical", "categories": ["F"]},
            refuses={"name": "sex", "type": "categorical"},
            field="categories",
        ),
        Rule(
            "self.type == 'numeric' || (!has(self.min) && !has(self.max))",
            "min and max are only meaningful for numeric features",
            lambda f: f.type == "numeric" or (f.min is None and f.max is None),
            accepts={"name": "age", "type": "numeric", "min": 0.0, "max": 120.0},
            refuses={
                "name": "age",
                "type": "categorical",
                "categories": ["young"],
                "min": 0.0,
                "max": 120.0,
            },
        ),
        Rule(
            "has(self.min) == has(self.max)",
            "min and max go together",
            lambda f: (f.min is None) == (f.max is None),
            accepts={"name": "age", "type": "numeric"},
            refuses={"name": "age", "type": "numeric", "min": 0.0},
        ),
        Rule(
            "!has(self.min) || !has(self.max) || self.min < self.max",
            "min must be less than max",
            lambda f: f.min is None or f.max is None or f.min < f.max,
            accepts={"name": "age", "type": "numeric", "min": 0.0, "max": 1.0},
            refuses={"name": "age", "type": "numeric", "min": 1.0, "max": 1.0},
            field="min",
        ),
        Rule(
            "self.type == 'categorical' || !has(self.aliases)",
            "aliases are only meaningful for categorical features",
            lambda f: f.type == "categorical" or f.aliases is None,
            accepts={"name": "sex", "type": "categorical", "categories": ["F"], "aliases": {}},
            refuses={"name": "sex", "type": "boolean", "aliases": {"W": "F"}},
            field="aliases",
        ),
        Rule(
            "!has(self.aliases) || self.aliases.all(k, size(k) <= 128)",
            "an alias is at most 128 characters",
            lambda f: all(len(k) <= 128 for k in f.aliases or {}),
            accepts={
                "name": "sex",
                "type": "categorical",
                "categories": ["F"],
                "aliases": {"W": "F"},
            },
            refuses={
                "name": "sex",
                "type": "categorical",
                "categories": ["F"],
                "aliases": {"W" * 129: "F"},
            },
            field="aliases",
        ),
        Rule(
            "self.type == 'categorical' || !has(self.unknown) || self.unknown == 'error'",
            "unknown: other is only meaningful for categorical features",
            lambda f: f.type == "categorical" or f.unknown == "error",
            accepts={"name": "sex", "type": "categorical", "categories": ["F"], "unknown": "other"},
            refuses={"name": "age", "type": "numeric", "unknown": "other"},
            field="unknown",
        ),
        Rule(
            "(!has(self.fill) && !has(self.fillCategory)) || "
            "(has(self.missing) && self.missing == 'impute')",
            "fill and fillCategory are only used with missing: impute",
            lambda f: (f.fill is None and f.fill_category is None) or f.missing == "impute",
            accepts={"name": "age", "type": "numeric", "missing": "impute", "fill": 50.0},
            refuses={"name": "age", "type": "numeric", "missing": "dropRow", "fill": 50.0},
            field="missing",
        ),
        Rule(
            "!has(self.missing) || self.missing != 'impute' || "
            "(self.type == 'categorical' ? has(self.fillCategory) : has(self.fill))",
            "missing: impute needs the agreed value: fill (numeric, boolean) or fillCategory "
            "(categorical)",
            lambda f: (
                f.missing != "impute"
                or (f.fill_category is not None if f.type == "categorical" else f.fill is not None)
            ),
            accepts=_SEX_IMPUTED,
            refuses={k: v for k, v in _SEX_IMPUTED.items() if k != "fillCategory"} | {"fill": 1.0},
            field="missing",
        ),
        Rule(
            "self.type != 'categorical' || !has(self.fill)",
            "a categorical feature imputes with fillCategory, not fill",
            lambda f: f.type != "categorical" or f.fill is None,
            accepts={"name": "sex", "type": "categorical", "categories": ["F"]},
            refuses={**_SEX_IMPUTED, "fill": 1.0},
            field="fill",
        ),
        Rule(
            "self.type == 'categorical' || !has(self.fillCategory)",
            "fillCategory is only meaningful for categorical features (numeric and boolean "
            "features impute with fill)",
            lambda f: f.type == "categorical" or f.fill_category is None,
            accepts={"name": "age", "type": "numeric", "missing": "impute", "fill": 1.0},
            refuses={
                "name": "age",
                "type": "numeric",
                "missing": "impute",
                "fill": 1.0,
                "fillCategory": "1",
            },
            field="fillCategory",
        ),
        Rule(
            "self.type != 'boolean' || !has(self.fill) || self.fill == 0.0 || self.fill == 1.0",
            "a boolean feature's fill is 0 or 1",
            lambda f: f.type != "boolean" or f.fill in (None, 0.0, 1.0),
            accepts={"name": "smoker", "type": "boolean", "missing": "impute", "fill": 0.0},
            refuses={"name": "smoker", "type": "boolean", "missing": "impute", "fill": 0.5},
            field="fill",
        ),
        Rule(
            "!has(self.fillCategory) || "
            "(has(self.categories) && self.categories.exists(c, c == self.fillCategory))",
            "fillCategory must be one of the categories",
            lambda f: f.fill_category is None or f.fill_category in (f.categories or []),
            accepts=_SEX_IMPUTED,
            refuses={**_SEX_IMPUTED, "fillCategory": "M"},
            field="fillCategory",
        ),
        Rule(
            "!has(self.indicator) || !self.indicator || "
            "(has(self.missing) && self.missing == 'impute')",
            "indicator is only used with missing: impute",
            lambda f: not f.indicator or f.missing == "impute",
            accepts={
                "name": "age",
                "type": "numeric",
                "missing": "impute",
                "fill": 1.0,
                "indicator": True,
            },
            refuses={"name": "age", "type": "numeric", "indicator": True},
            field="indicator",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    name: str = Field(
        min_length=1, max_length=256, description="Column name, exactly as in the tables."
    )
    type: Literal["numeric", "categorical", "boolean"] = Field(
        description=(
            "numeric: a number, scaled by min/max. categorical: one-hot encoded against "
            "categories. boolean: yes/no, true/false, y/n, t/f or 1/0 (any case)."
        )
    )
    min: float | None = Field(
        None,
        allow_inf_nan=False,
        description=(
            "numeric only: lower end of the scaling range all hospitals agree on (values are "
            "clipped to [min, max] and mapped onto [-1, 1]). Give min and max together; "
            "without them each hospital standardises the column with its own mean and "
            "spread, which is weaker: give ranges whenever you can."
        ),
    )
    max: float | None = Field(
        None,
        allow_inf_nan=False,
        description="numeric only: upper end of the agreed scaling range.",
    )
    categories: list[Annotated[str, Field(max_length=128)]] | None = Field(
        None,
        min_length=1,
        max_length=200,
        description=(
            "categorical only: every category, once each, in a fixed order shared by all "
            "hospitals. Cells match a category trimmed and case-insensitively, and numbers "
            "by value (1 = 1.0). A value outside the list (and aliases) follows unknown."
        ),
        # A set: the API server refuses duplicates, as the model does.
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    aliases: dict[str, Annotated[str, Field(max_length=128)]] | None = Field(
        None,
        max_length=64,
        description=(
            "categorical only: other written forms of a category, e.g. {M: Male, F: Female}; "
            "each value must be one of the categories. Matched like categories."
        ),
    )
    unknown: Literal["error", "other"] = Field(
        "error",
        description=(
            "categorical only: what a value outside categories and aliases does. error: the "
            "hospital fails, naming the row and column. other: it is counted and encoded "
            "in one extra column, <name>=(other)."
        ),
    )
    missing: Literal["error", "impute", "dropRow"] = Field(
        "error",
        description=(
            "What a missing cell (see data.missingValues) does. error: the hospital fails, "
            "naming the row and column. impute: it takes the agreed fill (or fillCategory), "
            "optionally flagged by an indicator column. dropRow: the row is not used. Each "
            "hospital reports how many rows it used, dropped and imputed per column."
        ),
    )
    fill: float | None = Field(
        None,
        allow_inf_nan=False,
        description=(
            "numeric and boolean, with missing: impute: the agreed value a missing cell "
            "takes (boolean: 0 or 1). A constant, never a statistic of anyone's data."
        ),
    )
    fill_category: str | None = Field(
        None,
        max_length=128,
        description=(
            "categorical, with missing: impute: the category a missing cell takes (one of "
            "categories)."
        ),
    )
    indicator: bool = Field(
        False,
        description=(
            "With missing: impute, add a column <name>_missing that flags imputed cells "
            "(missingness itself often carries signal)."
        ),
    )

    @model_validator(mode="after")
    def _categories_unique(self) -> Feature:
        # Compared as cells are (trimmed, case-insensitive, numbers by value): two categories
        # that a cell could match both would make the encoding ambiguous. The CRD says the
        # exact-duplicate part with x-kubernetes-list-type: set.
        if self.categories is not None:
            seen: dict[str, str] = {}
            for category in self.categories:
                key = category_key(category)
                if key in seen:
                    raise RuleError(
                        ("categories",),
                        f"categories must be unique: {seen[key]!r} and {category!r} are the "
                        "same category once trimmed, case-folded and numbers compared by value",
                    )
                seen[key] = category
            for alias, target in (self.aliases or {}).items():
                if target not in self.categories:
                    raise RuleError(
                        ("aliases",),
                        f"alias {alias!r} names {target!r}, which is not one of the categories",
                    )
                other = seen.get(category_key(alias))
                if other is not None and other != target:
                    raise RuleError(
                        ("aliases",),
                        f"alias {alias!r} for {target!r} is written like the category {other!r}",
                    )
        return self


class DataSpec(_Spec):
    """The shape of the hospitals' tables: a named preset, or a target and feature list."""

    RULES = (
        Rule(
            "has(self.preset) || has(self.targetColumn)",
            "targetColumn is required unless a preset is set",
            lambda d: d.preset is not None or d.target_column is not None,
            accepts={"targetColumn": "y", "features": [{"name": "x", "type": "numeric"}]},
            refuses={"features": [{"name": "x", "type": "numeric"}]},
            field="targetColumn",
        ),
        Rule(
            "has(self.preset) || has(self.features)",
            "features are required unless a preset is set",
            lambda d: d.preset is not None or d.features is not None,
            accepts={"preset": "stroke", "targetColumn": "y"},
            refuses={"targetColumn": "y"},
            field="features",
        ),
        Rule(
            "!has(self.preset) || !has(self.features)",
            "a preset defines the features: set either preset or features",
            lambda d: d.preset is None or d.features is None,
            accepts={"preset": "stroke"},
            refuses={"preset": "stroke", "features": [{"name": "x", "type": "numeric"}]},
            field="features",
        ),
        Rule(
            "!has(self.features) || !has(self.targetColumn) || "
            "!self.features.exists(f, f.name == self.targetColumn)",
            "targetColumn must not also be a feature",
            lambda d: d.features is None or d.target_column not in {f.name for f in d.features},
            accepts={"targetColumn": "y", "features": [{"name": "x", "type": "numeric"}]},
            refuses={"targetColumn": "x", "features": [{"name": "x", "type": "numeric"}]},
            field="features",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    format: Literal["csv", "parquet"] = Field("csv", description="File format of every table.")
    preset: Literal["stroke"] | None = Field(
        None,
        description=(
            "A named schema: stroke is the Kaggle stroke-prediction table (target column "
            "stroke; features gender, age, hypertension, heart_disease, ever_married, "
            "work_type, Residence_type, avg_glucose_level, bmi, smoking_status)."
        ),
    )
    target_column: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description=(
            "Binary label column (0/1). Required unless a preset gives it; with a preset it "
            "overrides the preset's target column."
        ),
    )
    features: list[Feature] | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Input columns, when no preset is set. Names are unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    missing_values: list[Annotated[str, Field(max_length=32)]] | None = Field(
        None,
        max_length=32,
        description=(
            "What counts as a missing cell, compared trimmed and case-insensitively; an "
            "empty cell always does. Default: "
            + ", ".join(DEFAULT_MISSING_VALUES)
            + ". A value that is one of a feature's categories or aliases is never missing."
        ),
    )
    target_missing: Literal["error", "dropRow"] = Field(
        "error",
        description=(
            "What a row whose target is missing does: error (the hospital fails, naming the "
            "row) or dropRow (the row is not used, and counted)."
        ),
    )
    min_rows_per_class: int = Field(
        1,
        ge=0,
        le=1_000_000,
        description=(
            "The fewest rows of each class (target 0 and 1) a hospital must have left after "
            "its missing-value policies; a hospital with fewer fails with a message saying "
            "so. 0 lets a hospital with one class only take part."
        ),
    )

    @model_validator(mode="after")
    def _feature_names_unique(self) -> DataSpec:
        # The CRD says the same with x-kubernetes-list-type: map, keyed by name.
        if self.features is not None:
            seen: set[str] = set()
            for i, feature in enumerate(self.features):
                if feature.name in seen:
                    raise RuleError(
                        ("features", i, "name"), f"duplicate feature name {feature.name!r}"
                    )
                seen.add(feature.name)
        return self


class PrivacySpec(_Spec):
    """Differential privacy (DP-SGD with Opacus) applied by every hospital to its own data."""

    RULES = (
        Rule(
            "!has(self.noiseMultiplier) || self.noiseMultiplier > 0.0",
            "noiseMultiplier must be greater than 0 when set",
            lambda p: p.noise_multiplier is None or p.noise_multiplier > 0.0,
            accepts={"noiseMultiplier": 0.5},
            refuses={"noiseMultiplier": 0.0},
            field="noiseMultiplier",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    enabled: bool = Field(
        True,
        description=(
            "Train with DP-SGD. When false no privacy guarantee is given and no ε is reported."
        ),
    )
    target_epsilon: float = Field(
        1.0,
        gt=0,
        le=1000,
        description=(
            "Privacy budget ε for the WHOLE run, per hospital. A hospital refuses any round "
            "that would take it over; the run then ends with phase BudgetExhausted."
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        le=MAX_DELTA,
        description=(
            "δ of the (ε, δ) guarantee: the chance that the ε bound fails outright. At most "
            "0.01; keep it well below 1 / (training rows per hospital)."
        ),
    )
    max_grad_norm: float = Field(
        1.0, gt=0, le=1e6, description="Per-example gradient clipping bound C."
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=(
            "Fixed noise multiplier σ. When unset each hospital derives σ so that all rounds "
            "together end at or under targetEpsilon."
        ),
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Privacy accountant: rdp (Rényi DP) or prv (privacy random variables)."
    )


class Resources(_Spec):
    """Compute resources of a container, as in a Pod's resources."""

    requests: dict[str, Quantity] | None = Field(
        None,
        max_length=32,
        description="Minimum resources, e.g. {cpu: '1', memory: 2Gi}.",
    )
    limits: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Maximum resources, e.g. {memory: 4Gi}."
    )


class Toleration(_Spec):
    """A Pod toleration, as in a Pod's tolerations."""

    key: str | None = Field(None, max_length=316, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, description="NoExecute only: how long the pod stays bound after the taint appears."
    )


# --------------------------------------------------------------------------- pod settings
#
# What a run may set on its pods (spec.server, spec.hospitalDefaults, spec.hospitals[]), in
# the shape of a Pod's fields. Nothing here can touch a pod's security: the models have no
# securityContext, host namespaces, privileged or capabilities fields (unknown fields are
# refused), volumes are of the kinds restricted Pod Security allows, and rendering keeps
# fedrun's restricted security contexts whatever is set.

# A DNS-1123 subdomain (Secret, ConfigMap, PriorityClass names): PVC_CLAIM anchored.
DNS1123_SUBDOMAIN = rf"^{PVC_CLAIM}$"
# A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at
# most 63 characters. Written with [.] rather than an escape: it goes into CEL strings.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_QUALIFIED_NAME = 253 + 1 + 63
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
# An absolute path with no empty, '.' or '..' part and no trailing '/' (so never '/').
MOUNT_PATH = rf"^(/{PVC_SEGMENT})+$"
# A relative path with no empty, '.' or '..' part.
RELATIVE_PATH = rf"^{PVC_SEGMENT}(/{PVC_SEGMENT})*$"


def _cel_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _reserved_mount(path: str) -> bool:
    return any(
        path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in c.POD_MOUNT_PATHS
    )


class KeyToPath(_Spec):
    """One key of a Secret or ConfigMap projected into a volume as a file."""

    key: str = Field(max_length=253, pattern=CONFIG_KEY, description="The key.")
    path: str = Field(
        max_length=1024,
        pattern=RELATIVE_PATH,
        description="The file's path inside the volume (relative, no '..').",
    )
    mode: int | None = Field(None, ge=0, le=0o777, description="File mode bits, e.g. 0440.")


class SecretVolume(_Spec):
    """A Secret of the run's namespace as a volume."""

    secret_name: str = Field(
        max_length=253, pattern=DNS1123_SUBDOMAIN, description="The Secret's name."
    )
    items: list[KeyToPath] | None = Field(
        None, max_length=64, description="Only these keys, at these paths (default: every key)."
    )
    default_mode: int | None = Field(
        None, ge=0, le=0o777, description="Mode bits of the files (Kubernetes default 0644)."
    )
    optional: bool | None = Field(None, description="Start the pod when the Secret is missing.")


class ConfigMapVolume(_Spec):
    """A ConfigMap of the run's namespace as a volume."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="The ConfigMap.")
    items: list[KeyToPath] | None = Field(
        None, max_length=64, description="Only these keys, at these paths (default: every key)."
    )
    default_mode: int | None = Field(
        None, ge=0, le=0o777, description="Mode bits of the files (Kubernetes default 0644)."
    )
    optional: bool | None = Field(None, description="Start the pod when the ConfigMap is missing.")


class EmptyDirVolume(_Spec):
    """A scratch directory that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = Field(
        None, description="'' (the node's disk) or Memory (tmpfs, counted as memory)."
    )
    size_limit: Quantity | None = Field(None, description="Most the directory may hold, e.g. 1Gi.")


class PersistentVolumeClaimVolume(_Spec):
    """A PersistentVolumeClaim of the run's namespace as a volume."""

    claim_name: str = Field(
        max_length=MAX_PVC_CLAIM, pattern=DNS1123_SUBDOMAIN, description="The claim's name."
    )
    read_only: bool | None = Field(None, description="Mount the claim read-only.")


class LocalObjectReference(_Spec):
    """A named object of the run's namespace (a Secret)."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Its name.")


class CsiVolume(_Spec):
    """An inline CSI volume (for example the Secrets Store CSI driver)."""

    driver: str = Field(
        max_length=63, pattern=DNS1123_SUBDOMAIN, description="The CSI driver's name."
    )
    read_only: bool | None = Field(None, description="Mount it read-only.")
    fs_type: str | None = Field(None, max_length=63, description="Filesystem type, e.g. ext4.")
    volume_attributes: dict[str, Annotated[str, Field(max_length=1024)]] | None = Field(
        None, max_length=32, description="Driver-specific attributes."
    )
    node_publish_secret_ref: LocalObjectReference | None = Field(
        None, description="A Secret the driver reads when it mounts the volume."
    )


class Volume(_Spec):
    """An extra volume of a run pod: exactly one of secret, configMap, emptyDir,
    persistentVolumeClaim or csi (kinds restricted Pod Security allows; hostPath and the
    others are refused as unknown fields)."""

    RULES = (
        Rule(
            "(has(self.secret) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + "
            "(has(self.emptyDir) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + "
            "(has(self.csi) ? 1 : 0) == 1",
            "a volume has exactly one of secret, configMap, emptyDir, persistentVolumeClaim or csi",
            lambda v: (
                sum(
                    x is not None
                    for x in (v.secret, v.config_map, v.empty_dir, v.persistent_volume_claim, v.csi)
                )
                == 1
            ),
            accepts={"name": "scratch", "emptyDir": {}},
            refuses={"name": "scratch", "emptyDir": {}, "secret": {"secretName": "s"}},
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    name: str = Field(
        max_length=c.MAX_LABEL_LENGTH,
        pattern=DNS1123_LABEL,
        description=(
            "Volume name, unique in the pod, named by volumeMounts; not one of fedrun's own: "
            + ", ".join(c.POD_VOLUMES)
            + "."
        ),
    )
    secret: SecretVolume | None = Field(None, description="A Secret's keys as files.")
    config_map: ConfigMapVolume | None = Field(None, description="A ConfigMap's keys as files.")
    empty_dir: EmptyDirVolume | None = Field(None, description="A scratch directory.")
    persistent_volume_claim: PersistentVolumeClaimVolume | None = Field(
        None, description="A PersistentVolumeClaim."
    )
    csi: CsiVolume | None = Field(None, description="An inline CSI volume.")


class VolumeMount(_Spec):
    """Where the container mounts one of the pod's extra volumes."""

    name: str = Field(
        max_length=c.MAX_LABEL_LENGTH,
        pattern=DNS1123_LABEL,
        description="The volume: one declared in volumes beside this list.",
    )
    mount_path: str = Field(
        max_length=1024,
        pattern=MOUNT_PATH,
        description=(
            "Absolute path in the container, unique in the pod; not at, under or above "
            "fedrun's own mounts: " + ", ".join(c.POD_MOUNT_PATHS) + "."
        ),
    )
    read_only: bool | None = Field(None, description="Mount read-only.")
    sub_path: str | None = Field(
        None,
        max_length=1024,
        pattern=RELATIVE_PATH,
        description="Mount only this path inside the volume (relative, no '..').",
    )


class KeySelector(_Spec):
    """One key of a Secret or ConfigMap of the run's namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="The object.")
    key: str = Field(max_length=253, pattern=CONFIG_KEY, description="The key.")
    optional: bool | None = Field(None, description="Start the pod when it is missing.")


class EnvVarSource(_Spec):
    """Where an environment variable's value comes from: a Secret's or a ConfigMap's key."""

    RULES = (
        Rule(
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
            "valueFrom has exactly one of secretKeyRef or configMapKeyRef",
            lambda s: (s.secret_key_ref is None) != (s.config_map_key_ref is None),
            accepts={"secretKeyRef": {"name": "mlflow", "key": "password"}},
            refuses={},
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    secret_key_ref: KeySelector | None = Field(
        None, description="A Secret's key (credentials, e.g. MLFLOW_TRACKING_PASSWORD)."
    )
    config_map_key_ref: KeySelector | None = Field(None, description="A ConfigMap's key.")


class EnvVar(_Spec):
    """An environment variable of the container: a value, or a Secret's or ConfigMap's key."""

    RULES = (
        Rule(
            "!has(self.value) || !has(self.valueFrom)",
            "set value or valueFrom, not both",
            lambda e: e.value is None or e.value_from is None,
            accepts={"name": "X", "value": "1"},
            refuses={
                "name": "X",
                "value": "1",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
            },
            field="valueFrom",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    name: str = Field(
        min_length=1,
        max_length=256,
        pattern=ENV_NAME,
        description=(
            "Variable name, unique in the list; not FEDRUN_* nor one fedrun sets: "
            + ", ".join(c.POD_ENV)
            + "."
        ),
    )
    value: str | None = Field(None, max_length=4096, description="The value.")
    value_from: EnvVarSource | None = Field(
        None, description="The value from a Secret or ConfigMap."
    )


class ObjectRef(_Spec):
    """A Secret or ConfigMap of the run's namespace whose keys all become variables."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Its name.")
    optional: bool | None = Field(None, description="Start the pod when it is missing.")


class EnvFromSource(_Spec):
    """Every key of a Secret or ConfigMap as environment variables."""

    RULES = (
        Rule(
            "has(self.secretRef) != has(self.configMapRef)",
            "envFrom has exactly one of secretRef or configMapRef",
            lambda s: (s.secret_ref is None) != (s.config_map_ref is None),
            accepts={"secretRef": {"name": "mlflow-credentials"}},
            refuses={"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}},
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    prefix: str | None = Field(
        None, max_length=253, pattern=ENV_NAME, description="Put before every key's name."
    )
    secret_ref: ObjectRef | None = Field(None, description="A Secret.")
    config_map_ref: ObjectRef | None = Field(None, description="A ConfigMap.")


class NodeSelectorRequirement(_Spec):
    """A node label (or field) and the values it must have, as in a Pod's nodeAffinity."""

    key: str = Field(max_length=MAX_QUALIFIED_NAME, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="In, NotIn, Exists, DoesNotExist, Gt or Lt."
    )
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="The values (In, NotIn: any; Gt, Lt: one integer)."
    )


class NodeSelectorTerm(_Spec):
    """Node requirements that must all hold."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        None, max_length=16, description="By node labels."
    )
    match_fields: list[NodeSelectorRequirement] | None = Field(
        None, max_length=4, description="By node fields (metadata.name)."
    )


class NodeSelector(_Spec):
    """Node selector terms of which one must hold."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=8, description="The terms (ORed)."
    )


class PreferredSchedulingTerm(_Spec):
    """A node preference and its weight."""

    weight: int = Field(ge=1, le=100, description="Weight, 1 to 100.")
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(_Spec):
    """Which nodes the pod must or would rather run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="Nodes the pod must run on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = (
        Field(None, max_length=8, description="Nodes the pod would rather run on.")
    )


class LabelSelectorRequirement(_Spec):
    """A label and the values it must have."""

    key: str = Field(max_length=MAX_QUALIFIED_NAME, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="The values (In, NotIn)."
    )


class LabelSelector(_Spec):
    """A Kubernetes label selector."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=16, description="Labels that must have these values."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=8, description="Requirements that must all hold."
    )


class PodAffinityTerm(_Spec):
    """Pods (by labels, in namespaces) that the pod must or must not share a topology with."""

    label_selector: LabelSelector | None = Field(None, description="The other pods.")
    namespace_selector: LabelSelector | None = Field(None, description="Their namespaces.")
    namespaces: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=16, description="Their namespaces by name (default: the run's)."
    )
    topology_key: str = Field(
        min_length=1,
        max_length=MAX_QUALIFIED_NAME,
        description="The node label that defines the topology, e.g. kubernetes.io/hostname.",
    )


class WeightedPodAffinityTerm(_Spec):
    """A pod affinity preference and its weight."""

    weight: int = Field(ge=1, le=100, description="Weight, 1 to 100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(_Spec):
    """Pods to run near (podAffinity) or away from (podAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        None, max_length=8, description="Terms that must hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = (
        Field(None, max_length=8, description="Terms preferred, by weight.")
    )


class Affinity(_Spec):
    """Scheduling constraints, as in a Pod's affinity."""

    node_affinity: NodeAffinity | None = Field(None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(None, description="Pods to run near.")
    pod_anti_affinity: PodAffinity | None = Field(None, description="Pods to run away from.")


_MOUNTS_CEL = _cel_list(c.POD_MOUNT_PATHS)


class PodSettings(_Spec):
    """What a run sets on a pod of its own, in a Pod's terms (server, hospitals, defaults).

    Nothing here touches the pod's security: fedrun's restricted security contexts stay.
    """

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.labels) || self.labels.all(k, !k.startsWith("
            f"'{c.RESERVED_KEY_PREFIX}') && !(k in {_cel_list(c.POD_LABELS)}))",
            f"labels must not set fedrun's own ({c.RESERVED_KEY_PREFIX}*, "
            + ", ".join(c.POD_LABELS)
            + "): its selectors and NetworkPolicies rely on them",
            lambda p: (
                not any(
                    k.startswith(c.RESERVED_KEY_PREFIX) or k in c.POD_LABELS for k in p.labels or {}
                )
            ),
            accepts={"labels": {"team": "cardio"}},
            refuses={"labels": {c.LABEL_RUN: "other"}},
            field="labels",
        ),
        Rule(
            "!has(self.labels) || self.labels.all(k, size(k) <= "
            f"{MAX_QUALIFIED_NAME} && k.matches('{QUALIFIED_NAME}'))",
            "a label key is a qualified name: an optional DNS subdomain and '/', then at most "
            "63 letters, digits, '-', '_' or '.'",
            lambda p: all(
                len(k) <= MAX_QUALIFIED_NAME and re.match(QUALIFIED_NAME, k) for k in p.labels or {}
            ),
            accepts={"labels": {"example.com/team": "cardio"}},
            refuses={"labels": {"team cardio": "x"}},
            field="labels",
        ),
        Rule(
            f"!has(self.annotations) || self.annotations.all(k, !k.startsWith("
            f"'{c.RESERVED_KEY_PREFIX}'))",
            f"annotations must not set fedrun's own ({c.RESERVED_KEY_PREFIX}*)",
            lambda p: not any(k.startswith(c.RESERVED_KEY_PREFIX) for k in p.annotations or {}),
            accepts={"annotations": {"example.com/owner": "cardio"}},
            refuses={"annotations": {c.ANNOTATION_CONFIG_HASH: "x"}},
            field="annotations",
        ),
        Rule(
            "!has(self.annotations) || self.annotations.all(k, size(k) <= "
            f"{MAX_QUALIFIED_NAME} && k.matches('{QUALIFIED_NAME}'))",
            "an annotation key is a qualified name: an optional DNS subdomain and '/', then at "
            "most 63 letters, digits, '-', '_' or '.'",
            lambda p: all(
                len(k) <= MAX_QUALIFIED_NAME and re.match(QUALIFIED_NAME, k)
                for k in p.annotations or {}
            ),
            accepts={"annotations": {"owner": "cardio"}},
            refuses={"annotations": {"/owner": "cardio"}},
            field="annotations",
        ),
        Rule(
            f"!has(self.env) || self.env.all(e, !e.name.startsWith('{c.ENV_PREFIX}') && "
            f"!(e.name in {_cel_list(c.POD_ENV)}))",
            f"env must not set fedrun's own variables ({c.ENV_PREFIX}*, "
            + ", ".join(c.POD_ENV)
            + ")",
            lambda p: (
                not any(e.name.startswith(c.ENV_PREFIX) or e.name in c.POD_ENV for e in p.env or [])
            ),
            accepts={"env": [{"name": "MLFLOW_TRACKING_USERNAME", "value": "fedrun"}]},
            refuses={"env": [{"name": c.ENV_RUN, "value": "other"}]},
            field="env",
        ),
        Rule(
            f"!has(self.volumes) || self.volumes.all(v, !(v.name in {_cel_list(c.POD_VOLUMES)}))",
            "volumes must not take the name of one of fedrun's own: " + ", ".join(c.POD_VOLUMES),
            lambda p: not any(v.name in c.POD_VOLUMES for v in p.volumes or []),
            accepts={"volumes": [{"name": "scratch", "emptyDir": {}}]},
            refuses={"volumes": [{"name": "state", "emptyDir": {}}]},
            field="volumes",
        ),
        Rule(
            "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
            "self.volumes.exists(v, v.name == m.name))",
            "every volumeMount names a volume declared in volumes beside it",
            lambda p: all(
                any(v.name == m.name for v in p.volumes or []) for m in p.volume_mounts or []
            ),
            accepts={
                "volumes": [{"name": "ca", "secret": {"secretName": "mlflow-ca"}}],
                "volumeMounts": [{"name": "ca", "mountPath": "/etc/mlflow-ca"}],
            },
            refuses={
                "volumes": [{"name": "ca", "secret": {"secretName": "mlflow-ca"}}],
                "volumeMounts": [{"name": "cert", "mountPath": "/etc/mlflow-ca"}],
            },
            field="volumeMounts",
        ),
        Rule(
            f"!has(self.volumeMounts) || self.volumeMounts.all(m, {_MOUNTS_CEL}.all(p, "
            "m.mountPath != p && !m.mountPath.startsWith(p + '/') && "
            "!p.startsWith(m.mountPath + '/')))",
            "volumeMounts must not be at, under or above fedrun's own mounts: "
            + ", ".join(c.POD_MOUNT_PATHS),
            lambda p: not any(_reserved_mount(m.mount_path) for m in p.volume_mounts or []),
            accepts={
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
                "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            },
            refuses={
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
                "volumeMounts": [{"name": "shm", "mountPath": "/var/lib"}],
            },
            field="volumeMounts",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None,
        max_length=16,
        description="Secrets (kubernetes.io/dockerconfigjson) to pull the image with.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="Node labels the pod must run on."
    )
    affinity: Affinity | None = Field(None, description="Node and pod affinity of the pod.")
    tolerations: list[Toleration] | None = Field(
        None, max_length=32, description="Tolerations of the pod."
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS1123_SUBDOMAIN, description="PriorityClass of the pod."
    )
    labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        None,
        max_length=32,
        description=(
            f"Extra labels on the pod; not fedrun's own ({c.RESERVED_KEY_PREFIX}*, "
            + ", ".join(c.POD_LABELS)
            + ")."
        ),
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        None,
        max_length=32,
        description=f"Extra annotations on the pod; not fedrun's own ({c.RESERVED_KEY_PREFIX}*).",
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=64,
        description=(
            "Extra environment variables of the container, e.g. MLflow credentials from a "
            "Secret (valueFrom.secretKeyRef)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    env_from: list[EnvFromSource] | None = Field(
        None,
        max_length=16,
        description=(
            "Secrets and ConfigMaps whose keys all become variables. fedrun's own variables "
            "and env win over them."
        ),
    )
    volumes: list[Volume] | None = Field(
        None,
        max_length=16,
        description="Extra volumes of the pod.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: list[VolumeMount] | None = Field(
        None,
        max_length=16,
        description="Where the container mounts the extra volumes.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["mountPath"],
        },
    )
    resources: Resources | None = Field(None, description="Resources of the pod's container.")

    @model_validator(mode="after")
    def _unique_keys(self) -> Any:
        # The CRD says the same with x-kubernetes-list-type: map.
        keyed: tuple[tuple[str, Sequence[Any], str], ...] = (
            ("imagePullSecrets", self.image_pull_secrets or [], "name"),
            ("env", self.env or [], "name"),
            ("volumes", self.volumes or [], "name"),
            ("volumeMounts", self.volume_mounts or [], "mount_path"),
        )
        for field, items, key in keyed:
            seen: set[str] = set()
            for i, item in enumerate(items):
                value = getattr(item, key)
                if value in seen:
                    raise RuleError((field, i), f"duplicate {to_camel(key)} {value!r}")
                seen.add(value)
        return self


#: The fields of PodSettings, in Python names (what merge_pod_settings merges).
POD_SETTINGS_FIELDS = tuple(PodSettings.model_fields)


def _keyed_merge(base: list[Any], over: list[Any], key: str) -> list[Any]:
    out = {item[key]: item for item in base}
    for item in over:
        out[item[key]] = item
    return list(out.values())


def merge_pod_settings(*layers: PodSettings | None) -> PodSettings:
    """The pod settings that `layers` give, later layers over earlier ones.

    Maps (nodeSelector, labels, annotations, and resources' requests and limits) merge key
    by key; lists of named things (imagePullSecrets, env, volumes by name, volumeMounts by
    mountPath) merge by that key, a later entry replacing an earlier one in place; the other
    lists (tolerations, envFrom) append, each distinct entry once; scalars (priorityClassName,
    and affinity as a whole) are replaced. None layers are skipped. Only PodSettings' fields
    of each layer are read (a layer may be a ServerSpec or a Hospital).
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        data = layer.model_dump(include=set(POD_SETTINGS_FIELDS), exclude_none=True)
        for name, value in data.items():
            old = merged.get(name)
            if old is None:
                merged[name] = value
            elif name in ("node_selector", "labels", "annotations"):
                merged[name] = {**old, **value}
            elif name == "resources":
                merged[name] = {
                    part: {**old.get(part, {}), **value.get(part, {})}
                    for part in ("requests", "limits")
                    if part in old or part in value
                }
            elif name in ("image_pull_secrets", "env", "volumes"):
                merged[name] = _keyed_merge(old, value, "name")
            elif name == "volume_mounts":
                merged[name] = _keyed_merge(old, value, "mount_path")
            elif name in ("tolerations", "env_from"):
                merged[name] = old + [v for v in value if v not in old]
            else:
                merged[name] = value
    return PodSettings.model_validate(merged)


class PodDefaults(_Spec):
    """Pod settings a cluster gives every run's pods (the chart's `runDefaults`): each run's
    own settings merge over them (see merge_pod_settings)."""

    server: PodSettings | None = Field(None, description="For every run's server pod.")
    hospital: PodSettings | None = Field(None, description="For every hospital pod.")


def parse_pod_defaults(text: str, source: str) -> PodDefaults:
    """PodDefaults from JSON text (the chart's `runDefaults`, as the operator reads them).

    Raises ValueError, naming `source`, with one line per bad field (as :func:`parse_run`).
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid {source}: not JSON: {err}") from None
    try:
        return PodDefaults.model_validate(obj)
    except ValidationError as err:
        problems = "\n".join(f"  {_describe(e)}" for e in err.errors())
        raise ValueError(f"invalid {source}:\n{problems}") from None


#: What every hospital example of a rule starts from: the fields a Hospital needs.
_HOSPITAL = {"name": "a", "dataUri": "/data/a.csv"}


class Hospital(PodSettings):
    """One participating hospital: where its data lives and where its client runs, and its
    pod's settings (PodSettings' fields), which merge over spec.hospitalDefaults."""

    RULES = tuple(
        replace(r, accepts={**_HOSPITAL, **r.accepts}, refuses={**_HOSPITAL, **r.refuses})
        for r in PodSettings.RULES
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    name: str = Field(
        max_length=c.MAX_LABEL_LENGTH,
        description=(
            "Hospital name: a DNS-1123 label (lowercase letters, digits, '-'), unique in the run. "
            "Child objects are named <run>-<name>, which must stay within 63 characters."
        ),
        json_schema_extra={"pattern": DNS1123_LABEL, "minLength": 1},
    )
    data_uri: str = Field(
        max_length=2048,
        description=(
            "The hospital's table: s3://bucket/key (read with the pod's IRSA role), "
            "pvc://claim/path (a file on the PersistentVolumeClaim `claim` in the run's "
            "namespace, mounted read-only into the hospital's pod at /data/<claim>), "
            "file:///absolute/path, an absolute path inside the pod (a mounted volume), or "
            "file:relative/path, which is relative to the working directory of the process "
            "that reads it (meant for `fedrun local`)."
        ),
        json_schema_extra={"pattern": DATA_URI},
    )
    role_arn: str | None = Field(
        None,
        max_length=2048,
        description=(
            "AWS IAM role the hospital's pods assume through IRSA (annotated on its "
            "ServiceAccount). Give each hospital its own role, able to read only its own data."
        ),
        json_schema_extra={"pattern": ROLE_ARN},
    )
    ledger_uri: str | None = Field(
        None,
        max_length=2048,
        description=(
            "Where the hospital keeps its privacy ledger, so a restarted client never starts "
            "again from zero ε. Same forms as dataUri (a pvc:// claim is then mounted "
            "read-write). Default: "
            "s3://<dataUri's bucket>/fedrun-ledger/<namespace>/<run>/<uid>/<hospital>.json "
            "for S3 data, otherwise file:///var/lib/fedrun/ledger/<uid>/<hospital>.json. A "
            "ledger is this run's only (keyed by its uid): one written by another run, or "
            "under other privacy terms, is refused."
        ),
        json_schema_extra={"pattern": DATA_URI},
    )
    budget_ref: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description=(
            "The PrivacyBudget (in the run's namespace) of this hospital's dataset: the run "
            "starts only if its targetEpsilon fits what the budget has left, and every round "
            "it spends is charged to it (docs/privacy.md)."
        ),
    )

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not re.match(DNS1123_LABEL, value):
            raise ValueError(
                f"must be a DNS-1123 label: lowercase letters, digits and '-', starting and "
                f"ending with a letter or digit (got {value!r})"
            )
        return value

    @field_validator("data_uri", "ledger_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("pvc://"):
            claim = value.removeprefix("pvc://").split("/", 1)[0]
            if not re.match(DATA_URI, value) or len(claim) > MAX_PVC_CLAIM:
                raise ValueError(
                    f"must be pvc://claim/path: claim a PersistentVolumeClaim name (a DNS-1123 "
                    f"subdomain of at most {MAX_PVC_CLAIM} characters), path a file inside it "
                    f"with no empty, '.' or '..' part (got {value!r})"
                )
        elif not re.match(DATA_URI, value):
            raise ValueError(
                f"must be s3://bucket/key, pvc://claim/path, file:///absolute/path, "
                f"file:relative/path or /absolute/path (got {value!r})"
            )
        return value

    @field_validator("role_arn")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        if value is not None and not re.match(ROLE_ARN, value):
            raise ValueError(
                f"must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME (got {value!r})"
            )
        return value


class MlflowSpec(_Spec):
    """Experiment tracking with MLflow."""

    tracking_uri: str | None = Field(
        None,
        max_length=2048,
        description=(
            "MLflow tracking URI, e.g. http://mlflow.mlflow:5000. When unset the server logs to "
            "a local sqlite store in its state directory."
        ),
    )
    experiment_name: str = Field(
        "fedrun", min_length=1, max_length=256, description="MLflow experiment name."
    )


class CheckpointVolume(_Spec):
    """A PersistentVolumeClaim the operator creates for the server's checkpoint."""

    size: Annotated[str, Field(pattern=r"^[1-9][0-9]*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")] = Field(
        "1Gi", description="Storage the claim requests: a whole number and a unit, e.g. 1Gi."
    )
    storage_class_name: (
        Annotated[str, Field(min_length=1, max_length=MAX_PVC_CLAIM, pattern=rf"^{PVC_CLAIM}$")]
        | None
    ) = Field(None, description="StorageClass of the claim; unset: the cluster's default.")


class ServerSpec(PodSettings):
    """The run's server (Flower SuperLink and fedrun's run driver) and its pod's settings."""

    RULES = PodSettings.RULES
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    checkpoint_volume: CheckpointVolume | None = Field(
        None,
        description=(
            "Keep the server's per-round checkpoint on a PersistentVolumeClaim "
            "`<run>-checkpoint` that the operator creates (ReadWriteOnce, owned by the run, "
            "deleted with it), so a replaced server Pod (eviction, drain, suspend and "
            "resume) goes on after the last completed round. Unset: the checkpoint is on "
            "the Pod's own volume and survives container restarts only."
        ),
    )

    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP",
        description=(
            "Type of the server's Service. Use NodePort or LoadBalancer only for hospitals "
            "outside the cluster."
        ),
    )


class SecuritySpec(_Spec):
    """Transport security between the run's server and its hospitals."""

    insecure: bool = Field(
        False,
        description=(
            "For local debugging only: run Flower without TLS and without SuperNode "
            "authentication, so anyone who reaches the server's port can read model updates "
            "and join the run. The run then carries the condition Insecure=True. By default "
            "(false) every run gets its own CA, a server certificate and one node key per "
            "hospital, and only this run's hospitals can join."
        ),
    )


def _spec_immutable_while_running() -> dict[str, str]:
    """The root transition rule: while Running only spec.suspend may change.

    Built from the spec model's fields so a new field is covered without a second list.
    """
    parts = []
    for name, field in FederatedRunSpec.model_fields.items():
        alias = field.alias or name
        if alias == "suspend":
            continue
        if field.is_required():
            parts.append(f"self.spec.{alias} == oldSelf.spec.{alias}")
        else:
            parts.append(
                f"(has(self.spec.{alias}) == has(oldSelf.spec.{alias}) && "
                f"(!has(self.spec.{alias}) || self.spec.{alias} == oldSelf.spec.{alias}))"
            )
    unchanged = " && ".join(parts)
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.phase) || "
        f"oldSelf.status.phase != {Phase.RUNNING.value!r} || ({unchanged})",
        "message": "spec is immutable while the run is Running; only spec.suspend may change",
        "fieldPath": ".spec",
    }


def _example_spec(
    min_hospitals: int = 1, names: Sequence[str] = ("a", "b"), run: str | None = None
) -> dict[str, Any]:
    """A small valid spec (camelCase), or with ``run`` a whole FederatedRun named so: the
    examples rules carry to show what they accept and refuse."""
    spec = {
        "rounds": 1,
        "minHospitals": min_hospitals,
        "data": {"preset": "stroke"},
        "hospitals": [{"name": n, "dataUri": f"/data/{n}.csv"} for n in names],
    }
    if run is None:
        return spec
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": run}, "spec": spec}


class FederatedRunSpec(_Spec):
    """What to train, on which hospitals' data, under which privacy budget."""

    RULES = (
        Rule(
            "self.minHospitals <= size(self.hospitals)",
            "minHospitals must not exceed the number of hospitals",
            lambda s: s.min_hospitals <= len(s.hospitals),
            accepts=_example_spec(min_hospitals=2),
            refuses=_example_spec(min_hospitals=3),
            field="minHospitals",
        ),
        Rule(
            "self.all(h, self.exists_one(g, g.name == h.name))",
            "hospital names must be unique",
            lambda s: len({h.name for h in s.hospitals}) == len(s.hospitals),
            accepts=_example_spec(names=("a", "b")),
            refuses=_example_spec(names=("a", "a")),
            scope="hospitals",
        ),
        Rule(
            "!self.hospitals.exists(h, has(h.budgetRef)) || !has(self.privacy) || "
            "((!has(self.privacy.enabled) || self.privacy.enabled) && "
            "(!has(self.privacy.accountant) || self.privacy.accountant == 'rdp'))",
            "a hospital's budgetRef needs privacy.enabled and the rdp accountant: a budget "
            "composes RDP histories, and a run without DP would spend without bound",
            lambda s: (
                not any(h.budget_ref for h in s.hospitals)
                or (s.privacy.enabled and s.privacy.accountant == "rdp")
            ),
            accepts={
                **_example_spec(),
                "hospitals": [{"name": "a", "dataUri": "/d/a.csv", "budgetRef": "a-stroke"}],
            },
            refuses={
                **_example_spec(),
                "hospitals": [{"name": "a", "dataUri": "/d/a.csv", "budgetRef": "a-stroke"}],
                "privacy": {"accountant": "prv"},
            },
            field="privacy",
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    rounds: int = Field(ge=1, le=1000, description="Number of federated rounds.")
    min_hospitals: int = Field(
        1,
        ge=1,
        le=50,
        description=(
            "Fewest hospitals a round may proceed with; the run waits for this many to "
            "connect before it starts. At most the number of hospitals."
        ),
    )
    round_timeout_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description=(
            "Per round: how long the server waits for the hospitals' replies before it "
            "aggregates what it has (the round fails if fewer than minHospitals replied)."
        ),
    )
    strategy: StrategySpec = Field(
        default_factory=StrategySpec,
        description="How updates are aggregated.",
        json_schema_extra={"default": {}},
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="Model and local training.",
        json_schema_extra={"default": {}},
    )
    data: DataSpec = Field(description="Shape of the hospitals' tables.")
    privacy: PrivacySpec = Field(
        default_factory=PrivacySpec,
        description="Differential privacy; on by default.",
        json_schema_extra={"default": {}},
    )
    hospitals: list[Hospital] = Field(
        min_length=1,
        max_length=50,
        description="The participating hospitals (1 to 50), each with a unique name.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **rules_schema(RULES, scope="hospitals"),
        },
    )
    hospital_defaults: PodSettings | None = Field(
        None,
        description=(
            "Pod settings every hospital's pod gets; each hospital's own merge over them "
            "(maps key by key, env, volumes and imagePullSecrets by name, volumeMounts by "
            "mountPath, tolerations and envFrom appended, other fields replaced)."
        ),
    )
    mlflow: MlflowSpec = Field(
        default_factory=MlflowSpec,
        description="Experiment tracking.",
        json_schema_extra={"default": {}},
    )
    image: str = Field(
        c.DEFAULT_IMAGE,
        min_length=1,
        max_length=1024,
        description="Container image of the server and hospital pods (fedrun's trainer image).",
    )
    server: ServerSpec = Field(
        default_factory=ServerSpec,
        description="The run's server pod.",
        json_schema_extra={"default": {}},
    )
    security: SecuritySpec | None = Field(
        None,
        description=(
            "Transport security. Unset means the secure default: TLS with a per-run CA and "
            "SuperNode authentication."
        ),
    )
    suspend: bool = Field(
        False,
        description=(
            "Pause the run: the server scales to zero and hospital Jobs are suspended. "
            "The only field that may change while the run is Running."
        ),
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the run when it has been running longer than this many seconds.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the run (and its children) this many seconds after it finished.",
    )


# --------------------------------------------------------------------------- status


class Condition(_Status):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready or Suspended.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(
        description="When the condition last changed status (RFC 3339)."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the condition was set for."
    )


class RoundStatus(_Status):
    """Round counter."""

    current: int = Field(0, ge=0, description="Last round completed.")
    total: int = Field(0, ge=0, description="Rounds requested (spec.rounds).")


#: An accountant history [[σ, q, steps], ...] (Opacus' RDPAccountant.history) as stored.
History = list[Annotated[list[float], Field(min_length=3, max_length=3)]]


class HospitalPrivacyStatus(_Status):
    """Privacy spent by one hospital."""

    name: str = Field(description="Hospital name.")
    epsilon: float = Field(0.0, ge=0, description="ε spent so far.")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Noise multiplier σ of the latest round (full precision), 0 before any.",
    )
    sample_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Poisson sample rate q of one DP-SGD step in the latest round (Opacus: "
            "1 / batches per epoch; full precision), 0 before any."
        ),
    )
    epsilon_operator: float | None = Field(
        None,
        ge=0,
        description=(
            "ε as the operator computes it itself (RDP): the larger of its figure from the "
            "reported history and its figure at the σ and q the spec implies for the "
            "hospital's rows, over the same steps."
        ),
    )
    num_train: int | None = Field(
        None,
        ge=0,
        description=(
            "Training rows the hospital reported (a count): the operator derives the σ and "
            "q the spec implies from it."
        ),
    )
    ledger_steps: int | None = Field(
        None,
        ge=0,
        description=(
            "DP steps the hospital's own ledger holds (every server lineage): the operator "
            "counts at least these, at the spec's σ and q, where no server recorded them."
        ),
    )
    planned_noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="σ the spec implies for this hospital's rows (the operator's calibration).",
    )
    planned_sample_rate: float | None = Field(
        None, ge=0, le=1, description="q the spec implies for this hospital's rows."
    )
    accounting_mismatch: str | None = Field(
        None,
        max_length=1024,
        description=(
            "Set when the (σ, q, steps per round) the server reports differ from what the "
            "spec implies; the operator then enforces the larger ε."
        ),
    )
    steps: int = Field(0, ge=0, description="DP-SGD steps taken so far.")
    steps_per_round: int | None = Field(
        None, ge=0, description="DP-SGD steps one round takes (local epochs × batches)."
    )
    history: History = Field(
        default_factory=list,
        description=(
            "The accountant history [[σ, q, steps], ...] (Opacus' RDPAccountant.history), one "
            "entry per distinct (σ, q): ε can be recomputed from it exactly."
        ),
    )


class CarriedPrivacy(_Status):
    """One hospital's accountant history from before a resume."""

    name: str = Field(description="Hospital name.")
    history: History = Field(
        default_factory=list, description="[[σ, q, steps], ...] spent before the resume."
    )
    lineage: str | None = Field(
        None,
        description=(
            "The server lineage that spent it (a server resumed from its checkpoint keeps "
            "its lineage; one that started over has a new one). Absent: from before lineages."
        ),
    )


class PrivacyStatus(_Status):
    """Privacy budget of the run."""

    epsilon_spent: float = Field(
        0.0, ge=0, description="ε spent: the maximum over hospitals, accounted independently."
    )
    target_epsilon: float | None = Field(None, description="spec.privacy.targetEpsilon.")
    delta: float | None = Field(None, description="spec.privacy.delta.")
    hospitals: list[HospitalPrivacyStatus] = Field(
        default_factory=list, description="ε per hospital."
    )
    carried: list[CarriedPrivacy] = Field(
        default_factory=list,
        description=(
            "What earlier server lineages spent (kept across restarts, suspend and resume): "
            "it counts against the budget together with what the current server reports."
        ),
    )
    lineage: str | None = Field(
        None,
        description=(
            "The lineage of the server whose history hospitals[].history shows: the chain "
            "of server incarnations that resumed one another from the run's checkpoint."
        ),
    )


class MetricsStatus(_Status):
    """Federated evaluation of the latest round's global model on the hospitals' test splits."""

    round: int | None = Field(None, ge=0, description="Round these metrics belong to.")
    loss: float | None = Field(
        None, description="Mean of the hospitals' test losses, weighted by their test rows."
    )
    auroc: float | None = Field(
        None,
        description=(
            "Mean of the hospitals' own test AUROCs, weighted by their test rows (pooledAuroc "
            "is the AUROC of all test rows together)."
        ),
    )
    pooled_auroc: float | None = Field(
        None,
        description=(
            "AUROC of all hospitals' test rows together, computed by the server from the "
            "per-class counts of their test scores in fixed bins (no row or score leaves a "
            "hospital; scores in one bin count as ties)."
        ),
    )
    auprc: float | None = Field(
        None, description="Mean of the hospitals' own test AUPRCs, weighted by their test rows."
    )
    accuracy: float | None = Field(
        None, description="Accuracy at threshold 0.5, weighted by the hospitals' test rows."
    )


class ColumnDataStatus(_Status):
    """What one column's missing-value and unknown-category policies did at a hospital."""

    name: str = Field(description="The column (the target or a feature of the spec).")
    missing: int = Field(0, ge=0, description="Missing cells.")
    imputed: int = Field(0, ge=0, description="Missing cells filled (missing: impute).")
    dropped: int = Field(
        0, ge=0, description="Rows not used because this column was missing (dropRow)."
    )
    other: int = Field(0, ge=0, description="Cells outside the categories (unknown: other).")


class HospitalDataStatus(_Status):
    """What a hospital's table gave, as the hospital reported it: counts only."""

    rows: int = Field(ge=0, description="Data rows read.")
    used: int = Field(ge=0, description="Rows used (training and test split together).")
    dropped: int = Field(ge=0, description="Rows dropped by dropRow policies.")
    columns: list[ColumnDataStatus] = Field(
        default_factory=list,
        max_length=201,
        description="Columns with a missing or unknown cell, and what was done.",
    )


class HospitalStatus(_Status):
    """One hospital's client."""

    name: str = Field(description="Hospital name.")
    job_name: str | None = Field(None, description="The hospital's Job.")
    state: HospitalState = Field(
        HospitalState.PENDING,
        description=(
            "Pending, Connected, Training, Done, Failed, or NotJoined (the run ended before "
            "this hospital ever connected)."
        ),
    )
    restarts: int = Field(0, ge=0, description="Failed pods or container restarts so far.")
    epsilon: float | None = Field(None, ge=0, description="ε spent by this hospital.")
    message: str | None = Field(None, description="Last error or note.")
    last_failure: str | None = Field(
        None,
        max_length=1024,
        description=(
            "The termination message of the hospital's container the last time it failed "
            "(kept after the Job controller deleted the Pod)."
        ),
    )
    data: HospitalDataStatus | None = Field(
        None, description="Rows read, used and dropped, and cells imputed, per column."
    )


class RunBudgetStatus(_Status):
    """A hospital's PrivacyBudget as this run stands with it (``budgetRef``)."""

    hospital: str = Field(max_length=63, description="The hospital that names the budget.")
    name: str = Field(max_length=253, description="The PrivacyBudget's name.")
    state: Literal["Waiting", "Reserved", "Released", "Unsettled"] = Field(
        description=(
            "Waiting: not admitted yet (BudgetUnavailable); Reserved: ε held for the run; "
            "Released: the run ended and gave back what it did not spend; Unsettled: it "
            "ended without a final history from its server, and its whole reservation "
            "stays spent."
        )
    )
    reserved: float = Field(0.0, ge=0, description="ε reserved (the run's targetEpsilon).")
    delta: float | None = Field(None, gt=0, lt=1, description="The run's δ when it was admitted.")


class FederatedRunStatus(_Status):
    """Observed state of a run, written only by the operator (or `fedrun local`)."""

    phase: Phase = Field(
        Phase.PENDING,
        description="Pending, Running, Succeeded, Failed, BudgetExhausted or Suspended.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation this status describes."
    )
    start_time: datetime | None = Field(None, description="When the run started (RFC 3339).")
    completion_time: datetime | None = Field(
        None, description="When the run reached a final phase (RFC 3339)."
    )
    round: RoundStatus | None = Field(None, description="Round counter.")
    progress: str | None = Field(None, description="Rounds done, e.g. 3/5.")
    privacy: PrivacyStatus | None = Field(None, description="Privacy budget spent.")
    metrics: MetricsStatus | None = Field(None, description="Latest round's metrics.")
    hospitals: list[HospitalStatus] = Field(default_factory=list, description="Per-hospital state.")
    mlflow_run_id: str | None = Field(None, description="MLflow run holding params and metrics.")
    budgets: list[RunBudgetStatus] = Field(
        default_factory=list, max_length=64, description="The PrivacyBudgets the run charges."
    )
    secret_set: str | None = Field(
        None,
        max_length=16,
        pattern=r"^[a-z0-9]*$",
        description=(
            "The run's current set of TLS and node-key Secrets: empty for the first "
            "(<run>-server-tls, <run>-<hospital>-auth), a suffix of the names for a set made "
            "later from new material (whenever the server had to be created again)."
        ),
    )
    message: str | None = Field(None, description="Human-readable summary of the phase.")


# --------------------------------------------------------------------------- resource


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata fedrun reads; other fields are kept as they are."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, description="Run name.")
    namespace: str = Field(c.DEFAULT_NAMESPACE, min_length=1, description="Run namespace.")
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FederatedRun(BaseModel):
    """A federated training run across hospitals."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    #: Root rules: they see metadata.name as well as the spec (see `_Spec.RULES`).
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            f"self.metadata.name.matches('{DNS1035_LABEL}')",
            "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', "
            "starting with a letter)",
            lambda r: re.match(DNS1035_LABEL, r.metadata.name) is not None,
            accepts=_example_spec(run="stroke-1"),
            refuses=_example_spec(run="1-stroke"),
            field="metadata.name",
            cel_field=False,
        ),
        Rule(
            f"size(self.metadata.name) <= {MAX_RUN_NAME}",
            f"metadata.name must be at most {MAX_RUN_NAME} characters (children are named "
            "<run>-server)",
            lambda r: len(r.metadata.name) <= MAX_RUN_NAME,
            accepts=_example_spec(run="r" * MAX_RUN_NAME, names=("a",)),
            refuses=_example_spec(run="r" * (MAX_RUN_NAME + 1), names=("a",)),
            field="metadata.name",
            cel_field=False,
        ),
        Rule(
            f"self.spec.hospitals.all(h, size(self.metadata.name) + size(h.name) "
            f"<= {MAX_RUN_PLUS_HOSPITAL})",
            "<run>-<hospital> must be at most 63 characters: shorten the run or hospital names",
            lambda r: all(
                len(r.metadata.name) + len(h.name) <= MAX_RUN_PLUS_HOSPITAL
                for h in r.spec.hospitals
            ),
            accepts=_example_spec(run="r" * 50, names=("a" * 12,)),
            refuses=_example_spec(run="r" * 50, names=("a" * 13,)),
            field="spec.hospitals",
        ),
    )

    @model_validator(mode="after")
    def _rules_hold(self) -> FederatedRun:
        for rule in self.RULES:
            if not rule.check(self):
                raise RuleError(rule.loc(), rule.message)
        return self

    api_version: Literal["fedrun.io/v1alpha1"] = "fedrun.io/v1alpha1"
    kind: Literal["FederatedRun"] = "FederatedRun"
    metadata: ObjectMeta
    spec: FederatedRunSpec
    status: FederatedRunStatus | None = None

    @property
    def name(self) -> str:
        """The run's name."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """The run's namespace."""
        return self.metadata.namespace

    def hospital(self, name: str) -> Hospital:
        """The hospital called `name`; KeyError when the run has none."""
        for hospital in self.spec.hospitals:
            if hospital.name == name:
                return hospital
        raise KeyError(f"run {self.name!r} has no hospital {name!r}")

    def spec_dict(self) -> dict[str, Any]:
        """The spec as it appears in YAML (camelCase, unset optional fields left out)."""
        return self.spec.model_dump(mode="json", by_alias=True, exclude_none=True)


# Root-level CEL rules: the root rules, and the transition rule that compares a Running
# run's spec with its old self. The models have no old self to compare with: the operator
# refuses such a change itself (reason SpecChangeRefused) should one get past the CRD.
ROOT_VALIDATIONS: list[dict[str, str]] = [
    *(rule.entry() for rule in FederatedRun.RULES),
    _spec_immutable_while_running(),
]


# --------------------------------------------------------------------------- loading


class SpecError(ValueError):
    """A FederatedRun that cannot be used; `problems` holds one line per bad field.

    Its text is the whole message, ``invalid FederatedRun in FILE:`` and one indented line
    per problem, ready to print after the program's name.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"invalid FederatedRun in {source}" if source else "invalid FederatedRun"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class SpecUnreadableError(SpecError):
    """The file that should hold a FederatedRun cannot be read at all (missing, a folder,
    no permission): nothing in it was judged, so its text says "cannot read", not "invalid"."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__([f"(document): cannot read: {reason}"], source)
        self.args = (f"cannot read {source}: {reason}",)

    def __str__(self) -> str:
        return str(self.args[0])


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where (line and column, from 1) and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML at {where}{problem}" + (f" ({context})" if context else "")


def _all_field_names() -> set[str]:
    models: list[type[BaseModel]] = [
        FederatedRun,
        ObjectMeta,
        FederatedRunSpec,
        StrategySpec,
        TrainingSpec,
        DataSpec,
        Feature,
        PrivacySpec,
        Hospital,
        Resources,
        Toleration,
        PodSettings,
        Affinity,
        NodeAffinity,
        NodeSelector,
        NodeSelectorTerm,
        NodeSelectorRequirement,
        PreferredSchedulingTerm,
        PodAffinity,
        PodAffinityTerm,
        WeightedPodAffinityTerm,
        LabelSelector,
        LabelSelectorRequirement,
        Volume,
        VolumeMount,
        SecretVolume,
        ConfigMapVolume,
        EmptyDirVolume,
        PersistentVolumeClaimVolume,
        CsiVolume,
        KeyToPath,
        EnvVar,
        EnvVarSource,
        KeySelector,
        EnvFromSource,
        ObjectRef,
        LocalObjectReference,
        MlflowSpec,
        ServerSpec,
        SecuritySpec,
    ]
    return {field.alias or name for m in models for name, field in m.model_fields.items()}


_FIELD_NAMES = frozenset(_all_field_names())
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _yaml_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(document)"


def _describe(error: Mapping[str, Any]) -> str:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    kind = error["type"]
    exc = error.get("ctx", {}).get("error")
    if isinstance(exc, RuleError):
        return f"{_yaml_path(loc + exc.loc)}: {exc}"
    if kind == "extra_forbidden":
        text = "unknown field"
        if loc and isinstance(loc[-1], str):
            close = difflib.get_close_matches(loc[-1], _FIELD_NAMES, n=1, cutoff=0.75)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        return f"{_yaml_path(loc)}: {text}"
    if kind == "missing":
        return f"{_yaml_path(loc)}: required field is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    message = message.replace("Input should be", "must be").replace("Input", "value")
    value = error.get("input")
    if (
        kind != "value_error"
        and value is not None
        and not isinstance(value, dict | list)
        and "got" not in message
    ):
        message += f" (got {value!r})"
    return f"{_yaml_path(loc)}: {message}"


def parse_run(obj: object, source: str | None = None) -> FederatedRun:
    """Validate a FederatedRun given as a mapping (a parsed YAML document or an API object).

    Raises
    ------
    SpecError
        With one line per bad field, each starting with its YAML path.
    """
    if not isinstance(obj, Mapping):
        raise SpecError([f"(document): must be a mapping, got {type(obj).__name__}"], source)
    try:
        return FederatedRun.model_validate(dict(obj))
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise SpecError(problems, source) from None


def load_run(path_or_text: str | Path) -> FederatedRun:
    """Load a FederatedRun from a YAML file (a Path, or a str naming an existing file) or text.

    Raises
    ------
    SpecError
        When the file cannot be read, the YAML does not parse or the run is invalid.
    """
    source: str | None = None
    if isinstance(path_or_text, Path) or (
        "\n" not in path_or_text
        and (path_or_text.endswith((".yaml", ".yml", ".json")) or Path(path_or_text).is_file())
    ):
        source = str(path_or_text)
        try:
            text = Path(path_or_text).read_text(encoding="utf-8")
        except OSError as err:
            raise SpecUnreadableError(source, err.strerror or str(err)) from None
        except UnicodeDecodeError:
            raise SpecUnreadableError(source, "not UTF-8 text") from None
    else:
        text = path_or_text
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError([f"(document): {yaml_problem(err)}"], source) from None
    if len(docs) != 1:
        raise SpecError([f"(document): expected one YAML document, found {len(docs)}"], source)
    return parse_run(docs[0], source)


# --------------------------------------------------------------------------- defaults


def ledger_uri(run: FederatedRun, hospital: Hospital | str) -> str:
    """Where `hospital` keeps its privacy ledger.

    The hospital's own `ledgerUri` when set; for S3 data the data bucket under
    `fedrun-ledger/<namespace>/<run>/<uid>/<hospital>.json`; otherwise the pod's state
    directory, `file:///var/lib/fedrun/ledger/<uid>/<hospital>.json` (the local runner maps
    /var/lib/fedrun to a local directory). `<uid>/` is left out for a run without a uid
    (one rendered by `fedrun render`, never applied).
    """
    h = run.hospital(hospital) if isinstance(hospital, str) else hospital
    if h.ledger_uri is not None:
        return h.ledger_uri
    # Keyed by the run's uid: a run deleted and created again under the same name is
    # another run and must not find the first one's ledger.
    key = f"{run.metadata.uid}/{h.name}" if run.metadata.uid else h.name
    if h.data_uri.startswith("s3://"):
        bucket = h.data_uri.removeprefix("s3://").split("/", 1)[0]
        return f"s3://{bucket}/fedrun-ledger/{run.namespace}/{run.name}/{key}.json"
    return f"file://{c.STATE_DIR}/ledger/{key}.json"


# --------------------------------------------------------------------------- PVC data


def pvc_claim(uri: str | None) -> str | None:
    """The claim a `pvc://<claim>/<path>` URI names; None for any other URI (or None)."""
    if uri is None or not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").split("/", 1)[0]


def pvc_mount_path(claim: str) -> str:
    """Where a hospital's pod mounts the PersistentVolumeClaim `claim`: `/data/<claim>`."""
    return f"{c.PVC_MOUNT_ROOT}/{claim}"


def pvc_pod_path(uri: str) -> str:
    """The path inside the hospital's pod of a `pvc://<claim>/<path>` URI.

    `pvc://fedrun-demo-data/hospital-a.csv` is `/data/fedrun-demo-data/hospital-a.csv`,
    where rendering mounts the claim. Raises ValueError for any other URI.
    """
    claim = pvc_claim(uri)
    if claim is None:
        raise ValueError(f"not a pvc:// URI: {uri!r}")
    return f"{pvc_mount_path(claim)}/{uri.removeprefix('pvc://').split('/', 1)[1]}"
