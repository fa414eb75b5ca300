"""`python -m fedrun_cli.terraform_hospitals`: Terraform's outputs to a hospitals: block.

test_terraform.py feeds it the `hospitals` output evaluated from terraform/ itself; these
tests pin its input forms, its YAML and its refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_cli.terraform_hospitals import HospitalsOutputError, hospitals_block, to_yaml
from fedrun_core.api import parse_run

REPO = Path(__file__).resolve().parents[2]


def _entry(hospital: str) -> dict[str, Any]:
    bucket = f"fedrun-{hospital}-123456789012"
    return {
        "bucket": bucket,
        "bucket_uri": f"s3://{bucket}",
        "role_arn": f"arn:aws:iam::123456789012:role/fedrun-{hospital}",
        "kms_key_arn": "arn:aws:kms:eu-central-1:123456789012:key/k1",
        "service_accounts": [f"system:serviceaccount:fedrun:stroke-{hospital}"],
        "ledger_uri": f"s3://{bucket}/fedrun-ledger/fedrun/",
    }


# What `terraform output -json` prints: every output with its sensitivity, type and value.
OUTPUT = {
    "hospitals": {
        "sensitive": False,
        "type": ["object", {}],
        "value": {h: _entry(h) for h in ("hospital-b", "hospital-a")},
    },
    "region": {"sensitive": False, "type": "string", "value": "eu-central-1"},
}


def test_block_from_all_outputs() -> None:
    assert hospitals_block(OUTPUT, "stroke/stroke.csv") == [
        {
            "name": "hospital-a",
            "dataUri": "s3://fedrun-hospital-a-123456789012/stroke/stroke.csv",
            "roleArn": "arn:aws:iam::123456789012:role/fedrun-hospital-a",
        },
        {
            "name": "hospital-b",
            "dataUri": "s3://fedrun-hospital-b-123456789012/stroke/stroke.csv",
            "roleArn": "arn:aws:iam::123456789012:role/fedrun-hospital-b",
        },
    ]


def test_block_from_the_hospitals_output_alone_and_per_hospital_keys() -> None:
    block = hospitals_block(OUTPUT["hospitals"]["value"], "tables/{hospital}.parquet")
    assert [h["dataUri"] for h in block] == [
        "s3://fedrun-hospital-a-123456789012/tables/hospital-a.parquet",
        "s3://fedrun-hospital-b-123456789012/tables/hospital-b.parquet",
    ]


def test_the_block_makes_a_valid_run() -> None:
    example = yaml.safe_load((REPO / "examples" / "federatedrun.yaml").read_text(encoding="utf-8"))
    example["spec"]["hospitals"] = yaml.safe_load(to_yaml(hospitals_block(OUTPUT, "d.csv")))[
        "hospitals"
    ]
    run = parse_run(example)
    assert [h.name for h in run.spec.hospitals] == ["hospital-a", "hospital-b"]


@pytest.mark.parametrize(
    ("tf_output", "data_key", "message"),
    [
        ({"region": {"value": "eu-central-1"}}, "d.csv", "no `hospitals` output"),
        ({"hospitals": {"value": "oops"}}, "d.csv", "no map `value`"),
        (OUTPUT, "/stroke.csv", "no leading '/'"),
        (OUTPUT, "", "no leading '/'"),
        (OUTPUT, "fedrun-ledger/fedrun/x.csv", "where the privacy ledgers are kept"),
        (
            {"hospitals": {"value": {"hospital-a": {**_entry("hospital-a"), "role_arn": "r"}}}},
            "d.csv",
            "hospital 'hospital-a': roleArn",
        ),
        (
            {"hospitals": {"value": {"Hospital_A": _entry("a")}}},
            "d.csv",
            "hospital 'Hospital_A': name",
        ),
        (
            {"hospitals": {"value": {"hospital-a": {"role_arn": "x", "bucket": ""}}}},
            "d.csv",
            "lacks bucket or role_arn",
        ),
    ],
)
def test_bad_outputs_and_keys_are_refused(
    tf_output: dict[str, Any], data_key: str, message: str
) -> None:
    with pytest.raises(HospitalsOutputError, match=message.replace("(", r"\(")):
        hospitals_block(tf_output, data_key)


def _module(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrun_cli.terraform_hospitals", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_command_reads_terraform_output_on_stdin() -> None:
    result = _module("--data-key", "stroke/stroke.csv", "--indent", "2", stdin=json.dumps(OUTPUT))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "  hospitals:"
    assert lines[1] == "    - name: hospital-a"
    assert yaml.safe_load(result.stdout)["hospitals"] == hospitals_block(
        OUTPUT, "stroke/stroke.csv"
    )


def test_command_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text(json.dumps(OUTPUT), encoding="utf-8")
    result = _module(str(path), stdin="")
    assert result.returncode == 0, result.stderr
    assert len(yaml.safe_load(result.stdout)["hospitals"]) == 2


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (
            "not json",
            "stdin is not the JSON of `terraform output -json`: Expecting value at "
            "line 1, column 1",
        ),
        ("", "stdin is not the JSON of `terraform output -json` (it is empty)"),
        ("[1, 2]", "stdin: expected a JSON object"),
        ("{}", "no `hospitals` output"),
    ],
)
def test_command_explains_bad_input(stdin: str, message: str) -> None:
    result = _module(stdin=stdin)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("fedrun hospitals: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_command_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    result = _module(str(tmp_path / "missing.json"), stdin="")
    assert result.returncode == 2
    assert result.stderr == (
        f"fedrun hospitals: cannot read {tmp_path / 'missing.json'}: No such file or directory\n"
    )
