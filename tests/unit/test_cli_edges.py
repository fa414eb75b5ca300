"""The ``fedrun`` command's edges: wrong flags, wrong files, no cloud, `validate`, `--version`.

main() points the root logger at the captured stderr; test_cli's `keep_root_logger` puts it
back after each test there, and here too (imported below).

Each case is one a new user met: it must end in one clear line (or one line per bad field)
and the documented exit code, never a traceback, a doubled prefix or a wait on the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

from .test_cli import keep_root_logger  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "examples" / "federatedrun-local.yaml"
CLUSTER = ROOT / "examples" / "federatedrun.yaml"  # its hospitals read s3:// tables


def _write(tmp_path: Path, doc: Any, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


def _example(**privacy: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(LOCAL.read_text(encoding="utf-8"))
    doc["spec"]["privacy"].update(privacy)
    return doc


@pytest.mark.parametrize("rows", ["0", "-5", "many"])
def test_budget_refuses_rows_that_are_not_a_positive_number(
    rows: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["budget", str(LOCAL), "--rows", rows])
    assert ended.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --rows:" in err
    assert "Traceback" not in err


def test_a_delta_that_promises_nothing_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write(tmp_path, _example(delta=0.5))
    assert main(["budget", str(run), "--rows", "100"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "spec.privacy.delta: must be less than or equal to 0.01 (got 0.5)" in err


def test_budget_warns_when_delta_is_not_below_one_over_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write(tmp_path, _example(delta=0.01))
    assert main(["budget", str(run), "--rows", "200"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "warning: δ=0.01 is not below 1/200" in out
    eps = [
        float(e)
        for line in out.splitlines()
        if "ε after" in line
        for e in line.split(":")[1].split(",")
    ]
    assert eps and min(eps) >= 0.0  # never a negative ε, whatever δ


def test_a_yaml_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write(tmp_path, "apiVersion: fedrun.io/v1alpha1\nkind: [FederatedRun\n")
    assert main(["render", str(run)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"fedrun: invalid FederatedRun in {run}:\n")
    assert "not valid YAML at line 3, column 1" in err
    assert "<unicode string>" not in err
    assert err.count("invalid FederatedRun") == 1


def test_an_invalid_run_is_reported_once_not_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _example()
    doc["spec"]["rounds"] = 0
    run = _write(tmp_path, doc)
    assert main(["render", str(run)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"fedrun: invalid FederatedRun in {run}:\n  spec.rounds:")
    assert err.count("invalid FederatedRun") == 1


@pytest.mark.parametrize("command", ["render", "budget", "check", "local"])
def test_a_missing_file_is_unreadable_not_invalid(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"
    assert main([command, str(missing)]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        f"fedrun: cannot read {missing}: No such file or directory\n"
    )


def test_version_names_fedrun_and_flower(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == EXIT_OK
    out = capsys.readouterr().out
    assert out == f"fedrun {version('fedrun')} (Flower {version('flwr')})\n"


def test_budget_on_s3_without_credentials_fails_at_once_without_leaving_the_machine(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    off_machine: list[object],
) -> None:
    """No credentials anywhere and the SDK's metadata switch left unset: boto3's chain
    would ask 169.254.169.254 (about 25 s off EC2); fedrun must not ask at all."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    assert main(["budget", str(CLUSTER)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "no AWS credentials are configured" in out
    assert "AWS_EC2_METADATA_DISABLED=false" in out  # how to allow it, on EC2
    assert off_machine == []


def test_the_metadata_service_is_asked_only_when_the_user_allows_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, off_machine: list[object]
) -> None:
    """The control: with the SDK's switch at "false" the chain does reach for the service
    (the test fixture refuses the connection), so the test above can fail."""
    from fedrun_trainer.common.cloud import NoCloudCredentialsError, s3_client

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    with pytest.raises(NoCloudCredentialsError):
        s3_client("s3://bucket/key")
    assert off_machine and all(a[0] == "169.254.169.254" for a in off_machine)  # type: ignore[index]


# --------------------------------------------------------------------------- validate


