"""``fedrun schema infer`` on odd files: its block always loads back as a valid data spec."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedrun_cli.main import main as fedrun_main
from fedrun_cli.tables import infer_schema, render_data_block
from fedrun_core.api import DataSpec


def block_for(df: pd.DataFrame, target: str = "y") -> dict:  # type: ignore[type-arg]
    name, suggestions = infer_schema(df.astype(str), target)
    loaded: dict = yaml.safe_load(render_data_block(name, suggestions))["data"]  # type: ignore[type-arg]
    DataSpec.model_validate(loaded)
    return loaded


def test_large_numbers_with_a_narrow_spread_keep_min_below_max() -> None:
    df = pd.DataFrame({"x": [1e9 + 0.5, 1e9 + 0.7, 1e9 + 0.9] * 5, "y": [0, 1, 0] * 5})
    x = block_for(df)["features"][0]
    assert x["min"] <= 1e9 + 0.5 and x["max"] >= 1e9 + 0.9 and x["min"] < x["max"]


def test_small_fills_are_written_as_yaml_numbers() -> None:
    df = pd.DataFrame({"x": ["0.00006", "", "0.00007", "0.00005"] * 5, "y": [0, 1] * 10})
    x = block_for(df)["features"][0]
    assert x["missing"] == "impute" and isinstance(x["fill"], float)


def test_long_texts_and_ids_are_left_out(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"note": ["x" * 200, "y" * 200] * 10, "id": list(range(20)), "y": [0, 1] * 10}
    )
    _, suggestions = infer_schema(df.astype(str), "y")
    assert [s.feature for s in suggestions] == [None, None]
    path = tmp_path / "h.csv"
    df.to_csv(path, index=False)
    assert fedrun_main(["schema", "infer", str(path), "--target", "y"]) == 1


def test_numbers_too_large_to_scale_are_left_out() -> None:
    huge = ["1.7e308", "-1.7e308", "2.5"] * 5
    df = pd.DataFrame({"x": huge, "ok": ["a", "b", "c"] * 5, "y": [0, 1, 0] * 5})
    assert [f["name"] for f in block_for(df)["features"]] == ["ok"]
    df["x"] = ["1e308", "1.5", "2.5"] * 5  # large, but a range exists
    x = block_for(df)["features"][0]
    assert x["min"] <= 1.5 and x["max"] >= 1e308


def test_a_target_that_is_not_a_column_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.csv"
    pd.DataFrame({"x": [1, 2], "y": [0, 1]}).to_csv(path, index=False)
    assert fedrun_main(["schema", "infer", str(path), "--target", "outcome"]) == 1
    assert "--target 'outcome' is not a column of the file" in capsys.readouterr().err


def test_check_names_a_hospital_the_run_does_not_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "federatedrun-local.yaml"
    assert fedrun_main(["check", str(example), "--hospital", "nowhere"]) == 2
    assert "has no hospital 'nowhere'" in capsys.readouterr().err
