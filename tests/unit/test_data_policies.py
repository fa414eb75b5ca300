"""Missing-value policies, category matching, booleans and the counts a hospital reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fedrun_core.api import DataSpec, Feature
from fedrun_core.schema import ColumnCounts, DataCounts, table_schema
from fedrun_core.values import as_boolean, as_number, category_key, missing_markers
from fedrun_trainer.common.data import (
    INDICATOR_VALUE,
    DataError,
    Inspection,
    Table,
    inspect,
    load_table,
    prepare,
)

Q = INDICATOR_VALUE


def spec(*features: dict[str, Any], **data: Any) -> DataSpec:
    return DataSpec.model_validate({"targetColumn": "y", "features": list(features), **data})


def csv(tmp_path: Path, text: str) -> pd.DataFrame:
    path = tmp_path / "h.csv"
    path.write_text(text)
    return load_table(str(path), "csv")


def check(tmp_path: Path, data: DataSpec, text: str) -> Inspection:
    return inspect(csv(tmp_path, text), table_schema(data), "h.csv")


def table(tmp_path: Path, data: DataSpec, text: str) -> Table:
    return prepare(csv(tmp_path, text), data, "h.csv")


AGE = {"name": "age", "type": "numeric", "min": 0.0, "max": 100.0}


# --------------------------------------------------------------------------- cells


def test_category_keys_compare_numbers_by_value_and_text_trimmed_without_case() -> None:
    assert category_key("1") == category_key("1.0") == category_key(" 01 ") == category_key("1e0")
    assert category_key("Male") == category_key("male ") == category_key(" MALE")
    assert category_key("1") != category_key("10") and category_key("M") != category_key("Male")
    assert as_number("nan") is None and as_number("inf") is None and as_number("1_0") is None


def test_booleans_read_words_and_numbers() -> None:
    for word in ("1", "1.0", "yes", "YES", " y", "True", "t"):
        assert as_boolean(word) is True, word
    for word in ("0", "0.0", "no", "No ", "n", "false", "F"):
        assert as_boolean(word) is False, word
    for word in ("2", "maybe", "", "0.5"):
        assert as_boolean(word) is None, word


def test_missing_markers_default_and_configured() -> None:
    default = missing_markers(None)
    assert {"", "na", "n/a", "nan", "null", "none", "?", "."} <= default
    assert missing_markers(["-"]) == frozenset({"", "-"})


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("feature", "words"),
    [
        ({"name": "c", "type": "categorical", "categories": ["1", "1.0"]}, "same category"),
        ({"name": "c", "type": "categorical", "categories": ["Male", "male "]}, "same category"),
        (
            {"name": "c", "type": "categorical", "categories": ["Male"], "aliases": {"M": "Man"}},
            "not one of the categories",
        ),
        (
            {
                "name": "c",
                "type": "categorical",
                "categories": ["Male", "Female"],
                "aliases": {"female": "Male"},
            },
            "written like the category 'Female'",
        ),
    ],
)
def test_ambiguous_categories_are_refused(feature: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Feature.model_validate(feature)


# --------------------------------------------------------------------------- policies

GAPS = "age,y\n50,1\n,0\nNA,1\n 30 ,0\n?,0\n70,1\n"


def test_missing_error_names_first_row_column_and_count(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        table(tmp_path, spec(AGE), GAPS)
    assert str(err.value) == "h.csv: line 3, column 'age': missing value (3 rows in all)"


def test_impute_fills_the_agreed_value_flags_it_and_counts(tmp_path: Path) -> None:
    data = spec({**AGE, "missing": "impute", "fill": 50.0, "indicator": True})
    result = check(tmp_path, data, GAPS)
    assert result.problems == [] and result.table is not None
    assert result.table.feature_names == ["age", "age_missing"]
    assert result.table.x[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.0, -0.4, 0.0, 0.4])
    assert result.table.x[:, 1].tolist() == [0, Q, Q, 0, Q, 0]
    assert result.counts == DataCounts(6, 6, 0, (ColumnCounts("age", missing=3, imputed=3),))


def test_drop_row_drops_and_counts_the_union(tmp_path: Path) -> None:
    data = spec(
        {**AGE, "missing": "dropRow"},
        {"name": "bp", "type": "numeric", "missing": "dropRow"},
    )
    text = "age,bp,y\n50,1,1\n,2,0\n,,1\n30,,0\n60,3,0\n70,4,1\n"
    result = check(tmp_path, data, text)
    assert result.table is not None and len(result.table) == 3
    assert result.table.y.tolist() == [1, 0, 1]
    assert result.counts == DataCounts(
        6, 3, 3, (ColumnCounts("age", 2, dropped=2), ColumnCounts("bp", 2, dropped=2))
    )


def test_a_policy_that_leaves_too_few_of_a_class_fails_the_hospital(tmp_path: Path) -> None:
    data = spec({**AGE, "missing": "dropRow"}, minRowsPerClass=2)
    assert len(table(tmp_path, data, "age,y\n50,1\n,1\n20,0\n30,0\n,1\n70,1\n")) == 4
    with pytest.raises(
        DataError, match=r"too few.*3 of 5 rows used, 2 of class 0 and 1 of class 1"
    ):
        table(tmp_path, data, "age,y\n50,1\n,1\n20,0\n30,0\n,1\n")


def test_configured_missing_values_replace_the_default_set(tmp_path: Path) -> None:
    data = spec({**AGE, "missing": "impute", "fill": 0.0}, missingValues=["-", "unknown"])
    ok = check(tmp_path, data, "age,y\n-,1\n UNKNOWN ,0\n,1\n40,0\n")
    assert ok.counts.columns == (ColumnCounts("age", missing=3, imputed=3),)
    with pytest.raises(DataError, match=r"line 2, column 'age': not a number$"):
        table(tmp_path, data, "age,y\n?,1\n40,0\n")


def test_missing_target_fails_or_drops_as_declared(tmp_path: Path) -> None:
    text = "age,y\n50,1\n60,\n20,0\n70,NA\n30,1\n"
    with pytest.raises(DataError, match=r"line 3, column 'y': missing value \(2 rows in all\)"):
        table(tmp_path, spec(AGE), text)
    result = check(tmp_path, spec(AGE, targetMissing="dropRow"), text)
    assert result.table is not None and result.table.y.tolist() == [1, 0, 1]
    assert result.counts == DataCounts(5, 3, 2, (ColumnCounts("y", 2, dropped=2),))


def test_target_words_are_booleans(tmp_path: Path) -> None:
    result = table(tmp_path, spec(AGE), "age,y\n50,yes\n60,No\n20,1.0\n70,false\n")
    assert result.y.tolist() == [1, 0, 1, 0]


# --------------------------------------------------------------------------- categories

SEX = {"name": "sex", "type": "categorical", "categories": ["Female", "Male"]}
CP = {"name": "cp", "type": "categorical", "categories": ["1.0", "2.0", "3.0", "4.0"]}


def test_number_codes_and_trimmed_words_match_their_category(tmp_path: Path) -> None:
    text = "cp,sex,y\n1,female,1\n4,Male ,0\n 2.0 ,FEMALE,1\n03,male,0\n"
    result = table(tmp_path, spec(CP, SEX), text)
    assert result.feature_names == [
        "cp=1.0", "cp=2.0", "cp=3.0", "cp=4.0", "sex=Female", "sex=Male"
    ]  # fmt: skip
    assert (result.x > 0).astype(int).tolist() == [
        [1, 0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0, 1],
        [0, 1, 0, 0, 1, 0],
        [0, 0, 1, 0, 0, 1],
    ]


def test_aliases_map_other_spellings(tmp_path: Path) -> None:
    sex = {**SEX, "aliases": {"F": "Female", "M": "Male", "w": "Female"}}
    result = table(tmp_path, spec(sex), "sex,y\nM,1\nf,0\nW,1\nMale,0\n")
    assert result.x.argmax(axis=1).tolist() == [1, 0, 0, 1]


def test_unknown_category_error_names_row_and_keeps_the_value_local(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        table(tmp_path, spec(SEX), "sex,y\nFemale,1\nX-ray,0\nMale,1\nX-ray,0\n")
    assert str(err.value) == (
        "h.csv: line 3, column 'sex': unknown category (expected one of 'Female', 'Male') "
        "(2 rows in all)"
    )
    assert "X-ray" in err.value.detail


def test_unknown_other_goes_to_its_own_column_and_is_counted(tmp_path: Path) -> None:
    data = spec({**SEX, "unknown": "other"})
    result = check(tmp_path, data, "sex,y\nFemale,1\nX,0\nMale,1\nY,0\n,1\n")
    assert [p.public for p in result.problems] == [
        "h.csv: line 6, column 'sex': missing value"
    ]  # a gap is not an unknown category
    result = check(tmp_path, data, "sex,y\nFemale,1\nX,0\nMale,1\nY,0\n")
    assert result.table is not None
    assert result.table.feature_names == ["sex=Female", "sex=Male", "sex=(other)"]
    assert result.table.x.argmax(axis=1).tolist() == [0, 2, 1, 2]
    assert result.counts.columns == (ColumnCounts("sex", other=2),)


def test_a_category_written_like_a_missing_marker_is_a_category(tmp_path: Path) -> None:
    data = spec({"name": "g", "type": "categorical", "categories": ["A", "NA"]})
    result = check(tmp_path, data, "g,y\nNA,1\nA,0\n")
    assert result.problems == [] and result.counts.columns == ()


def test_categorical_impute_takes_the_fill_category(tmp_path: Path) -> None:
    data = spec({**SEX, "missing": "impute", "fillCategory": "Female", "indicator": True})
    result = table(tmp_path, data, "sex,y\nMale,1\n?,0\n")
    assert result.feature_names == ["sex=Female", "sex=Male", "sex_missing"]
    assert result.x.tolist() == [[0, Q, 0], [Q, 0, Q]]


# --------------------------------------------------------------------------- booleans


def test_boolean_feature(tmp_path: Path) -> None:
    data = spec({"name": "smoker", "type": "boolean", "missing": "impute", "fill": 0.0})
    result = table(tmp_path, data, "smoker,y\nyes,1\nNo,0\n1,1\n0.0,0\nTRUE,1\n,0\n")
    assert result.x[:, 0].tolist() == [Q, 0, Q, 0, Q, 0]
    with pytest.raises(DataError, match=r"line 3, column 'smoker': not a boolean"):
        table(tmp_path, data, "smoker,y\nyes,1\nsometimes,0\n")


# --------------------------------------------------------------------------- all at once


def test_inspect_lists_every_problem_and_training_raises_the_first(tmp_path: Path) -> None:
    data = spec(AGE, SEX)
    text = "age,sex,y\nold,Female,1\n,Male,0\n40,Alien,1\n50,Male,2\n"
    result = check(tmp_path, data, text)
    assert result.table is None
    assert [p.public for p in result.problems] == [
        "h.csv: target column 'y' must be binary (0/1): 1 row is not (first at line 5)",
        "h.csv: line 2, column 'age': not a number",
        "h.csv: line 3, column 'age': missing value",
        "h.csv: line 4, column 'sex': unknown category (expected one of 'Female', 'Male')",
    ]
    with pytest.raises(DataError, match=r"\(and 3 more problems; `fedrun check` lists them\)$"):
        result.raise_first()


def test_extra_and_reordered_columns_are_fine(tmp_path: Path) -> None:
    result = table(tmp_path, spec(AGE, SEX), "note,y,sex,age\nx,1,Male,50\ny,0,Female,20\n")
    assert result.feature_names == ["age", "sex=Female", "sex=Male"]
    assert result.x[:, 0].tolist() == pytest.approx([0.0, -0.6])


def test_parquet_codes_and_nulls(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"cp": [1.0, 4.0, None, 2.0], "age": [50.0, np.nan, 30.0, 20.0], "y": [1, 0, 1, 0]}
    )
    df.to_parquet(tmp_path / "h.parquet")
    data = spec(
        {**CP, "missing": "dropRow"}, {**AGE, "missing": "impute", "fill": 50.0}, format="parquet"
    )
    result = inspect(load_table(str(tmp_path / "h.parquet"), "parquet"), table_schema(data), "p")
    assert result.table is not None and len(result.table) == 3
    assert result.counts == DataCounts(
        4,
        3,
        1,
        (ColumnCounts("cp", 1, dropped=1), ColumnCounts("age", 1, imputed=1)),
    )


# --------------------------------------------------------------------------- counts


def test_counts_cross_the_wire_and_are_read_as_untrusted() -> None:
    counts = DataCounts(10, 8, 2, (ColumnCounts("age", 3, imputed=1, dropped=2),))
    metrics = {"num_train": 6.0, **counts.to_metrics()}
    assert DataCounts.from_metrics(metrics, ["y", "age"]) == counts
    assert DataCounts.from_metrics({"num_train": 6.0}, ["age"]) is None
    for bad in (
        {**metrics, "data:imputed:age": 11.0},  # more than the rows read
        {**metrics, "data:used": 9.0},  # used + dropped != rows
        {**metrics, "data:imputed:secret": 1.0},  # not a column of the spec
        {**metrics, "data:missing:age": 1.5},
    ):
        assert DataCounts.from_metrics(bad, ["y", "age"]) is None
    assert counts.to_status() == {
        "rows": 10,
        "used": 8,
        "dropped": 2,
        "columns": [{"name": "age", "missing": 3, "imputed": 1, "dropped": 2, "other": 0}],
    }


def test_parquet_columns_of_pandas_types_with_gaps(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "sex": pd.Series(["Female", None, "Male"], dtype="category"),
            "smoker": pd.Series([True, None, False], dtype="boolean"),
            "age": pd.Series([50, None, 30], dtype="Int64"),
            "y": pd.Series([1, 1, 0], dtype="Int64"),
        }
    )
    df.to_parquet(tmp_path / "h.parquet")
    data = spec(
        {**SEX, "missing": "impute", "fillCategory": "Male"},
        {"name": "smoker", "type": "boolean", "missing": "impute", "fill": 0.0},
        {**AGE, "missing": "dropRow"},
        format="parquet",
    )
    result = inspect(load_table(str(tmp_path / "h.parquet"), "parquet"), table_schema(data), "p")
    assert result.problems == [] and result.table is not None
    assert result.table.x.tolist() == [[Q, 0, Q, 0.0], [0, Q, 0, pytest.approx(-0.4)]]
    assert result.counts.dropped == 1


def test_a_numeric_marker_is_missing_in_parquet_as_in_csv(tmp_path: Path) -> None:
    data = spec({**AGE, "missing": "impute", "fill": 50.0}, missingValues=["-999"])
    pd.DataFrame({"age": [30.0, -999.0], "y": [0, 1]}).to_parquet(tmp_path / "h.parquet")
    parquet = inspect(load_table(str(tmp_path / "h.parquet"), "parquet"), table_schema(data), "p")
    text = check(tmp_path, data, "age,y\n30,0\n-999,1\n")
    assert parquet.counts.columns == text.counts.columns == (ColumnCounts("age", 1, imputed=1),)
    assert parquet.table is not None and text.table is not None
    assert parquet.table.x.tolist() == text.table.x.tolist()


def test_a_preset_reads_the_target_column_the_spec_names(tmp_path: Path) -> None:
    from fedrun_cli.demo_data import synthetic_stroke

    df = synthetic_stroke(400, seed=1).rename(columns={"stroke": "label"})
    df.to_csv(tmp_path / "s.csv", index=False)
    data = DataSpec(preset="stroke", target_column="label")
    table_ = prepare(load_table(str(tmp_path / "s.csv"), "csv"), data, "s.csv")
    assert table_.y.sum() == (df["label"] == "1").sum()


def test_a_delimiter_at_every_line_end_does_not_shift_the_columns(tmp_path: Path) -> None:
    result = table(tmp_path, spec(AGE), "age,y\n50,1,\n20,0,\n")
    assert result.y.tolist() == [1, 0] and result.x[:, 0].tolist() == pytest.approx([0.0, -0.6])


def test_header_names_equal_once_trimmed_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"1 column name\(s\) appear more than once") as err:
        csv(tmp_path, "age,age ,y\n1,2,0\n")
    assert "'age'" not in str(err.value) and "'age'" in err.value.detail


def test_ranges_must_be_finite() -> None:
    with pytest.raises(ValidationError, match="finite"):
        Feature.model_validate({"name": "a", "type": "numeric", "min": "-inf", "max": 1.0})


def test_counts_beyond_what_the_operator_reads_are_refused() -> None:
    counts = DataCounts(5 * 10**10, 5 * 10**10, 0)
    assert DataCounts.from_metrics(counts.to_metrics(), ["y"]) is None
