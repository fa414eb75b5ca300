"""Drift decisions on rendered vs observed children (fedrun_operator.children)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fedrun_core.api import load_run
from fedrun_operator.children import Action, covers, plan_child
from fedrun_render.workloads import render_run

ROOT = Path(__file__).resolve().parents[2]
RUN = load_run(ROOT / "examples" / "federatedrun-local.yaml")
CHILDREN = {(m["kind"], m["metadata"]["name"]): m for m in render_run(RUN)}


def stored(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as an API server keeps it: metadata filled in, defaults added, a status."""
    out = copy.deepcopy(obj)
    out["metadata"] |= {"uid": "u-1", "resourceVersion": "7", "creationTimestamp": "x"}
    if out["kind"] == "Deployment":
        out["spec"]["progressDeadlineSeconds"] = 600
        for container in out["spec"]["template"]["spec"]["containers"]:
            container["terminationMessagePath"] = "/dev/termination-log"
        out["status"] = {"replicas": 1}
    return out


def test_a_missing_child_is_created() -> None:
    cm = CHILDREN[("ConfigMap", f"{RUN.name}-config")]
    assert plan_child(cm, None).action is Action.CREATE


def test_defaults_the_api_server_adds_are_not_drift() -> None:
    for desired in CHILDREN.values():
        assert plan_child(desired, stored(desired)).action is Action.NONE, desired["kind"]


def test_a_hand_edited_deployment_is_set_back_with_a_minimal_patch() -> None:
    dep = CHILDREN[("Deployment", f"{RUN.name}-server")]
    edited = stored(dep)
    edited["spec"]["replicas"] = 3
    edited["metadata"]["labels"]["fedrun.io/run"] = "other"
    plan = plan_child(dep, edited)
    assert plan.action is Action.PATCH
    assert plan.patch == {
        "metadata": {"labels": dep["metadata"]["labels"]},
        "spec": {"replicas": dep["spec"]["replicas"]},
    }
    assert set(plan.drift) == {"metadata.labels.fedrun.io/run", "spec.replicas"}


def test_a_changed_job_template_means_replace_not_patch() -> None:
    name = f"{RUN.name}-{RUN.spec.hospitals[0].name}"
    job = CHILDREN[("Job", name)]
    edited = stored(job)
    edited["spec"]["template"]["spec"]["containers"][0]["args"] = ["sleep", "inf"]
    assert plan_child(job, edited).action is Action.REPLACE
    # suspend is mutable: patched in place.
    edited = stored(job)
    edited["spec"]["suspend"] = True
    plan = plan_child(job, edited)
    assert plan.action is Action.PATCH and plan.patch == {"spec": {"suspend": False}}


def test_an_edited_configmap_is_drift() -> None:
    cm = CHILDREN[("ConfigMap", f"{RUN.name}-config")]
    edited = stored(cm)
    edited["data"]["config.json"] = "{}"
    plan = plan_child(cm, edited)
    assert plan.action is Action.PATCH and plan.patch == {"data": cm["data"]}


def test_covers_distinguishes_booleans_from_numbers_and_list_lengths() -> None:
    assert covers({"a": 1, "b": 2}, {"a": 1})
    assert not covers({"a": True}, {"a": 1})
    assert not covers({"a": [1, 2]}, {"a": [1]})
    assert covers({"a": [{"x": 1, "y": 2}]}, {"a": [{"x": 1}]})


def test_a_checkpoint_claim_is_only_ever_created_never_set_back() -> None:
    """A claim's spec is immutable once bound, and replacing it would lose the checkpoint."""
    desired = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "stroke-checkpoint", "labels": {"fedrun.io/run": "stroke"}},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1536Mi"}},
        },
    }
    assert plan_child(desired, None).action == Action.CREATE
    bound = copy.deepcopy(desired)
    bound["metadata"]["labels"] = {}
    bound["spec"]["resources"]["requests"]["storage"] = "1.5Gi"
    bound["spec"]["volumeName"] = "pv-1"
    assert plan_child(desired, bound).action == Action.NONE
