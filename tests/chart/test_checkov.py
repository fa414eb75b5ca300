"""checkov over the chart and over the children the operator renders: zero failed checks.

A check that does not apply is skipped where the object is written, with its reason:
checkov skip annotations in the chart's templates and in fedrun_render/workloads.py. The
few skips that belong to how these tests render (not to the objects) sit in
SKIPS_HERE below, each with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core.api import load_run, parse_run
from fedrun_render.workloads import render_run, to_yaml

from .tools import CHART, CI_VALUES, REPO, checkov, helm, render_text, run, values_id

EXAMPLES = sorted((REPO / "examples").glob("federatedrun*.yaml"))
SCANNED = [f"chart-{values_id(v)}.yaml" for v in CI_VALUES] + [
    f"run-{e.stem}.yaml" for e in EXAMPLES
]

# (scanned file, check) -> why the check does not apply there.
SKIPS_HERE = {
    (f"run-{e.stem}.yaml", "CKV_K8S_21"): (
        "the example leaves its namespace to `kubectl apply -n` or names `default`; the "
        "operator creates a run's children in the run's own namespace, whichever that is"
    )
    for e in EXAMPLES
    if load_run(e).namespace == "default"
}
# checkov's helm runner renders the chart into the `default` namespace and cannot be told
# otherwise; the scans above render it into fedrun-system and do run CKV_K8S_21.
HELM_RUNNER_SKIPS = {"CKV_K8S_21": "checkov's helm runner always renders into `default`"}


def _checkov(*args: str) -> dict[str, Any]:
    done = run(checkov(), "--skip-download", "--output", "json", *args, check=False)
    assert done.returncode in (0, 1), done.stderr  # 1: failed checks (reported below)
    report = json.loads(done.stdout)
    if isinstance(report, list):  # one report per framework
        (report,) = report
    assert isinstance(report, dict)
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over every rendered chart variant and every example's children."""
    out = tmp_path_factory.mktemp("checkov")
    for values in CI_VALUES:
        (out / f"chart-{values_id(values)}.yaml").write_text(render_text(values))
    for example in EXAMPLES:
        (out / f"run-{example.stem}.yaml").write_text(to_yaml(render_run(load_run(example))))
    return _checkov("--framework", "kubernetes", "--directory", str(out))


def checks(report: dict[str, Any], kind: str, file: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = report["results"][kind]
    return [c for c in found if Path(c["file_path"]).name == file]


@pytest.mark.parametrize("file", SCANNED)
def test_no_failed_checks(report: dict[str, Any], file: str) -> None:
    passed = checks(report, "passed_checks", file)
    assert len(passed) > 20, f"checkov scanned nothing in {file}"
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']}"
        for c in checks(report, "failed_checks", file)
        if (file, c["check_id"]) not in SKIPS_HERE
    ]
    assert failed == []


@pytest.mark.parametrize("file", SCANNED)
def test_every_skip_says_why(report: dict[str, Any], file: str) -> None:
    for check in checks(report, "skipped_checks", file):
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.split()) >= 6, f"{file}: {check['check_id']} skipped with {reason!r}"


def test_skip_annotations_are_well_formed() -> None:
    # checkov splits the value at "=": a second "=" in the reason breaks its parser.
    texts = [render_text(v) for v in CI_VALUES]
    texts += [to_yaml(render_run(load_run(e))) for e in EXAMPLES]
    count = 0
    for text in texts:
        for m in yaml.safe_load_all(text):
            for key, value in ((m or {}).get("metadata", {}).get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    count += 1
                    check, sep, reason = value.partition("=")
                    assert sep and "=" not in reason, value
                    assert key == f"checkov.io/skip-{check.lower().replace('_', '-')}", key
    assert count > 0


def test_chart_under_checkov_s_helm_runner() -> None:
    # checkov renders the chart itself (helm from PATH, as tools.tool_env sets it); when
    # helm is missing it scans nothing and passes, hence helm() and the count.
    helm()
    report = _checkov(
        "--framework",
        "helm",
        "--directory",
        str(CHART),
        "--skip-check",
        ",".join(HELM_RUNNER_SKIPS),
    )
    assert report["summary"]["passed"] > 50
    failed = [f"{c['check_id']}: {c['resource']}" for c in report["results"]["failed_checks"]]
    assert failed == []


def skipped_checks(manifest: dict[str, Any]) -> set[str]:
    annotations = manifest["metadata"].get("annotations") or {}
    return {v.partition("=")[0] for k, v in annotations.items() if k.startswith("checkov.io/skip")}


def test_run_children_skip_only_what_does_not_fit() -> None:
    obj = yaml.safe_load((REPO / "examples" / "federatedrun-local.yaml").read_text())
    bare = render_run(parse_run(obj))
    full = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    obj["spec"]["image"] = "ghcr.io/fedrun/trainer@sha256:" + "0" * 64
    obj["spec"]["server"] = {"resources": full}
    for hospital in obj["spec"]["hospitals"]:
        hospital["resources"] = full
    pinned = render_run(parse_run(obj))
    for before, after in zip(bare, pinned, strict=True):
        if before["kind"] not in ("Deployment", "Job"):
            assert skipped_checks(before) == set()
            continue
        assert skipped_checks(before) == {
            "CKV_K8S_10",
            "CKV_K8S_11",
            "CKV_K8S_12",
            "CKV_K8S_13",
            "CKV_K8S_15",
            "CKV_K8S_43",
        }
        assert skipped_checks(after) == {"CKV_K8S_15"}
