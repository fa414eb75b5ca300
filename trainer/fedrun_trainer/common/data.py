"""Load a hospital's table, check it, and turn it into model inputs.

Every hospital must produce the *same* feature vector layout from its own file without
telling anyone anything about its data. Two rules follow, and this module enforces them:

* **Fixed categories.** Categorical columns are one-hot encoded against a category list
  that is agreed up front (the ``stroke`` preset's lists, or the spec's ``categories``), never
  against the values a hospital happens to have. A hospital without any ``Never_worked``
  patient still gets that column (all zeros), so weights line up across hospitals. A value
  outside the list is an error that names the file, the line and the column.
* **Fixed scaling ranges.** Numeric columns are clipped to an agreed ``[min, max]`` and mapped
  linearly onto ``[-1, 1]``. Fitting a scaler to local data would use the hospital's own
  mean and spread, which differ between hospitals (so the shared weights would mean
  different things at each site) and which are statistics of patients that are not covered
  by the differential-privacy guarantee of the training. Fixed ranges use no data at all.
  The stroke preset's ranges are clinically plausible bounds (age 0-100 years, glucose
  50-300 mg/dL, BMI 10-60 kg/m²); the rare value beyond them is clipped, which also bounds
  each patient's influence on the gradient. Centring on ``[-1, 1]`` rather than ``[0, 1]``
  keeps the intercept and the feature weights from fighting each other early in training,
  which matters when DP-SGD gives only a few dozen noisy steps.
* **Indicator columns are 0 or** :data:`INDICATOR_VALUE` **(0.25), not 0 or 1.** One-hot
  categories and binary flags are many columns with weak signal each. Under DP-SGD every
  column's weight receives the same Gaussian noise, and its effect on the logit scales with
  the column's value, while its share of the per-patient clipping budget scales with the
  value squared. A smaller fixed value is a data-independent prior that these columns matter
  less than age or glucose: it shrinks the noise they add to predictions more than their
  signal. Without DP it changes nothing but the weights' units (logistic regression is
  invariant to rescaling a column). Measured on the real stroke data split into 3 hospitals,
  logistic model, ε=1 over 5 rounds: pooled AUROC 0.78 with 0/1 columns, 0.82-0.83 with 0/0.25.

  In generic mode a numeric feature without ``min``/``max`` is standardised with the
  hospital's *own* mean and standard deviation. That is a weaker choice (feature meaning
  drifts between hospitals; the statistics are not under the DP guarantee) and exists only
  for data where no range can be agreed; give ranges whenever you can.

The stroke preset (Kaggle "healthcare-dataset-stroke-data" schema): ``id`` is dropped;
``bmi`` written as ``N/A`` is imputed with the agreed value :data:`STROKE_BMI_IMPUTE`
(28.1 kg/m², close to the adult median) and flagged by a ``bmi_missing`` indicator, because
missing BMI is itself strongly associated with stroke in that data; ``hypertension`` and
``heart_disease`` must be 0/1; the target is ``stroke`` (0/1).

Errors are :class:`DataError` and name the file, the line (the header is line 1, so the
first data row is line 2; Parquet files report the 1-based row instead), the column and
the kind of problem. What leaves the hospital (``str(err)``, sent to the server and
copied into the run's status and Kubernetes Events) never holds a cell value or a header
name of the file; the value is only in :attr:`DataError.detail`, for the hospital's own log.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedrun_core.api import DataSpec, pvc_pod_path

__all__ = [
    "INDICATOR_VALUE",
    "STROKE_BMI_IMPUTE",
    "STROKE_CATEGORIES",
    "STROKE_RANGES",
    "DataError",
    "Table",
    "load_hospital_data",
    "load_table",
    "prepare",
    "resolve_local_path",
    "split",
]

FloatArray = npt.NDArray[np.float32]

#: Value of a set indicator (one-hot category, binary flag, missing-BMI flag); unset is 0.
INDICATOR_VALUE = 0.25
#: Agreed BMI for ``N/A`` values in the stroke preset (kg/m²).
STROKE_BMI_IMPUTE = 28.1
#: Agreed scaling ranges of the stroke preset's numeric columns (clipped, then mapped to [-1, 1]).
STROKE_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 100.0),
    "avg_glucose_level": (50.0, 300.0),
    "bmi": (10.0, 60.0),
}
#: Fixed category lists of the stroke preset, in one-hot column order.
STROKE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "gender": ("Female", "Male", "Other"),
    "ever_married": ("No", "Yes"),
    "work_type": ("Govt_job", "Never_worked", "Private", "Self-employed", "children"),
    "Residence_type": ("Rural", "Urban"),
    "smoking_status": ("Unknown", "formerly smoked", "never smoked", "smokes"),
}
STROKE_BINARY = ("hypertension", "heart_disease")
STROKE_TARGET = "stroke"
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
_MISSING = {"", "N/A", "NA", "NaN", "nan", "None", "null"}


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
    import boto3  # lazily: only hospitals on S3 need it; credentials from IRSA/default chain

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise DataError(f"{uri}: an S3 URI must look like s3://bucket/key")
    try:
        obj = boto3.client("s3").get_object(Bucket=bucket, Key=key)
        body: bytes = obj["Body"].read()
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
            df = pd.read_csv(source, dtype=str, keep_default_na=False, skip_blank_lines=False)
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


def _where(df: pd.DataFrame, label: Any) -> str:
    return f"{df.attrs.get('row_kind', 'row')} {label}"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in _MISSING


def _numeric(
    df: pd.DataFrame,
    column: str,
    source: str,
    *,
    missing_ok: bool = False,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Column as float64 plus a missing mask; raises on text or (unless allowed) gaps."""
    raw = df[column]
    missing = np.array([_is_missing(v) for v in raw], dtype=bool)
    as_text = raw.astype(str).str.strip() if raw.dtype == object else raw
    values = pd.to_numeric(as_text.where(~missing, None), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    bad = np.isnan(values) & ~missing | np.isinf(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError.found(
            f"{source}: {_where(df, df.index[i])}, column {column!r}: not a number",
            repr(raw.iloc[i]),
        )
    if missing.any() and not missing_ok:
        i = int(np.argmax(missing))
        raise DataError.found(
            f"{source}: {_where(df, df.index[i])}, column {column!r}: missing value",
            repr(raw.iloc[i]),
        )
    return values, missing


def _check_columns(df: pd.DataFrame, needed: Sequence[str], source: str) -> None:
    # Only the spec's names may leave: the file's own header names can hold data.
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError.found(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} "
            f"(the file's header has {len(df.columns)} columns)",
            f"header {', '.join(repr(c) for c in df.columns)}",
        )


def _target(df: pd.DataFrame, column: str, source: str) -> FloatArray:
    raw = df[column]
    text = raw.astype(str).str.strip()
    values: npt.NDArray[np.float64] = pd.to_numeric(text, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    ok = (values == 0.0) | (values == 1.0)
    if not ok.all():
        bad_values = sorted({str(v) for v in raw[~ok]})
        first = df.index[int(np.argmax(~ok))]
        n_bad = int((~ok).sum())
        shown = ", ".join(repr(v) for v in bad_values[:5])
        more = f" and {len(bad_values) - 5} more" if len(bad_values) > 5 else ""
        raise DataError.found(
            f"{source}: target column {column!r} must be binary (0/1): {n_bad} "
            f"{'row is' if n_bad == 1 else 'rows are'} not (first at {_where(df, first)})",
            f"{shown}{more}",
        )
    return values.astype(np.float32)


def _one_hot(
    df: pd.DataFrame, column: str, categories: Sequence[str], source: str
) -> tuple[FloatArray, list[str]]:
    text = df[column].astype(str).str.strip()
    lookup = {c: i for i, c in enumerate(categories)}
    codes = text.map(lookup)
    unknown = codes.isna().to_numpy()
    if unknown.any():
        i = int(np.argmax(unknown))
        raise DataError.found(
            f"{source}: {_where(df, df.index[i])}, column {column!r}: unknown category "
            f"(expected one of {', '.join(map(repr, categories))})",
            repr(df[column].iloc[i]),
        )
    out = np.zeros((len(df), len(categories)), dtype=np.float32)
    out[np.arange(len(df)), codes.to_numpy(dtype=np.int64)] = INDICATOR_VALUE
    return out, [f"{column}={c}" for c in categories]


def _scale(values: npt.NDArray[np.float64], lo: float, hi: float) -> FloatArray:
    clipped = np.clip(values, lo, hi)
    return (2.0 * (clipped - lo) / (hi - lo) - 1.0).astype(np.float32)


def _standardise(values: npt.NDArray[np.float64]) -> FloatArray:
    std = float(values.std())
    out: FloatArray = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def _prepare_stroke(df: pd.DataFrame, source: str) -> Table:
    needed = [c for c in STROKE_COLUMNS if c != "id"]
    _check_columns(df, needed, source)
    y = _target(df, STROKE_TARGET, source)
    blocks: list[FloatArray] = []
    names: list[str] = []
    for column in ("age", "avg_glucose_level"):
        values, _ = _numeric(df, column, source)
        blocks.append(_scale(values, *STROKE_RANGES[column])[:, None])
        names.append(column)
    bmi, bmi_missing = _numeric(df, "bmi", source, missing_ok=True)
    bmi = np.where(bmi_missing, STROKE_BMI_IMPUTE, bmi)
    blocks += [
        _scale(bmi, *STROKE_RANGES["bmi"])[:, None],
        (bmi_missing * INDICATOR_VALUE).astype(np.float32)[:, None],
    ]
    names += ["bmi", "bmi_missing"]
    for column in STROKE_BINARY:
        values, _ = _numeric(df, column, source)
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError.found(
                f"{source}: {_where(df, df.index[i])}, column {column!r}: must be 0 or 1",
                repr(df[column].iloc[i]),
            )
        blocks.append((values * INDICATOR_VALUE).astype(np.float32)[:, None])
        names.append(column)
    for column, categories in STROKE_CATEGORIES.items():
        block, block_names = _one_hot(df, column, categories, source)
        blocks.append(block)
        names += block_names
    return Table(np.hstack(blocks).astype(np.float32), y, names)


def _prepare_generic(df: pd.DataFrame, spec: DataSpec, source: str) -> Table:
    if not spec.target_column:
        raise DataError(f"{source}: data.targetColumn is required when no preset is given")
    features = list(spec.features or [])
    if not features:
        raise DataError(f"{source}: data.features is required when no preset is given")
    _check_columns(df, [spec.target_column, *(f.name for f in features)], source)
    y = _target(df, spec.target_column, source)
    blocks: list[FloatArray] = []
    names: list[str] = []
    for feature in features:
        if feature.type == "numeric":
            values, _ = _numeric(df, feature.name, source)
            if feature.min is not None and feature.max is not None:
                if not feature.max > feature.min:
                    raise DataError(f"{source}: feature {feature.name!r}: max must exceed min")
                blocks.append(_scale(values, feature.min, feature.max)[:, None])
            else:
                blocks.append(_standardise(values)[:, None])
            names.append(feature.name)
        elif feature.type == "categorical":
            if not feature.categories:
                raise DataError(
                    f"{source}: categorical feature {feature.name!r} needs a categories list"
                )
            block, block_names = _one_hot(df, feature.name, feature.categories, source)
            blocks.append(block)
            names += block_names
        else:
            raise DataError(f"{source}: feature {feature.name!r}: unknown type {feature.type!r}")
    return Table(np.hstack(blocks).astype(np.float32), y, names)


def prepare(df: pd.DataFrame, data_spec: DataSpec, source: str) -> Table:
    """Check ``df`` against the schema and encode it (see the module docstring).

    ``source`` names the file in error messages. Row labels come from ``df.index``
    (line numbers when the frame came from :func:`load_table`).
    """
    if data_spec.preset is not None:
        if data_spec.preset != "stroke":
            raise DataError(f"{source}: unknown data preset {data_spec.preset!r}")
        if data_spec.target_column not in (None, STROKE_TARGET):
            raise DataError(
                f"{source}: the stroke preset's target is {STROKE_TARGET!r}, "
                f"not {data_spec.target_column!r}"
            )
        return _prepare_stroke(df, source)
    return _prepare_generic(df, data_spec, source)


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


def load_hospital_data(
    uri: str, data_spec: DataSpec, test_fraction: float, seed: int
) -> tuple[Table, Table]:
    """Load, check, encode and split one hospital's data: ``(train, test)``."""
    df = load_table(uri, data_spec.format)
    table = prepare(df, data_spec, uri)
    if len(table) < 2:
        raise DataError(f"{uri}: needs at least 2 data rows, has {len(table)}")
    return split(table, test_fraction, seed)
