"""Data loading, validation messages, the stroke preset and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrun_cli.demo_data import synthetic_stroke, write_demo_hospitals
from fedrun_core.api import DataSpec, Feature
from fedrun_core.schema import STROKE_BMI_IMPUTE
from fedrun_trainer.common.data import (
    INDICATOR_VALUE,
    DataError,
    Table,
    load_hospital_data,
    load_table,
    prepare,
    split,
)

STROKE = DataSpec(preset="stroke")
GENERIC = DataSpec(
    target_column="outcome",
    features=[
        Feature(name="age", type="numeric", min=0, max=100),
        Feature(name="score", type="numeric"),
        Feature(name="smoker", type="categorical", categories=["yes", "no"]),
    ],
)
GOOD = "age,score,smoker,outcome\n50,1.5,yes,1\n20,0.5,no,0\n70,2.5,no,1\n30,0.1,yes,0\n"


def write(tmp_path: Path, text: str, name: str = "h.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, spec: DataSpec = GENERIC) -> Table:
    return prepare(load_table(str(path), "csv"), spec, str(path))


def test_generic_good_file(tmp_path: Path) -> None:
    table = load(write(tmp_path, GOOD))
    assert table.x.dtype == np.float32 and table.y.dtype == np.float32
    assert table.feature_names == ["age", "score", "smoker=yes", "smoker=no"]
    assert table.x[:, 0].tolist() == pytest.approx([0.0, -0.6, 0.4, -0.4])  # [0,100] -> [-1,1]
    assert table.x[:, 1].mean() == pytest.approx(0.0, abs=1e-6)  # no range: local standardising
    assert table.x[0, 2:].tolist() == [INDICATOR_VALUE, 0.0]  # smoker=yes, one-hot
    assert table.y.tolist() == [1, 0, 1, 0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv.*not found"):
        load_table(str(tmp_path / "nope.csv"), "csv")


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"h\.csv: file is empty"):
        load(write(tmp_path, ""))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        load(write(tmp_path, "age,score,smoker,outcome\n"))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, "age,smoker,result\n1,yes,0\n")
    with pytest.raises(DataError, match=r"h\.csv: missing column\(s\) 'outcome', 'score'") as err:
        load(path)
    assert "'result'" not in str(err.value)  # the file's own headers stay local
    assert "'result'" in err.value.detail


def test_non_numeric_value_names_file_line_column_and_logs_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("70,2.5", "seventy,2.5"))
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message
    assert "line 4" in message  # header is line 1; the bad row is the third data row
    assert "'age'" in message and "not a number" in message
    assert "seventy" not in message  # the value stays in the hospital's log
    assert err.value.detail == f"{message}; found 'seventy'"


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("20,0.5,no,0\n", "20,0.5,no,0\n\n").replace("30,", "x,"))
    with pytest.raises(DataError, match="line 6, column 'age'"):
        load(path)


def test_missing_numeric_value(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 3, column 'score': missing value$"):
        load(write(tmp_path, GOOD.replace("20,0.5", "20,")))


def test_non_binary_target_counts_rows_and_logs_the_values(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("yes,1\n", "yes,2\n").replace("no,0\n", "no,maybe\n", 1))
    with pytest.raises(
        DataError, match=r"'outcome' must be binary \(0/1\): 2 rows .*line 2"
    ) as err:
        load(path)
    assert "maybe" not in str(err.value)
    assert err.value.detail.endswith("found '2', 'maybe'")


def test_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"h\.csv: line 5, column 'smoker': unknown category \(expected one of 'yes', 'no'\)$",
    ) as err:
        load(write(tmp_path, GOOD.replace("30,0.1,yes", "30,0.1,y")))
    assert err.value.detail.endswith("found 'y'")


def test_stroke_preset_on_synthetic(tmp_path: Path) -> None:
    df = synthetic_stroke(400, seed=1)
    path = tmp_path / "s.csv"
    df.to_csv(path, index=False)
    table = load(path, STROKE)
    assert table.x.shape == (400, 22)
    assert np.all(np.abs(table.x) <= 1.0)
    missing = table.x[:, table.feature_names.index("bmi_missing")]
    assert set(missing.tolist()) == {0.0, INDICATOR_VALUE}
    assert (missing > 0).sum() == (df["bmi"] == "N/A").sum() > 0
    bmi = table.x[:, table.feature_names.index("bmi")][missing > 0]
    assert np.allclose(bmi, 2 * (STROKE_BMI_IMPUTE - 10) / 50 - 1)
    # Fixed category lists: a hospital lacking a category still gets its column.
    assert "work_type=Never_worked" in table.feature_names
    assert table.y.sum() == (df["stroke"] == "1").sum()


def test_stroke_preset_same_columns_for_every_hospital(tmp_path: Path) -> None:
    a = synthetic_stroke(60, seed=2)
    b = a[a["gender"] == "Female"]
    assert load_names(tmp_path, a) == load_names(tmp_path, b)


def load_names(tmp_path: Path, df: pd.DataFrame) -> list[str]:
    path = tmp_path / "x.csv"
    df.to_csv(path, index=False)
    return load(path, STROKE).feature_names


def test_stroke_bad_binary_column(tmp_path: Path) -> None:
    df = synthetic_stroke(20, seed=3)
    df.loc[4, "hypertension"] = "2"
    path = tmp_path / "s.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="line 6, column 'hypertension'"):
        load(path, STROKE)


def test_parquet_and_relative_and_file_uris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = pd.DataFrame(
        {"age": [10.0, 20.0, 30.0], "score": [1, 2, 3], "smoker": ["yes", "no", "no"]}
    )
    df["outcome"] = [0, 1, 0]
    df.to_parquet(tmp_path / "h.parquet")
    monkeypatch.chdir(tmp_path)
    for uri in ("h.parquet", "file:h.parquet", f"file://{tmp_path}/h.parquet"):
        table = prepare(load_table(uri, "parquet"), GENERIC, uri)
        assert table.y.tolist() == [0, 1, 0]
    df.loc[1, "smoker"] = "sometimes"
    df.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row 2, column 'smoker'"):
        prepare(load_table("bad.parquet", "parquet"), GENERIC, "bad.parquet")


def test_split_is_stratified_and_seeded() -> None:
    y = np.array([1] * 20 + [0] * 180, dtype=np.float32)
    table = Table(np.arange(200, dtype=np.float32)[:, None], y, ["i"])
    train, test = split(table, 0.3, seed=7)
    assert len(train) + len(test) == 200
    assert test.positives == 6 and train.positives == 14
    again, _ = split(table, 0.3, seed=7)
    other, _ = split(table, 0.3, seed=8)
    assert np.array_equal(train.x, again.x) and not np.array_equal(train.x, other.x)
    assert not set(train.x[:, 0]) & set(test.x[:, 0])


def test_load_hospital_data_from_demo_files(tmp_path: Path) -> None:
    paths = write_demo_hospitals(tmp_path, n_per_hospital=(300, 200, 100), seed=5)
    assert sorted(paths) == ["hospital-a", "hospital-b", "hospital-c"]
    data = load_hospital_data(f"file://{paths['hospital-a']}", STROKE, 0.3, seed=42)
    train, test = data.train, data.test
    assert len(train) == 210 and len(test) == 90