def test_validate_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "examples").rglob("*.yaml"))
    assert main(["validate", *files]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count(": valid\n") >= 3


def test_validate_reports_a_cel_rule_the_api_server_would_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _example()
    doc["spec"]["minHospitals"] = len(doc["spec"]["hospitals"]) + 1  # a CEL rule on the spec
    run = _write(tmp_path, doc)
    assert main(["validate", str(run)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert f"{run}: FederatedRun stroke-demo: invalid" in out
    assert "the API server would refuse it:\n    spec.minHospitals: minHospitals must not" in out


def test_validate_reports_what_only_fedrun_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _example()
    doc["spec"]["data"] = {
        "targetColumn": "y",
        "features": [{"name": "x", "type": "categorical", "categories": ["Urban", " urban"]}],
    }
    run = _write(tmp_path, doc)
    assert main(["validate", str(run)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "fedrun refuses it:" in out
    assert "the API server would refuse it" not in out  # CEL cannot see this one


def test_validate_checks_every_run_in_a_multi_document_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _example()
    bad = _example()
    bad["metadata"]["name"] = "Not-A-Name"
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([config, good, bad]), encoding="utf-8")
    assert main(["validate", str(path)]) == EXIT_FAILED
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == f"{path} (document 1): ConfigMap x: not a FederatedRun or PrivacyBudget, skipped"
    )
    assert out[1] == f"{path} (document 2): FederatedRun stroke-demo: valid"
    assert out[2] == f"{path} (document 3): FederatedRun Not-A-Name: invalid"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [", "not valid YAML at line 1, column 8"),
        (
            "apiVersion: v1\nkind: ConfigMap\n",
            "no FederatedRun or PrivacyBudget found: nothing was validated",
        ),
    ],
)
def test_validate_fails_on_files_it_cannot_judge(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(_write(tmp_path, text))]) == EXIT_FAILED
    assert expected in capsys.readouterr().out


def test_validate_runs_as_a_command() -> None:
    """The console script end to end: exit status and output as a shell sees them."""
    done = subprocess.run(
        [sys.executable, "-m", "fedrun_cli", "validate", str(LOCAL)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{LOCAL}: FederatedRun stroke-demo: valid\n"


def test_budget_shows_what_each_privacy_budget_would_leave_or_why_it_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _example()
    doc["spec"]["hospitals"][0]["budgetRef"] = "a-budget"
    doc["spec"]["hospitals"][1]["budgetRef"] = "b-budget"
    run = _write(tmp_path, doc)
    budgets = []
    for name, hospital, limit in (("a-budget", "hospital-a", 2.5), ("b-budget", "hospital-b", 0.4)):
        budget = {
            "apiVersion": "fedrun.io/v1alpha1",
            "kind": "PrivacyBudget",
            "metadata": {"name": name},
            "spec": {"hospital": hospital, "dataset": {"label": "demo"}, "epsilon": limit},
        }
        budgets += ["--budget", str(_write(tmp_path, budget, f"{name}.yaml"))]
    assert main(["budget", str(run), "--rows", "500", *budgets]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "budget a-budget: lifetime ε=2.5" in out
    assert "this run reserves ε=1 and would leave 1.500" in out
    assert "refused (BudgetUnavailable): the run needs ε=1 but the budget has 0.4 of 0.4" in out
    assert main(["budget", str(run), "--rows", "500", *budgets[:2]]) == EXIT_FAILED
    assert "budget b-budget: not given (pass its file with --budget)" in capsys.readouterr().out
    budgets[1] = str(tmp_path / "gone.yaml")
    assert main(["budget", str(run), "--rows", "500", *budgets]) == EXIT_USAGE
    assert (
        capsys.readouterr().err
        == f"fedrun: cannot read {tmp_path / 'gone.yaml'}: No such file or directory\n"
    )


def test_validate_checks_privacy_budgets_as_well(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "a-budget"},
        "spec": {"hospital": "hospital-a", "dataset": {"label": "demo"}, "epsilon": 8},
    }
    bad = {**budget, "metadata": {"name": "b-budget"}, "spec": {**budget["spec"], "delta": 0.01}}
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump_all([budget, bad]), encoding="utf-8")
    assert main(["validate", str(path)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert f"{path} (document 1): PrivacyBudget a-budget: valid" in out
    assert f"{path} (document 2): PrivacyBudget b-budget: invalid" in out
    assert "spec.delta: 0.01 is greater than the maximum of 0.001" in out
