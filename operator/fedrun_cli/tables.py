"""``fedrun schema infer`` and ``fedrun check``: a hospital's own table, read where it lives.

``schema infer FILE`` suggests a ``data:`` block (features, types, ranges, categories and a
missing-value policy) for the hospitals to review and agree on; ``check RUN --hospital H``
is the preflight a hospital runs on its own file before joining: what the run will use,
drop and impute, and every problem with its rows and columns. Both read the file here and
print to this terminal only: nothing leaves the machine, so unlike the run's status they
may show the values they found.

Suggested ranges are the column's own minimum and maximum widened to round numbers (an
exact extreme is one patient's value, and a spec is shared); a suggested fill is the
column's median rounded to two significant figures. Both are starting points for the
hospitals to replace with agreed clinical values. A categorical feature is suggested
with ``unknown: other``: one file seldom holds every category the others will have.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedrun_core.api import DataSpec, Feature, load_run
from fedrun_core.values import as_boolean, as_number, category_key, missing_markers
from fedrun_trainer.common.columns import cells

__all__ = ["Suggestion", "check_files", "infer_schema", "print_schema", "render_data_block"]

#: More distinct text values than this: free text or an identifier, not a feature.
MAX_CATEGORIES = 50
#: The longest category the spec takes.
MAX_CATEGORY_CHARS = 128
#: Whole numbers with at most this many distinct values are suggested as categories.
MAX_CODES = 10
#: Below this share of missing cells, rows with a gap are suggested to be dropped.
DROP_BELOW = 0.02
#: Rows listed per problem by ``fedrun check`` (the count is always complete).
ROWS_SHOWN = 10


@dataclass(frozen=True)
class Suggestion:
    """What ``schema infer`` makes of one column: a feature (None: left out) and why."""

    column: str
    feature: Feature | None
    note: str


def _round_out(lo: float, hi: float) -> tuple[float, float] | None:
    """``[lo, hi]`` widened to round numbers at the scale of its width (None when the
    numbers are too large to have a range)."""
    try:
        width = hi - lo if hi > lo else max(abs(hi), 1.0)
        step = 10.0 ** math.floor(math.log10(width))
        low, high = math.floor(lo / step) * step, math.ceil(hi / step) * step
    except (OverflowError, ValueError):
        return None
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if high <= low:
        high = low + step
    short = float(f"{low:.6g}"), float(f"{high:.6g}")
    return short if short[0] < short[1] else (low, high)


def _two_figures(value: float) -> float:
    return float(f"{value:.2g}")


def _policy(share: float) -> str:
    return "dropRow" if share < DROP_BELOW else "impute"


def _suggest(column: str, raw: pd.Series, markers: frozenset[str]) -> Suggestion:
    text, _ = cells(raw)
    missing = text.str.casefold().isin(markers)
    present = text[~missing]
    share = float(missing.mean()) if len(text) else 0.0
    gaps = f"{int(missing.sum())} missing ({share:.0%})" if missing.any() else "no gaps"
    if present.empty:
        return Suggestion(column, None, "left out: every cell is missing")
    distinct = pd.unique(present)
    numbers = [as_number(v) for v in distinct]
    booleans = [as_boolean(v) for v in distinct]
    policy = _policy(share) if missing.any() else "error"
    extra: dict[str, Any] = {"missing": policy}
    if all(b is not None for b in booleans) and len(set(booleans)) == 2:
        if policy == "impute":
            extra |= {"fill": 0.0, "indicator": True}
        return Suggestion(column, Feature(name=column, type="boolean", **extra), f"boolean; {gaps}")
    if all(n is not None for n in numbers):
        values = [n for n in numbers if n is not None]
        whole = all(v.is_integer() for v in values)
        if whole and len(set(values)) == len(present) and len(present) > MAX_CODES:
            return Suggestion(
                column, None, "left out: a different whole number in every row (an id?)"
            )
        if whole and len(set(values)) <= MAX_CODES and all(abs(v) < 1e15 for v in values):
            codes = sorted(set(values))
            categories = [str(int(v)) for v in codes]
            if policy == "impute":
                counts = Counter(category_key(v) for v in present)
                common = max(categories, key=lambda c: counts[category_key(c)])
                extra |= {"fill_category": common, "indicator": True}
            return Suggestion(
                column,
                Feature(
                    name=column,
                    type="categorical",
                    categories=categories,
                    unknown="other",
                    **extra,
                ),
                f"{len(codes)} whole-number codes, taken as categories (numeric if they are "
                f"amounts); {gaps}",
            )
        bounds = _round_out(min(values), max(values))
        if bounds is None:
            return Suggestion(column, None, "left out: numbers too large to scale")
        lo, hi = bounds
        if policy == "impute":
            median = float(pd.to_numeric(present).median())
            extra |= {"fill": _two_figures(median), "indicator": True}
        return Suggestion(
            column,
            Feature(name=column, type="numeric", min=lo, max=hi, **extra),
            f"numeric, range widened to round numbers; {gaps}",
        )
    spellings: dict[str, Counter[str]] = {}
    for value in present:
        spellings.setdefault(category_key(value), Counter())[value] += 1
    if len(spellings) > MAX_CATEGORIES:
        return Suggestion(
            column, None, f"left out: {len(spellings)} distinct values (free text or an id?)"
        )
    if any(len(v) > MAX_CATEGORY_CHARS for c in spellings.values() for v in c):
        return Suggestion(
            column, None, f"left out: values longer than {MAX_CATEGORY_CHARS} characters"
        )
    # The most frequent spelling names each category; the others become aliases only
    # when they differ beyond case and spaces (which match anyway).
    categories = sorted(c.most_common(1)[0][0] for c in spellings.values())
    if policy == "impute":
        common = max(spellings.values(), key=lambda c: sum(c.values())).most_common(1)[0][0]
        extra |= {"fill_category": common, "indicator": True}
    return Suggestion(
        column,
        Feature(name=column, type="categorical", categories=categories, unknown="other", **extra),
        f"{len(categories)} categories seen here; {gaps}",
    )


def infer_schema(df: pd.DataFrame, target: str | None) -> tuple[str, list[Suggestion]]:
    """The target column (``target``, or the last two-valued column) and a suggestion
    per other column. Raises ``ValueError`` when there is no usable target."""
    markers = missing_markers(None)
    columns = [str(c) for c in df.columns]
    if target is None:
        for column in reversed(columns):
            text = df[column].astype(str).str.strip()
            values = {as_boolean(v) for v in pd.unique(text)}
            if values == {True, False}:
                target = column
                break
        if target is None:
            raise ValueError("no column holds only 0/1 (or yes/no) values: give --target")
    if target not in columns:
        raise ValueError(f"--target {target!r} is not a column of the file")
    suggestions = [_suggest(c, df[c], markers) for c in columns if c != target]
    return target, suggestions


def _yaml_value(value: Any) -> str:
    """``value`` as YAML: JSON, with a float's exponent written so YAML reads a float
    (``6e-05`` is a string to YAML 1.1; ``6.0e-05`` is a number)."""
    text = json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def render_data_block(target: str, suggestions: list[Suggestion], fmt: str = "csv") -> str:
    """The ``data:`` block of a FederatedRun's spec, with a comment per column."""
    lines = [
        "data:",
        f"  format: {fmt}",
        f"  targetColumn: {_yaml_value(target)}",
        "  features:",
    ]
    for s in suggestions:
        if s.feature is None:
            lines.append(f"    # {_yaml_value(s.column)}: {s.note}")
            continue
        body = s.feature.model_dump(by_alias=True, exclude_defaults=True, exclude={"name"})
        lines.append(f"    - name: {_yaml_value(s.column)}  # {s.note}")
        lines.append(f"      type: {body.pop('type', s.feature.type)}")
        for key, value in body.items():
            lines.append(f"      {key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def print_schema(file: str, target: str | None, fmt: str | None) -> int:
    """``fedrun schema infer``: print the suggested ``data:`` block for ``file``."""
    from fedrun_trainer.common.data import DataError, load_table

    fmt = fmt or ("parquet" if file.lower().endswith((".parquet", ".pq")) else "csv")
    try:
        df = load_table(file, fmt)
        target, suggestions = infer_schema(df, target)
    except DataError as err:  # local: the detail may show what was found
        sys.stderr.write(f"fedrun: {err.detail}\n")
        return 1
    except ValueError as err:
        sys.stderr.write(f"fedrun: {file}: {err}\n")
        return 1
    if not any(s.feature is not None for s in suggestions):
        sys.stderr.write(f"fedrun: {file}: no column could be a feature (ids or free text only)\n")
        return 1
    sys.stdout.write(
        f"# Suggested from {file} ({len(df)} rows), read on this machine only.\n"  # noqa: S608
        "# Review it with the other hospitals: ranges are this file's own, widened to round\n"
        "# numbers; a fill is this file's median or most frequent value. Replace them with\n"
        "# values you agree on, then paste the block into the FederatedRun's spec.\n"
    )
    sys.stdout.write(render_data_block(target, suggestions, fmt))
    return 0


# --------------------------------------------------------------------------- check


def _rows(rows: tuple[int, ...]) -> str:
    shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN])
    return shown + (f" and {len(rows) - ROWS_SHOWN} more" if len(rows) > ROWS_SHOWN else "")


