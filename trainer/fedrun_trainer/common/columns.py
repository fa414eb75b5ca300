"""Read one column of a hospital's table as the schema says: values, gaps and bad cells.

Each reader returns a :class:`Column`: a number per row (the value, a boolean as 0/1, or a
category's index) and three masks: which cells are missing (per
:mod:`fedrun_core.values`), which cannot be read (``bad``, with ``kind`` naming the
problem) and, for a categorical feature with ``unknown: other``, which fall outside the
categories. Nothing here decides what a gap means: the feature's policy is applied by
:mod:`fedrun_trainer.common.data`. Work is per distinct value, not per row, so a
million-row column of a few codes costs a few dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedrun_core.api import Feature
from fedrun_core.values import as_boolean, as_number, category_key

__all__ = ["Column", "cells", "read_feature", "read_target"]

BoolArray = npt.NDArray[np.bool_]
FloatArray64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Column:
    """A column as read: ``values`` (NaN where missing, bad or other) and its masks."""

    values: FloatArray64
    missing: BoolArray
    bad: BoolArray
    kind: str
    other: BoolArray | None = None


def cells(raw: pd.Series) -> tuple[pd.Series, BoolArray]:
    """Each cell as trimmed text, and where the reader had no value at all (Parquet nulls)."""
    absent = raw.isna().to_numpy(dtype=bool)
    # As objects first: a Parquet column of a pandas type (category, boolean, Int64) takes
    # no "" in its gaps.
    text = raw.astype(object).where(~absent, "").astype(str).str.strip()
    return text, absent


def _by_value(
    raw: pd.Series, markers: frozenset[str], read: Callable[[str], float | None]
) -> tuple[FloatArray64, BoolArray, BoolArray]:
    """``read`` applied once per distinct cell: (values, missing, unreadable)."""
    text, absent = cells(raw)
    table: dict[str, float] = {}
    missing_words: set[str] = set()
    for cell in pd.unique(text):
        value = read(cell)
        if value is not None:
            table[cell] = value
        elif cell.casefold() in markers:
            missing_words.add(cell)
    values = text.map(table).to_numpy(dtype=np.float64, na_value=np.nan)
    missing = absent | text.isin(missing_words).to_numpy(dtype=bool)
    bad = np.isnan(values) & ~missing
    return values, missing, bad


def _numeric(raw: pd.Series, markers: frozenset[str]) -> Column:
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        # A marker written as a number (-999) is missing here as it is in a CSV cell.
        numbers = [n for n in (as_number(m) for m in markers) if n is not None]
        missing = np.isnan(values) | np.isin(values, numbers)
        bad = np.isinf(values)
        return Column(np.where(bad, np.nan, values), missing, bad, "not a number")
    text, absent = cells(raw)
    missing = absent | text.str.casefold().isin(markers).to_numpy(dtype=bool)
    values = pd.to_numeric(text.where(~missing, None), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    bad = (np.isnan(values) & ~missing) | np.isinf(values)
    return Column(np.where(bad, np.nan, values), missing, bad, "not a number")


def _boolean(raw: pd.Series, markers: frozenset[str]) -> Column:
    def read(cell: str) -> float | None:
        value = as_boolean(cell)
        return None if value is None else float(value)

    values, missing, bad = _by_value(raw, markers, read)
    return Column(values, missing, bad, "not a boolean (yes/no, true/false, 1/0)")


def _categorical(raw: pd.Series, feature: Feature, markers: frozenset[str]) -> Column:
    categories = feature.categories or []
    index = {category_key(c): float(i) for i, c in enumerate(categories)}
    for alias, target in (feature.aliases or {}).items():
        index.setdefault(category_key(alias), float(categories.index(target)))
    other_code = -1.0

    def read(cell: str) -> float | None:
        code = index.get(category_key(cell))
        if code is not None:
            return code
        if cell.casefold() in markers:
            return None
        return other_code if feature.unknown == "other" else None

    values, missing, bad = _by_value(raw, markers, read)
    other = values == other_code
    values = np.where(other, np.nan, values)
    return Column(values, missing, bad, "unknown category", other=other)


def read_feature(raw: pd.Series, feature: Feature, markers: frozenset[str]) -> Column:
    """``raw`` read as ``feature`` says (numeric, boolean or categorical)."""
    if feature.type == "numeric":
        return _numeric(raw, markers)
    if feature.type == "boolean":
        return _boolean(raw, markers)
    return _categorical(raw, feature, markers)


def read_target(raw: pd.Series, markers: frozenset[str]) -> Column:
    """The binary target: 0/1 (or yes/no, true/false), ``bad`` where it is anything else."""
    column = _boolean(raw, markers)
    return Column(column.values, column.missing, column.bad, "not binary")
