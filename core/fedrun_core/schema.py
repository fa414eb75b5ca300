"""A run's table schema: the target and features every hospital encodes, presets resolved.

``data.preset: stroke`` is shorthand for a target and a feature list like any other
(:data:`STROKE_FEATURES`), so the trainer, ``fedrun check`` and the docs read one kind of
schema. The stroke preset is the Kaggle "healthcare-dataset-stroke-data" table: ``id`` is
not a feature; ``bmi`` written as ``N/A`` is imputed with the agreed 28.1 kg/m² (close to
the adult median) and flagged by ``bmi_missing``, because a missing BMI is itself
associated with stroke in that data; the ranges are clinically plausible bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedrun_core.api import DataSpec, Feature
from fedrun_core.values import missing_markers

__all__ = [
    "COUNT_KINDS",
    "MAX_ROWS",
    "STROKE_BMI_IMPUTE",
    "STROKE_COLUMNS",
    "STROKE_FEATURES",
    "STROKE_TARGET",
    "ColumnCounts",
    "DataCounts",
    "TableSchema",
    "table_schema",
]

STROKE_TARGET = "stroke"
#: Agreed BMI for a missing ``bmi`` in the stroke preset (kg/m²).
STROKE_BMI_IMPUTE = 28.1
#: The stroke table's columns, in the order of the public file.
STROKE_COLUMNS = (
    "id",
    "gender",
    "age",
    "hypertension",
    "heart_disease",
    "ever_married",
    "work_type",
    "Residence_type",
    "avg_glucose_level",
    "bmi",
    "smoking_status",
    "stroke",
)


def _categorical(name: str, *categories: str) -> Feature:
    return Feature(name=name, type="categorical", categories=list(categories))


#: The stroke preset's features, in model-input order.
STROKE_FEATURES: tuple[Feature, ...] = (
    Feature(name="age", type="numeric", min=0.0, max=100.0),
    Feature(name="avg_glucose_level", type="numeric", min=50.0, max=300.0),
    Feature(
        name="bmi",
        type="numeric",
        min=10.0,
        max=60.0,
        missing="impute",
        fill=STROKE_BMI_IMPUTE,
        indicator=True,
    ),
    Feature(name="hypertension", type="boolean"),
    Feature(name="heart_disease", type="boolean"),
    _categorical("gender", "Female", "Male", "Other"),
    _categorical("ever_married", "No", "Yes"),
    _categorical("work_type", "Govt_job", "Never_worked", "Private", "Self-employed", "children"),
    _categorical("Residence_type", "Rural", "Urban"),
    _categorical("smoking_status", "Unknown", "formerly smoked", "never smoked", "smokes"),
)


@dataclass(frozen=True)
class TableSchema:
    """What every hospital reads from its table, with the preset (if any) resolved."""

    target: str
    features: tuple[Feature, ...]
    #: Missing markers as compared (trimmed, case-folded, always with "").
    missing: frozenset[str]
    target_missing: str
    min_rows_per_class: int

    @property
    def columns(self) -> list[str]:
        """The columns a table must have: the target, then every feature."""
        return [self.target, *(f.name for f in self.features)]


def table_schema(data: DataSpec) -> TableSchema:
    """The schema ``data`` describes. Raises ``ValueError`` only for a ``data`` the API's
    rules refuse (an unknown preset, no target or features without one)."""
    if data.preset is not None:
        if data.preset != "stroke":
            raise ValueError(f"unknown data preset {data.preset!r}")
        # targetColumn, when given, names the preset's target column (the spec says so).
        target, features = data.target_column or STROKE_TARGET, STROKE_FEATURES
    else:
        if not data.target_column or not data.features:
            raise ValueError("data.targetColumn and data.features are required without a preset")
        target, features = data.target_column, tuple(data.features)
    return TableSchema(
        target=target,
        features=features,
        missing=missing_markers(data.missing_values),
        target_missing=data.target_missing,
        min_rows_per_class=data.min_rows_per_class,
    )


# --------------------------------------------------------------------------- counts

#: The most rows a hospital's counts may claim (the operator's bound on a server's report).
MAX_ROWS = 10**10
#: The kinds of per-column count a hospital reports.
COUNT_KINDS = ("missing", "imputed", "dropped", "other")
_PREFIX = "data:"


@dataclass(frozen=True)
class ColumnCounts:
    """What one column's policies did at a hospital: counts of cells, never values.

    ``missing``: cells that were missing; ``imputed``: of those, the ones filled in rows
    that were used; ``dropped``: rows not used because this column was missing (a row can
    be dropped for several columns); ``other``: cells outside the categories encoded as
    ``(other)`` in rows that were used.
    """

    name: str
    missing: int = 0
    imputed: int = 0
    dropped: int = 0
    other: int = 0


@dataclass(frozen=True)
class DataCounts:
    """What a hospital's table gave: rows read, used and dropped, and per-column counts.

    Counts only, so they may leave the hospital (the server's status, ``fedrun local``'s
    table). ``columns`` lists only columns with a count above zero, target first.
    """

    rows: int
    used: int
    dropped: int
    columns: tuple[ColumnCounts, ...] = ()

    def to_metrics(self) -> dict[str, float]:
        """Flat ``{key: count}`` for a Flower ``MetricRecord`` (see :meth:`from_metrics`)."""
        out = {
            f"{_PREFIX}rows": float(self.rows),
            f"{_PREFIX}used": float(self.used),
            f"{_PREFIX}dropped": float(self.dropped),
        }
        for column in self.columns:
            for kind in COUNT_KINDS:
                value = getattr(column, kind)
                if value:
                    out[f"{_PREFIX}{kind}:{column.name}"] = float(value)
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], columns: list[str]) -> DataCounts | None:
        """The counts a hospital sent, or None when it sent none or they do not add up.

        Read as untrusted: only the schema's ``columns`` are kept, and every count must be
        a whole number between 0 and the rows read.
        """
        try:
            rows, used, dropped = (metrics[f"{_PREFIX}{k}"] for k in ("rows", "used", "dropped"))
        except KeyError:
            return None

        def whole(value: float, limit: float) -> int | None:
            ok = float(value).is_integer() and 0 <= value <= limit
            return int(value) if ok else None

        n = whole(rows, MAX_ROWS)
        if n is None or whole(used, n) is None or whole(dropped, n) is None or used + dropped != n:
            return None
        per: dict[str, dict[str, int]] = {}
        for key, value in metrics.items():
            parts = key.split(":", 2)
            if len(parts) != 3 or parts[0] != _PREFIX[:-1] or parts[1] not in COUNT_KINDS:
                continue
            count = whole(value, n)
            if parts[2] not in columns or count is None:
                return None
            per.setdefault(parts[2], {})[parts[1]] = count
        ordered = tuple(ColumnCounts(name, **per[name]) for name in columns if name in per)
        return cls(int(rows), int(used), int(dropped), ordered)

    def to_status(self) -> dict[str, object]:
        """The status's ``hospitals[].data`` (camelCase, JSON-ready)."""
        return {
            "rows": self.rows,
            "used": self.used,
            "dropped": self.dropped,
            "columns": [
                {"name": c.name, **{k: getattr(c, k) for k in COUNT_KINDS}} for c in self.columns
            ],
        }
