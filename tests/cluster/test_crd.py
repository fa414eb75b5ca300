"""The FederatedRun CRD as the real kube-apiserver (Kubernetes 1.36) applies it.

The chart's CRD is installed by real helm (the session's `chart`). Every accept/refuse
case of the models-and-CEL test (tests/unit/test_crd.py, checked there with cel-python) is
sent to the real API server with server-side dry run and must get the same answer;
`kubectl explain` and `kubectl get` are read from the real server; and an upgrade of the
chart with a changed CRD keeps the runs that exist.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, WATCHED_NS, helm_install
from tests.controlplane.cluster import ApiError, RealCluster
from tests.controlplane.node import NodeAgent
from tests.unit.test_crd import BAD, EXAMPLES, IMMUTABLE, changed, minimal

API = "fedrun.io/v1alpha1"
PLURAL = "federatedruns"
NS = "crd-tests"  # not watched by the operator: runs here stay as created


@pytest.fixture(scope="module")
def api(real_cluster: RealCluster, chart: dict[str, Any]) -> RealCluster:
    real_cluster.ensure_namespace(NS)
    return real_cluster


def _in_ns(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = NS
    return obj


def _refusal(api: RealCluster, obj: dict[str, Any]) -> str:
    """The real server's answer to a dry-run create: '' when admitted, else its message."""
    try:
        api.create(_in_ns(obj), strict=True, dry_run=True)
    except ApiError as err:
        if err.code not in (400, 422):
            raise
        return err.message
    return ""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_are_admitted_by_the_real_server(api: RealCluster, path: Path) -> None:
    assert _refusal(api, yaml.safe_load(path.read_text(encoding="utf-8"))) == ""


def test_a_minimal_run_is_admitted_and_defaulted_by_the_real_server(api: RealCluster) -> None:
    stored = api.create(_in_ns(minimal()), dry_run=True)
    assert stored["spec"]["privacy"]["targetEpsilon"] == 1.0
    assert stored["spec"]["strategy"]["name"] == "FedAvg"


@pytest.mark.parametrize(("path", "value", "field"), BAD)
def test_what_the_models_refuse_the_real_server_refuses(
    api: RealCluster, path: str, value: Any, field: str
) -> None:
    message = _refusal(api, changed(path, value))
    assert message, f"the real API server admits {path}={value!r}"
    last = [p for p in field.replace("[", ".").replace("]", "").split(".") if p][-1]
    assert last in message, message


def test_duplicate_categories_are_refused_by_the_real_server(api: RealCluster) -> None:
    """The drift the emulated API hid: the models refused them, the CRD did not."""
    features = [{"name": "s", "type": "categorical", "categories": ["a", "b", "a"]}]
    message = _refusal(api, changed("spec.data", {"targetColumn": "y", "features": features}))
    assert "Duplicate value" in message and "categories" in message


def _stored_run(api: RealCluster, name: str, phase: str | None) -> dict[str, Any]:
    obj = _in_ns(minimal())
    obj["metadata"]["name"] = name
    api.create(obj)
    if phase is not None:
        api.patch_status(API, PLURAL, NS, name, {"phase": phase})
    return api.get(API, PLURAL, NS, name)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.rounds", 4),
        ("spec.privacy.targetEpsilon", 5.0),
        ("spec.strategy", {"name": "FedProx"}),
    ],
)
def test_the_real_server_keeps_a_running_spec_immutable(
    api: RealCluster, path: str, value: Any
) -> None:
    name = f"immutable-{path.split('.')[-1].lower()}"
    stored = _stored_run(api, name, "Running")
    try:
        update = changed(path, value, stored)
        with pytest.raises(ApiError) as refused:
            api.replace(update)
        assert IMMUTABLE.split(": ", 1)[1] in refused.value.message
        # spec.suspend may change while Running.
        fresh = api.get(API, PLURAL, NS, name)
        api.replace(changed("spec.suspend", True, fresh))
    finally:
        api.delete(API, PLURAL, NS, name)


def test_kubectl_explain_reads_the_models_descriptions(api: RealCluster) -> None:
    from fedrun_core.api import PrivacySpec

    out = api.kubectl("explain", "federatedruns.spec.privacy.targetEpsilon").stdout
    description = PrivacySpec.model_fields["target_epsilon"].description
    assert description is not None
    assert " ".join(description.split()[:6]) in " ".join(out.split())


def test_kubectl_get_shows_the_printer_columns(api: RealCluster) -> None:
    from fedrun_render.crd import build_crd

    name = "columns"
    _stored_run(api, name, None)
    try:
        api.patch_status(
            API,
            PLURAL,
            NS,
            name,
            {
                "phase": "Running",
                "progress": "2/3",
                "privacy": {"epsilonSpent": 0.42},
                "metrics": {"auroc": 0.77},
            },
        )
        header, row = api.kubectl("get", PLURAL, "-n", NS, name).stdout.splitlines()[:2]
    finally:
        api.delete(API, PLURAL, NS, name)
    columns = build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert header.split() == ["NAME", *(c["name"].upper() for c in columns)]
    assert row.split()[:5] == [name, "Running", "2/3", "0.42", "0.77"]


def test_an_upgrade_with_a_changed_crd_keeps_the_runs(
    api: RealCluster, node: NodeAgent, tmp_path: Path
) -> None:
    name = "survives-upgrade"
    before = _stored_run(api, name, "Running")
    changed_chart = tmp_path / "fedrun"
    shutil.copytree(REPO / "charts" / "fedrun", changed_chart)
    crd_file = changed_chart / "files" / "crds" / "federatedrun.yaml"
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    crd["spec"]["versions"][0]["additionalPrinterColumns"].append(
        {"name": "Target", "type": "number", "jsonPath": ".spec.privacy.targetEpsilon"}
    )
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False), encoding="utf-8")
    values = (
        f"watchNamespaces={{{WATCHED_NS}}}",
        f"serverUrl={node.server_url_template}",
        "logFormat=text",
    )
    try:
        done = helm_install(api, changed_chart, *values)
        assert done.returncode == 0, done.stderr
        after = api.get(API, PLURAL, NS, name)
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["spec"] == before["spec"] and after["status"] == before["status"]
        header = api.kubectl("get", PLURAL, "-n", NS).stdout.splitlines()[0]
        assert header.split()[-1] == "TARGET"
    finally:
        restored = helm_install(api, REPO / "charts" / "fedrun", *values)
        api.delete(API, PLURAL, NS, name)
    assert restored.returncode == 0, restored.stderr
