"""Real stroke records exported the way real hospitals export them (:mod:`tests.messydata`:
four hospitals, each with one defect injected).

Under strict policies ``fedrun check`` finds each defect with its rows and column; under
declared policies (impute, aliases) the run succeeds and the status carries each hospital's
counts. A ``data:`` block from ``fedrun schema infer``, pasted unchanged, runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from fedrun_cli.main import main as fedrun_main
from fedrun_core.api import DataSpec
from fedrun_trainer.common.data import DataError, load_table, prepare

from ..messydata import DECLARED, HOSPITALS, STRICT, MessyHospitals, write_messy_hospitals
from .conftest import example_run

pytestmark = pytest.mark.realdata


def write_run(tmp_path: Path, paths: dict[str, Path], data: dict[str, Any], name: str) -> Path:
    doc = example_run(
        data=data,
        minHospitals=len(paths),
        hospitals=[{"name": h, "dataUri": p.resolve().as_uri()} for h, p in paths.items()],
    )
    doc["metadata"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def messy(tmp_path: Path, stroke_csv: Path) -> MessyHospitals:
    return write_messy_hospitals(stroke_csv, tmp_path / "data")


def test_check_finds_every_injected_defect_with_rows_and_column(
    tmp_path: Path, messy: MessyHospitals, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_run(
        tmp_path, messy.paths, {"targetColumn": "stroke", "features": STRICT}, "strict"
    )
    assert fedrun_main(["check", str(spec)]) == 1
    out = capsys.readouterr().out
    lines = messy.glucose_gap_lines
    first = lines[0]
    assert (
        f"hospital-a.csv: line {first}, column 'avg_glucose_level': missing value "
        f"({len(lines)} rows in all)"
    ) in out
    assert "lines " + ", ".join(str(n) for n in lines[:10]) + f" and {len(lines) - 10} more" in out
    assert "hospital-b.csv: line" in out and "column 'gender': unknown category" in out
    assert "found 'M'" in out or "found 'F'" in out  # the check is local: values may show
    assert "hospital-c (" in out and "hospital-d (" in out
    report = {h: out.split(f"{h} (")[1].split("\nhospital-")[0] for h in HOSPITALS}
    assert report["hospital-c"].rstrip().endswith("ok")  # "?" is a missing marker: imputed
    assert f"column 'bmi': {messy.question_marks} missing" in report["hospital-c"]
    assert report["hospital-d"].rstrip().endswith("ok")  # extra, reordered columns are fine
    # The training path fails the hospital with the same row and column, and no value.
    data = DataSpec.model_validate({"targetColumn": "stroke", "features": STRICT})
    path = str(messy.paths["hospital-b"])
    with pytest.raises(DataError) as err:
        prepare(load_table(path, "csv"), data, path)
    assert "column 'gender': unknown category" in str(err.value)
    assert "'M'" not in str(err.value) and "'F'" not in str(err.value)


def test_declared_policies_train_and_the_status_counts_what_they_did(
    tmp_path: Path, messy: MessyHospitals
) -> None:
    spec = write_run(
        tmp_path, messy.paths, {"targetColumn": "stroke", "features": DECLARED}, "messy"
    )
    assert fedrun_main(["check", str(spec)]) == 0
    out = tmp_path / "out"
    code = fedrun_main(["local", str(spec), "--out", str(out), "--no-progress"])
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert code == 0, status.get("message")
    assert status["phase"] == "Succeeded"
    assert status["privacy"]["epsilonSpent"] <= 1.0
    assert status["metrics"]["auroc"] >= 0.7
    assert 0.7 <= status["metrics"]["pooledAuroc"] <= 1.0  # from summed score counts
    data = {h["name"]: h["data"] for h in status["hospitals"]}
    for name, rows in messy.rows.items():
        assert data[name]["rows"] == data[name]["used"] == rows
    glucose = {c["name"]: c for c in data["hospital-a"]["columns"]}["avg_glucose_level"]
    gaps = len(messy.glucose_gap_lines)
    assert glucose == {"name": "avg_glucose_level", "missing": gaps, "imputed": gaps,
                       "dropped": 0, "other": 0}  # fmt: skip
    bmi = {c["name"]: c for c in data["hospital-c"]["columns"]}["bmi"]
    assert bmi["missing"] == bmi["imputed"] == messy.question_marks > 0
    assert all(c["name"] != "gender" for c in data["hospital-b"]["columns"])  # all matched


def test_an_inferred_schema_pasted_unchanged_runs(
    tmp_path: Path, stroke_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "real"
    assert fedrun_main(["demo-data", str(data_dir), "--real", str(stroke_csv)]) == 0
    capsys.readouterr()
    assert fedrun_main(["schema", "infer", str(data_dir / "hospital-a.csv")]) == 0
    block = yaml.safe_load(capsys.readouterr().out)["data"]
    assert block["targetColumn"] == "stroke"  # found without --target
    names = [f["name"] for f in block["features"]]
    assert "id" not in names and len(names) == 10
    paths = {h: data_dir / f"{h}.csv" for h in ("hospital-a", "hospital-b", "hospital-c")}
    spec = write_run(tmp_path, paths, block, "inferred")
    out = tmp_path / "out"
    code = fedrun_main(["local", str(spec), "--out", str(out), "--no-progress"])
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert code == 0, status.get("message")
    assert status["phase"] == "Succeeded" and status["metrics"]["auroc"] >= 0.7
    assert all(isinstance(h.get("data"), dict) for h in status["hospitals"])


def test_schema_infer_suggests_policies_for_gaps(
    tmp_path: Path, messy: MessyHospitals, capsys: pytest.CaptureFixture[str]
) -> None:
    path = messy.paths["hospital-a"]
    assert fedrun_main(["schema", "infer", str(path), "--target", "stroke"]) == 0
    block = yaml.safe_load(capsys.readouterr().out)["data"]
    glucose = {f["name"]: f for f in block["features"]}["avg_glucose_level"]
    assert glucose["missing"] == "impute" and glucose["indicator"] is True
    assert glucose["min"] <= 55.0 and glucose["max"] >= 270.0  # widened, not the exact extremes
    values = pd.to_numeric(load_table(str(path), "csv")["avg_glucose_level"], errors="coerce")
    assert glucose["min"] != values.min() and glucose["max"] != values.max()
    # The suggestion is itself a valid data block that reads this hospital's file.
    spec = DataSpec.model_validate(block)
    assert len(prepare(load_table(str(path), "csv"), spec, str(path))) == messy.rows["hospital-a"]
