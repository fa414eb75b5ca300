"""Bad data fails its hospital, named with file and row; the run follows minHospitals.

The value found stays in the hospital's own log: the status and the pod's termination
message (what the operator copies into the FederatedRun and Events) only locate it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrun_cli.demo_data import synthetic_stroke

from .conftest import example_run

# Planted in the non-numeric file: it must reach the hospital's log and nothing else.
VALUE = "forty"


def _write_bad_files(d: Path) -> dict[str, tuple[Path, list[str]]]:
    """Five broken hospital files and the words each failure message must contain."""
    d.mkdir(parents=True, exist_ok=True)
    good = synthetic_stroke(300, seed=11)
    cases: dict[str, tuple[Path, list[str]]] = {}

    cases["missing"] = (d / "missing.csv", ["missing.csv"])  # never written

    wrong = good.drop(columns=["avg_glucose_level"])
    wrong.to_csv(d / "wrong-columns.csv", index=False)
    cases["wrong-columns"] = (d / "wrong-columns.csv", ["wrong-columns.csv", "avg_glucose_level"])

    text = good.astype(str)
    text.loc[text.index[6], "age"] = VALUE  # data row 7 -> line 8 of the file
    text.to_csv(d / "non-numeric.csv", index=False)
    cases["non-numeric"] = (
        d / "non-numeric.csv",
        ["non-numeric.csv", "line 8, column 'age': not a number"],
    )

    multi = good.copy()
    multi["stroke"] = multi["stroke"].astype(str)
    multi.loc[multi.index[3], "stroke"] = "2"
    multi.to_csv(d / "non-binary.csv", index=False)
    cases["non-binary"] = (
        d / "non-binary.csv",
        ["non-binary.csv", "target column 'stroke' must be binary (0/1): 1 row is not", "line 5"],
    )

    (d / "empty.csv").write_text("", encoding="utf-8")
    cases["empty"] = (d / "empty.csv", ["empty.csv"])
    return cases


def test_each_bad_file_fails_only_its_hospital_and_the_run_succeeds(tmp_path, cluster_factory):
    bad = _write_bad_files(tmp_path / "bad")
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    hospitals = []
    for name in ("good-a", "good-b"):
        path = good_dir / f"{name}.csv"
        synthetic_stroke(700, seed=len(name) + (1 if name.endswith("a") else 2)).to_csv(
            path, index=False
        )
        hospitals.append({"name": name, "dataUri": path.as_uri()})
    hospitals += [{"name": name, "dataUri": path.as_uri()} for name, (path, _) in bad.items()]
    doc = example_run(rounds=2, minHospitals=2, roundTimeoutSeconds=90, hospitals=hospitals)
    cluster = cluster_factory(doc)
    cluster.start()
    status = cluster.wait(timeout_s=400)

    assert status["phase"] == "Succeeded", status.get("message")
    by_name = {h["name"]: h for h in status["hospitals"]}
    assert by_name["good-a"]["state"] == by_name["good-b"]["state"] == "Done"
    for name, (_, words) in bad.items():
        entry = by_name[name]
        assert entry["state"] == "Failed", (name, entry)
        for word in words:
            assert word in entry["message"], (name, word, entry["message"])
        # The hospital's process exited non-zero with the same reason, as a Job's pod would.
        pod = cluster.hospitals[name]
        assert pod.exit_code == 1, (name, pod.exit_code)
        assert words[0] in pod.termination_message()
    # The value is in the hospital's own log only, for whoever may read its data.
    pod = cluster.hospitals["non-numeric"]
    assert VALUE not in by_name["non-numeric"]["message"]
    assert VALUE not in pod.termination_message()
    assert f"found '{VALUE}'" in pod.log_path.read_text(encoding="utf-8")


def test_too_few_good_hospitals_fails_the_run_without_hanging(tmp_path, cluster_factory):
    good = tmp_path / "good.csv"
    synthetic_stroke(500, seed=4).to_csv(good, index=False)
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    non_binary = tmp_path / "labels.csv"
    frame = synthetic_stroke(200, seed=5)
    frame["stroke"] = 7
    pd.DataFrame(frame).to_csv(non_binary, index=False)
    doc = example_run(
        rounds=2,
        minHospitals=2,
        roundTimeoutSeconds=60,
        hospitals=[
            {"name": "good", "dataUri": good.as_uri()},
            {"name": "empty", "dataUri": empty.as_uri()},
            {"name": "labels", "dataUri": non_binary.as_uri()},
        ],
    )
    cluster = cluster_factory(doc)
    cluster.start()
    status = cluster.wait(timeout_s=300)

    assert status["phase"] == "Failed"
    assert status["message"].startswith("2 of 3 hospitals failed (")
    assert "the other 1 cannot reach minHospitals 2" in status["message"]
    assert "empty" in status["message"] and "labels" in status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "TooFewHospitals"
