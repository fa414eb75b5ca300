"""Load a hospital's table, check it, and turn it into model inputs.

Every hospital must produce the *same* feature vector layout from its own file without
telling anyone anything about its data. The schema (the spec's features, or a preset's:
:mod:`fedrun_core.schema`) says how; cells are read per :mod:`fedrun_core.values` (missing
markers, categories matched trimmed, case-insensitively and numbers by value, booleans),
column by column in :mod:`fedrun_trainer.common.columns`. The rules this module enforces:

* **Fixed categories.** Categorical columns are one-hot encoded against a category list
  that is agreed up front, never against the values a hospital happens to have. A
  hospital without any ``Never_worked`` patient still gets that column (all zeros), so
  weights line up across hospitals. A value outside the list is an error that names the
  file, the line and the column, or, with ``unknown: other``, goes to one extra column.
* **Fixed scaling ranges.** Numeric columns are clipped to an agreed ``[min, max]`` and mapped
  linearly onto ``[-1, 1]``. Fitting a scaler to local data would use the hospital's own
  mean and spread, which differ between hospitals (so the shared weights would mean
  different things at each site) and which are statistics of patients that are not covered
  by the differential-privacy guarantee of the training. Fixed ranges use no data at all.
  The rare value beyond them is clipped, which also bounds each patient's influence on the
  gradient. Centring on ``[-1, 1]`` rather than ``[0, 1]`` keeps the intercept and the
  feature weights from fighting each other early in training, which matters when DP-SGD
  gives only a few dozen noisy steps.
* **Declared missing-value policies.** A missing cell fails the hospital (``missing:
  error``), takes the feature's agreed constant (``impute``, with an optional
  ``<name>_missing`` indicator column) or removes its row (``dropRow``). Nothing is
  computed from any hospital's data to fill a gap. :class:`DataCounts` says how many rows
  were used and dropped and how many cells were imputed per column: counts only.
* **Indicator columns are 0 or** :data:`INDICATOR_VALUE` **(0.25), not 0 or 1.** One-hot
  categories, booleans and missing flags are many columns with weak signal each. Under
  DP-SGD every column's weight receives the same Gaussian noise, and its effect on the logit
  scales with the column's value, while its share of the per-patient clipping budget scales
  with the value squared. A smaller fixed value is a data-independent prior that these
  columns matter less than age or glucose: it shrinks the noise they add to predictions
  more than their signal. Without DP it changes nothing but the weights' units (logistic
  regression is invariant to rescaling a column). Measured on the real stroke data split
  into 3 hospitals, logistic model, ε=1 over 5 rounds: pooled AUROC 0.78 with 0/1 columns,
  0.82-0.83 with 0/0.25.

  A numeric feature without ``min``/``max`` is standardised with the hospital's *own* mean
  and standard deviation. That is a weaker choice (feature meaning drifts between
  hospitals; the statistics are not under the DP guarantee) and exists only for data where
  no range can be agreed; give ranges whenever you can.

Errors are :class:`DataError` and name the file, the line (the header is line 1, so the
first data row is line 2; Parquet files report the 1-based row instead), the column and
the kind of problem. What leaves the hospital (``str(err)``, sent to the server and
copied into the run's status and Kubernetes Events) never holds a cell value or a header
name of the file; the value is only in :attr:`DataError.detail`, for the hospital's own log.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedrun_core.api import DataSpec, Feature, pvc_pod_path
from fedrun_core.schema import ColumnCounts, DataCounts, TableSchema, table_schema
from fedrun_trainer.common.columns import Column, read_feature, read_target

__all__ = [
    "INDICATOR_VALUE",
    "DataError",
    "HospitalData",
    "Inspection",
    "Problem",
    "Table",
    "inspect",
    "load_hospital_data",
    "load_table",
    "prepare",
    "resolve_local_path",
    "split",
]

FloatArray = npt.NDArray[np.float32]

#: Value of a set indicator (one-hot category, binary flag, missing-BMI flag); unset is 0.
INDICATOR_VALUE = 0.25


class DataError(ValueError):
    """The hospital's data cannot be used.

    An error has two texts:

    ``public``
        What may leave the hospital: the file (its URI from the spec), the line or row,
        the column and the *kind* of problem (``not a number``, ``unknown category``...),
        plus anything taken from the spec itself (expected categories, missing column
        names). Never a cell value, a header name of the file, or a parser's or S3's own
        message (those can quote the file). ``str(err)`` returns it; it is what the
        hospital sends to the server, and so what reaches the run's status and Events.
    ``detail``
        The public text plus what was found (the offending value, the file's header, the
        parser's message). Only for the hospital's own log and for checks run where the
        data lives. Equal to ``public`` when there is nothing more to say.
    """

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(public)
        self.public = public
        self.detail = public if detail is None else detail

    def __str__(self) -> str:
        return self.public

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str]]:
        return (type(self), (self.public, self.detail))

    @classmethod
    def found(cls, public: str, what: str) -> DataError:
        """An error whose ``detail`` is ``public`` followed by ``what`` (the found value)."""
        return cls(public, f"{public}; found {what}")


@dataclass(frozen=True)
class Table:
    """Model inputs: ``x`` float32 ``[n, f]``, ``y`` float32 ``[n]`` (0/1)."""

    x: FloatArray
    y: FloatArray
    feature_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def positives(self) -> int:
        return int(self.y.sum())


# --------------------------------------------------------------------------- loading


def resolve_local_path(uri: str) -> Path:
    """Local path of a ``file://`` URI (``file:///abs`` or ``file:rel``) or a plain path.

    A ``pvc://claim/path`` URI is the path inside the hospital's pod where rendering mounts
    the claim: ``/data/<claim>/<path>``.
    """
    if uri.startswith("pvc://"):
        return Path(pvc_pod_path(uri))
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            # file://relative/path: treat host+path as a relative path, as users mean it.
            return Path(unquote(parsed.netloc + parsed.path))
        return Path(unquote(parsed.path))
    return Path(uri)


def _read_s3(uri: str) -> bytes:
    from fedrun_trainer.common.cloud import NoCloudCredentialsError, s3_client

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise DataError(f"{uri}: an S3 URI must look like s3://bucket/key")
    try:
        obj = s3_client(uri).get_object(Bucket=bucket, Key=key)
        body: bytes = obj["Body"].read()
    except NoCloudCredentialsError as exc:  # fedrun's own message: says where to put them
        raise DataError(str(exc)) from None
    except Exception as exc:  # botocore's errors are many; name the object and the cause
        # The error code (NoSuchKey, AccessDenied...) is safe to send; the message is not
        # ours to vouch for, so it stays in the detail.
        response = getattr(exc, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        raise DataError(
            f"{uri}: cannot read from S3 ({code or type(exc).__name__}); see the hospital's log",
            f"{uri}: cannot read from S3: {type(exc).__name__}: {exc}",
        ) from exc
    return body


def load_table(uri: str, fmt: str) -> pd.DataFrame:
    """Read a CSV or Parquet table from ``file://``, ``pvc://``, a plain path or ``s3://``.

    CSV cells are kept as strings (checked and converted by :func:`prepare`), and the
    frame's index holds each row's line number in the file (header = line 1). Parquet
    frames keep their types and are indexed by 1-based row number. Fully blank CSV lines
    are dropped. Raises :class:`DataError` for a missing, unreadable or empty file.
    """
    fmt = fmt.lower()
    if fmt not in ("csv", "parquet"):
        raise DataError(f"{uri}: unknown data format {fmt!r} (expected csv or parquet)")
    source: Any
    if uri.startswith("s3://"):
        source = io.BytesIO(_read_s3(uri))
    else:
        path = resolve_local_path(uri)
        if not path.exists():
            raise DataError(f"{uri}: file not found ({path})")
        if path.is_dir():
            raise DataError(f"{uri}: is a directory, not a {fmt} file")
        if path.stat().st_size == 0:
            raise DataError(f"{uri}: file is empty")
        source = path
    try:
        if fmt == "csv":
            # index_col=False: a file with a delimiter at the end of every line must not
            # have its first column taken for the index (shifting every column by one).
            df = pd.read_csv(
                source,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                index_col=False,
            )
        else:
            df = pd.read_parquet(source)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{uri}: file is empty") from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise _parse_error(uri, fmt, source, exc) from exc
    if fmt == "csv":
        df.index = pd.RangeIndex(2, 2 + len(df))
        blank = df.apply(lambda col: col.fillna("").str.strip() == "").all(axis=1)
        df = df[~blank]
        df.attrs["row_kind"] = "line"
    else:
        df.index = pd.RangeIndex(1, 1 + len(df))
        df.attrs["row_kind"] = "row"
    df.columns = [str(c).strip() for c in df.columns]
    if df.columns.has_duplicates:
        twice = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
        raise DataError(
            f"{uri}: {len(twice)} column name(s) appear more than once in the header "
            "(compared trimmed)",
            f"{uri}: the header repeats {', '.join(map(repr, twice))} (compared trimmed)",
        )
    if len(df) == 0:
        raise DataError(f"{uri}: file has a header but no data rows")
    return df


_PARSER_LINE = re.compile(r"\bline (\d+)\b")
_PARSER_ROW = re.compile(r"\bstarting at row (\d+)\b")  # 0-based, the header is row 0


def _raw_lines(source: Any) -> Iterator[bytes]:
    """The lines of a local file or an in-memory S3 body, without their line ends."""
    if isinstance(source, io.BytesIO):
        yield from source.getvalue().splitlines()
        return
    with Path(source).open("rb") as f:
        for line in f:
            yield line.rstrip(b"\r\n")


def _find_line(source: Any, test: Callable[[int, bytes], bool]) -> tuple[int, bytes] | None:
    """The first 1-based ``(number, text)`` where ``test`` holds; None if none or unreadable."""
    try:
        for number, raw in enumerate(_raw_lines(source), start=1):
            if test(number, raw):
                return number, raw
    except OSError:
        pass
    return None


def _not_utf8(_: int, raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _parse_error(uri: str, fmt: str, source: Any, exc: Exception) -> DataError:
    """A reader's failure as a :class:`DataError`: a fixed description and the line.

    The reader's own message can quote the file, so it (and the text of the line it names)
    goes to ``detail`` only.
    """
    text = str(exc)
    line: int | None = None
    if fmt == "csv":
        if m := _PARSER_LINE.search(text):
            line = int(m.group(1))
        elif m := _PARSER_ROW.search(text):
            line = int(m.group(1)) + 1
    found: tuple[int, bytes] | None = None
    if isinstance(exc, UnicodeDecodeError):
        what = "not UTF-8 text (save it as UTF-8)"
        found = _find_line(source, _not_utf8)  # the decoder's position is no line number
        line = found[0] if found is not None else None
    elif "Expected" in text and "fields" in text:
        what = "a line has a different number of fields than the header"
    elif "EOF inside string" in text:
        what = "a quoted field is never closed"
    elif isinstance(exc, OSError):
        what = f"cannot be read ({type(exc).__name__})"
    else:
        what = f"not a valid {fmt} file"
    if line is not None and found is None:
        found = _find_line(source, lambda number, _: number == line)
    where = f" (line {line})" if line is not None else ""
    public = f"{uri}: cannot parse as {fmt}{where}: {what}; see the hospital's log"
    detail = f"{uri}: cannot parse as {fmt}{where}: {type(exc).__name__}: {text.strip()}"
    if found is not None:
        shown = found[1].decode("utf-8", errors="replace")[:200]
        detail += f"; line {found[0]} reads {shown!r}"
    return DataError(public, detail)


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one column, with every row it affects.

    ``public`` may leave the hospital (file, first row, column, kind, row count, what the
    spec expects); ``detail`` adds up to five of the values found, for the hospital's own
    log and ``fedrun check``.
    """

    column: str | None
    public: str
    detail: str
    rows: tuple[int, ...] = ()

    def error(self, more: int = 0) -> DataError:
        """This problem as a :class:`DataError`, saying how many others there are."""
        tail = (
            f" (and {more} more problem{'s' if more > 1 else ''}; `fedrun check` lists them)"
            if more
            else ""
        )
        return DataError(self.public + tail, self.detail + tail)


@dataclass(frozen=True)
class Inspection:
    """A table checked against the schema: its model inputs (None when there are
    problems), the counts of what the policies did, and every problem found."""

    table: Table | None
    counts: DataCounts
    problems: list[Problem]
    row_kind: str = "line"

    def raise_first(self) -> Table:
        """The table, or the first problem raised as a :class:`DataError`."""
        if self.problems:
            raise self.problems[0].error(more=len(self.problems) - 1)
        assert self.table is not None
        return self.table


def _found(values: pd.Series) -> str:
    distinct = list(dict.fromkeys(str(v) for v in values))
    shown = ", ".join(repr(v) for v in distinct[:5])
    return shown + (f" and {len(distinct) - 5} more" if len(distinct) > 5 else "")


def _cell_problem(
    df: pd.DataFrame, column: str, mask: npt.NDArray[np.bool_], what: str, source: str
) -> Problem:
    """A problem at the rows of ``mask`` in ``column``: first row, kind, row count."""
    rows = tuple(int(r) for r in df.index[mask])
    more = f" ({len(rows)} rows in all)" if len(rows) > 1 else ""
    public = f"{source}: {_where(df, rows[0])}, column {column!r}: {what}{more}"
    return Problem(column, public, f"{public}; found {_found(df[column][mask])}", rows)


def _where(df: pd.DataFrame, label: Any) -> str:
    return f"{df.attrs.get('row_kind', 'row')} {label}"


def _target_problem(
    df: pd.DataFrame, column: str, bad: npt.NDArray[np.bool_], source: str
) -> Problem:
    rows = tuple(int(r) for r in df.index[bad])
    n_bad = len(rows)
    public = (
        f"{source}: target column {column!r} must be binary (0/1): {n_bad} "
        f"{'row is' if n_bad == 1 else 'rows are'} not (first at {_where(df, rows[0])})"
    )
    return Problem(column, public, f"{public}; found {_found(df[column][bad])}", rows)


def _scale(values: npt.NDArray[np.float64], lo: float, hi: float) -> FloatArray:
    clipped = np.clip(values, lo, hi)
    return (2.0 * (clipped - lo) / (hi - lo) - 1.0).astype(np.float32)


def _standardise(values: npt.NDArray[np.float64]) -> FloatArray:
    if len(values) == 0:
        return values.astype(np.float32)
    std = float(values.std())
    out: FloatArray = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def _encode(
    feature: Feature, column: Column, keep: npt.NDArray[np.bool_]
) -> tuple[FloatArray, list[str]]:
    """The model-input columns of one feature over the kept rows, and their names."""
    missing = column.missing[keep]
    values = column.values[keep]
    blocks: list[FloatArray] = []
    names: list[str] = []
    if feature.type == "categorical":
        categories = list(feature.categories or [])
        if feature.missing == "impute" and feature.fill_category is not None:
            values = np.where(missing, float(categories.index(feature.fill_category)), values)
        width = len(categories) + (1 if feature.unknown == "other" else 0)
        block = np.zeros((len(values), width), dtype=np.float32)
        known = ~np.isnan(values)
        block[np.flatnonzero(known), values[known].astype(np.int64)] = INDICATOR_VALUE
        names += [f"{feature.name}={c}" for c in categories]
        if feature.unknown == "other":
            assert column.other is not None
            block[column.other[keep], -1] = INDICATOR_VALUE
            names.append(f"{feature.name}=(other)")
        blocks.append(block)
    else:
        if feature.missing == "impute" and feature.fill is not None:
            values = np.where(missing, feature.fill, values)
        if feature.type == "boolean":
            blocks.append((values * INDICATOR_VALUE).astype(np.float32)[:, None])
        elif feature.min is not None and feature.max is not None:
            blocks.append(_scale(values, feature.min, feature.max)[:, None])
        else:
            blocks.append(_standardise(values)[:, None])
        names.append(feature.name)
    if feature.indicator:
        blocks.append((missing * INDICATOR_VALUE).astype(np.float32)[:, None])
        names.append(f"{feature.name}_missing")
    return np.hstack(blocks), names


def inspect(df: pd.DataFrame, schema: TableSchema, source: str) -> Inspection:
    """Check ``df`` against ``schema``, apply the missing-value policies and encode it.

    Finds every problem rather than stopping at the first (``fedrun check`` lists them;
    training raises the first with :meth:`Inspection.raise_first`). ``source`` names the
    file in messages; row labels come from ``df.index`` (line numbers when the frame came
    from :func:`load_table`).
    """
    row_kind = str(df.attrs.get("row_kind", "row"))
    absent = [c for c in schema.columns if c not in df.columns]
    if absent:
        # Only the spec's names may leave: the file's own header names can hold data.
        public = (
            f"{source}: missing column(s) {', '.join(repr(c) for c in absent)} "
            f"(the file's header has {len(df.columns)} columns)"
        )
        detail = f"{public}; found header {', '.join(repr(c) for c in df.columns)}"
        return Inspection(
            None, DataCounts(len(df), 0, len(df)), [Problem(None, public, detail)], row_kind
        )
    problems: list[Problem] = []
    drop = np.zeros(len(df), dtype=bool)
    target = read_target(df[schema.target], schema.missing)
    if target.bad.any():
        problems.append(_target_problem(df, schema.target, target.bad, source))
    if target.missing.any():
        if schema.target_missing == "dropRow":
            drop |= target.missing
        else:
            problems.append(
                _cell_problem(df, schema.target, target.missing, "missing value", source)
            )
    read: list[tuple[Feature, Column]] = []
    for feature in schema.features:
        column = read_feature(df[feature.name], feature, schema.missing)
        if column.bad.any():
            expected = (
                f" (expected one of {', '.join(map(repr, feature.categories or []))})"
                if feature.type == "categorical"
                else ""
            )
            problems.append(
                _cell_problem(df, feature.name, column.bad, column.kind + expected, source)
            )
        if column.missing.any():
            if feature.missing == "error":
                problems.append(
                    _cell_problem(df, feature.name, column.missing, "missing value", source)
                )
            elif feature.missing == "dropRow":
                drop |= column.missing
        read.append((feature, column))
    keep = ~drop
    counts = _counts(schema, target, read, keep)
    if not problems:
        y = target.values[keep]
        positives = int((y == 1.0).sum())
        negatives = len(y) - positives
        if len(y) < 2 or min(positives, negatives) < schema.min_rows_per_class:
            public = (
                f"{source}: too few rows to train after the missing-value policies: "
                f"{len(y)} of {len(df)} rows used, {negatives} of class 0 and {positives} of "
                f"class 1 (at least 2 rows and data.minRowsPerClass "
                f"{schema.min_rows_per_class} of each class are needed)"
            )
            problems.append(Problem(None, public, public))
    if problems:
        return Inspection(None, counts, problems, row_kind)
    blocks: list[FloatArray] = []
    names: list[str] = []
    for feature, column in read:
        block, block_names = _encode(feature, column, keep)
        blocks.append(block)
        names += block_names
    y32 = target.values[keep].astype(np.float32)
    return Inspection(Table(np.hstack(blocks).astype(np.float32), y32, names), counts, [], row_kind)


def _counts(
    schema: TableSchema,
    target: Column,
    read: list[tuple[Feature, Column]],
    keep: npt.NDArray[np.bool_],
) -> DataCounts:
    columns: list[ColumnCounts] = []
    if target.missing.any():
        n = int(target.missing.sum())
        dropped = n if schema.target_missing == "dropRow" else 0
        columns.append(ColumnCounts(schema.target, missing=n, dropped=dropped))
    for feature, column in read:
        missing = int(column.missing.sum())
        imputed = int((column.missing & keep).sum()) if feature.missing == "impute" else 0
        dropped = missing if feature.missing == "dropRow" else 0
        other = int((column.other & keep).sum()) if column.other is not None else 0
        if missing or other:
            columns.append(ColumnCounts(feature.name, missing, imputed, dropped, other))
    used = int(keep.sum())
    return DataCounts(len(keep), used, len(keep) - used, tuple(columns))


def prepare(df: pd.DataFrame, data_spec: DataSpec, source: str) -> Table:
    """Check ``df`` against the schema and encode it; raises the first problem found as a
    :class:`DataError` (see :func:`inspect` for all of them, and the counts)."""
    return inspect(df, _schema(data_spec, source), source).raise_first()


def _schema(data_spec: DataSpec, source: str) -> TableSchema:
    try:
        return table_schema(data_spec)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err


# --------------------------------------------------------------------------- splitting


def _take(table: Table, index: npt.NDArray[np.int64]) -> Table:
    return Table(table.x[index], table.y[index], list(table.feature_names))


def split(table: Table, test_fraction: float, seed: int) -> tuple[Table, Table]:
    """Stratified, seeded train/test split: each class contributes ``test_fraction`` of its rows.

    Deterministic for a given ``seed`` (the spec's), so a restarted hospital gets the same
    split. A class with a single row stays in the training split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_idx: list[npt.NDArray[np.int64]] = []
    test_idx: list[npt.NDArray[np.int64]] = []
    for label in (0.0, 1.0):
        idx = np.flatnonzero(table.y == label).astype(np.int64)
        rng.shuffle(idx)
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = np.sort(np.concatenate(train_idx))
    test = np.sort(np.concatenate(test_idx))
    return _take(table, train), _take(table, test)


@dataclass(frozen=True)
class HospitalData:
    """One hospital's data, ready to train: its splits and what its policies did."""

    train: Table
    test: Table
    counts: DataCounts


def load_hospital_data(
    uri: str, data_spec: DataSpec, test_fraction: float, seed: int
) -> HospitalData:
    """Load, check, encode and split one hospital's data; raises :class:`DataError`."""
    df = load_table(uri, data_spec.format)
    inspection = inspect(df, _schema(data_spec, uri), uri)
    train, test = split(inspection.raise_first(), test_fraction, seed)
    return HospitalData(train, test, inspection.counts)