def _check_one(label: str, uri: str, data: DataSpec) -> int:
    from fedrun_core.schema import table_schema
    from fedrun_trainer.common.data import DataError, inspect, load_table

    out = sys.stdout
    try:
        df = load_table(uri, data.format)
    except DataError as err:
        out.write(f"{label}: {err.detail}\n")
        return 1
    result = inspect(df, table_schema(data), uri)
    counts = result.counts
    out.write(
        f"{label}: {counts.rows} rows; the run would use {counts.used} and drop {counts.dropped}\n"
    )
    features = {f.name: f for f in table_schema(data).features}
    for column in counts.columns:
        feature = features.get(column.name)
        done = []
        if column.imputed:
            fill = (
                (feature.fill_category if feature.type == "categorical" else feature.fill)
                if feature is not None
                else None
            )
            flag = f", flagged in {column.name}_missing" if feature and feature.indicator else ""
            done.append(f"{column.imputed} imputed with {fill!r}{flag}")
        if column.dropped:
            done.append(f"{column.dropped} rows dropped")
        if column.other:
            done.append(f"{column.other} outside the categories, encoded as (other)")
        missing = f"{column.missing} missing" if column.missing else ""
        out.write(f"  column {column.name!r}: " + "; ".join(filter(None, [missing, *done])) + "\n")
    if result.table is not None:
        positives = result.table.positives
        out.write(
            f"  {len(result.table)} rows used: {len(result.table) - positives} of class 0, "
            f"{positives} of class 1; {result.table.x.shape[1]} model inputs\n"
        )
    if result.problems:
        out.write(f"  {len(result.problems)} problem(s):\n")
        for problem in result.problems:
            out.write(f"  - {problem.detail}\n")
            if len(problem.rows) > 1:
                out.write(f"    {result.row_kind}s {_rows(problem.rows)}\n")
        return 1
    out.write("  ok\n")
    return 0


def check_files(file: Path, hospital: str | None, data_file: str | None) -> int:
    """``fedrun check``: the preflight of one hospital's file (or every hospital's) against
    the run's schema; 1 when any file has a problem."""
    run = load_run(file)
    spec = run.spec
    if data_file is not None:
        label = f"{data_file}" + (f" ({hospital})" if hospital else "")
        if hospital is not None:
            run.hospital(hospital)  # LookupError names the hospitals there are
        return _check_one(label, data_file, spec.data)
    hospitals = [run.hospital(hospital)] if hospital is not None else spec.hospitals
    code = 0
    for h in hospitals:
        code |= _check_one(f"{h.name} ({h.data_uri})", h.data_uri, spec.data)
    return code
