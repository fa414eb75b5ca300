"""The emulated API server behaves as kube-apiserver does where fedrun's tests rely on it.

Everything goes over HTTP, through `EmulatedCluster`'s helpers, kubectl or kopf.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from tests.kube.cluster import ApiError, EmulatedCluster
from tests.kube.emulator import ApiRequest
from tests.kube.patching import JSON_PATCH, STRATEGIC_MERGE_PATCH

RUNS = "fedrun.io/v1alpha1"
HERE = Path(__file__).resolve().parent
Obj = dict[str, Any]


def a_run(name: str = "demo", **spec: Any) -> Obj:
    return {
        "apiVersion": RUNS,
        "kind": "FederatedRun",
        "metadata": {"name": name},
        "spec": {
            "rounds": 3,
            "minHospitals": 2,
            "data": {"preset": "stroke"},
            "hospitals": [
                {"name": "a", "dataUri": "file:///data/a.csv"},
                {"name": "b", "dataUri": "s3://bucket-b/b.csv"},
            ],
            **spec,
        },
    }


def a_configmap(name: str, labels: dict[str, str] | None = None, **meta: Any) -> Obj:
    metadata: Obj = {"name": name, **meta}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"k": "v"}}


def owned_by(owner: Obj) -> list[Obj]:
    meta = owner["metadata"]
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"]}
    return [{**ref, "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]


def refused(call: Callable[[], Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


@contextmanager
def watching(cluster: EmulatedCluster, path: str, **params: str) -> Iterator[Callable[[], Obj]]:
    """A watch stream on `path`; the callable returns its next event (waiting for it)."""
    query = urllib.parse.urlencode({"watch": "true", **params})
    with urllib.request.urlopen(f"{cluster.url}{path}?{query}", timeout=5) as stream:
        yield lambda: json.loads(stream.readline())


def event_summary(event: Obj) -> tuple[str, str]:
    return event["type"], event["object"]["metadata"]["name"]


# --------------------------------------------------------------------------- metadata


def test_create_sets_uid_resource_version_timestamp_and_generation(
    cluster: EmulatedCluster,
) -> None:
    first = cluster.create(a_configmap("one"))
    second = cluster.create(a_run())
    for obj in (first, second):
        meta = obj["metadata"]
        assert uuid.UUID(meta["uid"]).version == 4
        assert meta["generation"] == 1
        created = datetime.datetime.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        assert abs((now - created).total_seconds()) < 60
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    # One counter for every resource, handed out in order.
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    listed = cluster.request("GET", cluster.path("v1", "configmaps"))
    assert int(listed["metadata"]["resourceVersion"]) >= int(second["metadata"]["resourceVersion"])


def test_client_values_for_server_fields_are_ignored(cluster: EmulatedCluster) -> None:
    obj = a_configmap("x", uid="mine", generation=7, creationTimestamp="2001-01-01T00:00:00Z")
    created = cluster.create(obj)
    assert created["metadata"]["uid"] != "mine"
    assert created["metadata"]["generation"] == 1
    patched = cluster.patch(
        "v1", "configmaps", "default", "x", {"metadata": {"uid": "other", "generation": 9}}
    )
    assert patched["metadata"]["uid"] == created["metadata"]["uid"]
    assert patched["metadata"]["generation"] == 1


def test_a_create_with_a_resource_version_is_refused(cluster: EmulatedCluster) -> None:
    assert refused(lambda: cluster.create(a_configmap("x", resourceVersion="3"))).code == 500


def test_generation_counts_spec_changes_only(cluster: EmulatedCluster) -> None:
    rv = cluster.create(a_run())["metadata"]["resourceVersion"]

    labelled = cluster.patch(
        RUNS, "federatedruns", "default", "demo", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    assert labelled["metadata"]["resourceVersion"] != rv

    status = cluster.patch_status(RUNS, "federatedruns", "default", "demo", {"phase": "Pending"})
    assert status["metadata"]["generation"] == 1

    spec = cluster.patch(RUNS, "federatedruns", "default", "demo", {"spec": {"rounds": 5}})
    assert spec["metadata"]["generation"] == 2

    again = cluster.patch(RUNS, "federatedruns", "default", "demo", {"spec": {"rounds": 5}})
    assert again["metadata"]["generation"] == 2
    # A write that changes nothing keeps the resourceVersion (and tells no watcher).
    assert again["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]


# --------------------------------------------------------------------------- status subresource


def test_main_endpoint_ignores_status_and_status_endpoint_ignores_the_rest(
    cluster: EmulatedCluster,
) -> None:
    created = cluster.create({**a_run(), "status": {"phase": "Succeeded"}})
    assert "status" not in created  # a create cannot set status either

    main = cluster.patch(
        RUNS,
        "federatedruns",
        "default",
        "demo",
        {"status": {"phase": "Failed"}, "spec": {"rounds": 4}},
    )
    assert "status" not in main
    assert main["spec"]["rounds"] == 4

    status = cluster.patch(
        RUNS,
        "federatedruns",
        "default",
        "demo",
        {"status": {"phase": "Running"}, "spec": {"rounds": 9}, "metadata": {"labels": {"x": "y"}}},
        subresource="status",
    )
    assert status["status"] == {"phase": "Running"}
    assert status["spec"]["rounds"] == 4
    assert "labels" not in status["metadata"]
    assert status["metadata"]["generation"] == main["metadata"]["generation"]


def test_put_respects_the_status_subresource(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    cluster.patch_status(RUNS, "federatedruns", "default", "demo", {"phase": "Pending"})
    current = cluster.get(RUNS, "federatedruns", "default", "demo")

    wanted = copy.deepcopy(current)
    wanted["spec"]["rounds"] = 7
    wanted["status"] = {"phase": "Failed"}
    replaced = cluster.replace(wanted)
    assert replaced["spec"]["rounds"] == 7
    assert replaced["status"] == {"phase": "Pending"}

    wanted = copy.deepcopy(replaced)
    wanted["spec"]["rounds"] = 1
    wanted["status"] = {"phase": "Running"}
    through_status = cluster.replace(wanted, subresource="status")
    assert through_status["spec"]["rounds"] == 7
    assert through_status["status"] == {"phase": "Running"}


def test_built_in_kinds_with_status_are_isolated_too(cluster: EmulatedCluster) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "server"},
        "spec": {"replicas": 1},
        "status": {"readyReplicas": 1},
    }
    assert "status" not in cluster.create(deployment)
    patched = cluster.patch_status(
        "apps/v1", "deployments", "default", "server", {"readyReplicas": 1}
    )
    assert patched["status"] == {"readyReplicas": 1}
    scaled = cluster.patch(
        "apps/v1", "deployments", "default", "server", {"spec": {"replicas": 0}, "status": None}
    )
    assert scaled["status"] == {"readyReplicas": 1}
    assert scaled["metadata"]["generation"] == 2


def test_no_status_subresource_where_the_kind_has_none(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("x"))
    error = refused(lambda: cluster.patch_status("v1", "configmaps", "default", "x", {"a": 1}))
    assert error.code == 404


# --------------------------------------------------------------------------- patches


def test_merge_patch_deletes_with_null_and_replaces_lists(cluster: EmulatedCluster) -> None:
    cluster.create(
        a_run(training={"model": "mlp", "hiddenSizes": [16, 8]}, activeDeadlineSeconds=60)
    )
    patched = cluster.patch(
        RUNS,
        "federatedruns",
        "default",
        "demo",
        {
            "metadata": {"labels": {"keep": "1", "drop": "2"}},
            "spec": {"training": {"hiddenSizes": [4]}, "activeDeadlineSeconds": None},
        },
    )
    assert patched["spec"]["training"]["hiddenSizes"] == [4]  # lists are replaced
    assert patched["spec"]["training"]["model"] == "mlp"  # objects merge
    assert "activeDeadlineSeconds" not in patched["spec"]  # null deletes
    dropped = cluster.patch(
        RUNS, "federatedruns", "default", "demo", {"metadata": {"labels": {"drop": None}}}
    )
    assert dropped["metadata"]["labels"] == {"keep": "1"}


def test_merge_patch_null_removes_a_key_without_a_default(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("x", labels={"a": "1"}))
    patched = cluster.patch("v1", "configmaps", "default", "x", {"data": {"k": None, "j": "w"}})
    assert patched["data"] == {"j": "w"}


def test_json_patch_and_its_failed_test(cluster: EmulatedCluster) -> None:
    rv = cluster.create(a_configmap("x"))["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["fedrun.io/cleanup"]},
    ]
    patched = cluster.patch("v1", "configmaps", "default", "x", ops, content_type=JSON_PATCH)
    assert patched["metadata"]["finalizers"] == ["fedrun.io/cleanup"]
    # kopf sends the same `test` again: the resourceVersion moved on, so 422, as kopf expects.
    error = refused(
        lambda: cluster.patch("v1", "configmaps", "default", "x", ops, content_type=JSON_PATCH)
    )
    assert (error.code, error.reason) == (422, "Invalid")


def test_strategic_merge_patch_is_for_built_in_kinds_only(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    error = refused(
        lambda: cluster.patch(
            RUNS,
            "federatedruns",
            "default",
            "demo",
            {"spec": {"rounds": 4}},
            content_type=STRATEGIC_MERGE_PATCH,
        )
    )
    assert error.code == 415
    cluster.create(a_configmap("x"))
    patched = cluster.patch(
        "v1", "configmaps", "default", "x", {"data": {"j": "w"}}, content_type=STRATEGIC_MERGE_PATCH
    )
    assert patched["data"] == {"k": "v", "j": "w"}


# --------------------------------------------------------------------------- conflicts


def test_stale_resource_version_is_a_conflict(cluster: EmulatedCluster) -> None:
    old_rv = cluster.create(a_run())["metadata"]["resourceVersion"]
    cluster.patch(RUNS, "federatedruns", "default", "demo", {"spec": {"rounds": 4}})

    stale = {"metadata": {"resourceVersion": old_rv}, "spec": {"rounds": 5}}
    error = refused(lambda: cluster.patch(RUNS, "federatedruns", "default", "demo", stale))
    assert (error.code, error.reason) == (409, "Conflict")
    assert 'federatedruns.fedrun.io "demo"' in error.message
    assert cluster.get(RUNS, "federatedruns", "default", "demo")["spec"]["rounds"] == 4

    current = cluster.get(RUNS, "federatedruns", "default", "demo")
    fresh = {
        "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
        "spec": {"rounds": 5},
    }
    assert cluster.patch(RUNS, "federatedruns", "default", "demo", fresh)["spec"]["rounds"] == 5

    outdated = copy.deepcopy(current)  # carries the resourceVersion before the last patch
    error = refused(lambda: cluster.replace(outdated))
    assert error.code == 409


def test_put_of_a_custom_resource_needs_a_resource_version(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    unconditional = a_run()
    error = refused(lambda: cluster.replace(unconditional))
    assert (error.code, error.reason) == (422, "Invalid")
    assert "metadata.resourceVersion" in error.message
    # Built-in kinds like ConfigMap allow an unconditional update.
    cluster.create(a_configmap("x"))
    replaced = cluster.replace({**a_configmap("x"), "data": {"new": "1"}})
    assert replaced["data"] == {"new": "1"}


def test_second_create_is_already_exists(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    error = refused(lambda: cluster.create(a_run()))
    assert (error.code, error.reason) == (409, "AlreadyExists")


def test_generate_name_and_unknown_namespaces(cluster: EmulatedCluster) -> None:
    made = cluster.create(
        {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "kopf-event-"}}
    )
    assert made["metadata"]["name"].startswith("kopf-event-")
    assert len(made["metadata"]["name"]) > len("kopf-event-")
    error = refused(lambda: cluster.create(a_configmap("x", namespace="nowhere")))
    assert error.code == 404
    assert 'namespaces "nowhere" not found' in error.message


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("app=fedrun", ["a", "b"]),
        ("app==fedrun,tier=server", ["a"]),
        ("app!=fedrun", ["c", "d"]),
        ("tier", ["a", "b", "c"]),
        ("!tier", ["d"]),
        ("tier in (server,client)", ["a", "b", "c"]),
        ("tier in (server)", ["a"]),
        ("tier notin (server),app", ["b", "c"]),
        ("app.kubernetes.io/part-of=fedrun", ["d"]),
    ],
)
def test_label_selectors_on_list(cluster: EmulatedCluster, selector: str, names: list[str]) -> None:
    cluster.create(a_configmap("a", {"app": "fedrun", "tier": "server"}))
    cluster.create(a_configmap("b", {"app": "fedrun", "tier": "client"}))
    cluster.create(a_configmap("c", {"app": "other", "tier": "client"}))
    cluster.create(a_configmap("d", {"app.kubernetes.io/part-of": "fedrun"}))
    found = cluster.list("v1", "configmaps", "default", label_selector=selector)
    assert [o["metadata"]["name"] for o in found] == names


def test_field_selectors_and_bad_selectors(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("a"))
    cluster.create(a_configmap("b"))
    assert [
        o["metadata"]["name"]
        for o in cluster.list("v1", "configmaps", field_selector="metadata.name=b")
    ] == ["b"]
    assert [
        o["metadata"]["name"]
        for o in cluster.list("v1", "configmaps", field_selector="metadata.name!=b")
    ] == ["a"]
    assert cluster.list("v1", "configmaps", field_selector="metadata.namespace=other") == []
    assert refused(lambda: cluster.list("v1", "configmaps", label_selector="a in b")).code == 400


def test_list_pages_with_limit_and_continue(cluster: EmulatedCluster) -> None:
    for name in ("a", "b", "c"):
        cluster.create(a_configmap(name))
    path = cluster.path("v1", "configmaps", "default")
    first = cluster.request("GET", path, params={"limit": "2"})
    assert [o["metadata"]["name"] for o in first["items"]] == ["a", "b"]
    rest = cluster.request(
        "GET", path, params={"limit": "2", "continue": first["metadata"]["continue"]}
    )
    assert [o["metadata"]["name"] for o in rest["items"]] == ["c"]
    assert "continue" not in rest["metadata"]


def test_watch_follows_a_label_selector(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("before", {"app": "fedrun"}))
    path = cluster.path("v1", "configmaps", "default")
    with watching(cluster, path, labelSelector="app=fedrun") as next_event:
        assert event_summary(next_event()) == ("ADDED", "before")  # the current state first
        cluster.create(a_configmap("other", {"app": "other"}))  # never seen
        cluster.create(a_configmap("x", {"app": "fedrun"}))
        assert event_summary(next_event()) == ("ADDED", "x")
        cluster.patch("v1", "configmaps", "default", "x", {"data": {"k": "2"}})
        assert event_summary(next_event()) == ("MODIFIED", "x")
        # Leaving and entering the selection look like DELETED and ADDED to this watcher.
        cluster.patch("v1", "configmaps", "default", "x", {"metadata": {"labels": {"app": "no"}}})
        assert event_summary(next_event()) == ("DELETED", "x")
        cluster.patch(
            "v1", "configmaps", "default", "other", {"metadata": {"labels": {"app": "fedrun"}}}
        )
        assert event_summary(next_event()) == ("ADDED", "other")
        cluster.delete("v1", "configmaps", "default", "other")
        gone = next_event()
        assert event_summary(gone) == ("DELETED", "other")


def test_watch_resumes_after_a_resource_version(cluster: EmulatedCluster) -> None:
    first = cluster.create(a_configmap("first"))
    cluster.create(a_configmap("second"))
    cluster.patch("v1", "configmaps", "default", "first", {"data": {"k": "2"}})
    path = cluster.path("v1", "configmaps")
    with watching(
        cluster, path, resourceVersion=first["metadata"]["resourceVersion"]
    ) as next_event:
        assert event_summary(next_event()) == ("ADDED", "second")
        assert event_summary(next_event()) == ("MODIFIED", "first")


def test_watch_ends_after_its_timeout(cluster: EmulatedCluster) -> None:
    query = urllib.parse.urlencode({"watch": "true", "timeoutSeconds": "1"})
    url = f"{cluster.url}{cluster.path('v1', 'configmaps', 'default')}?{query}"
    with urllib.request.urlopen(url, timeout=5) as stream:
        assert stream.read() == b""  # no objects, then the server ends the stream


# --------------------------------------------------------------------------- garbage collection


def a_run_with_children(cluster: EmulatedCluster) -> tuple[Obj, Obj, Obj]:
    run = cluster.create(a_run())
    config = cluster.create(
        {
            **a_configmap("demo-config"),
            "metadata": {"name": "demo-config", "ownerReferences": owned_by(run)},
        }
    )
    job = cluster.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "demo-a", "ownerReferences": owned_by(run)},
            "spec": {"template": {"spec": {"containers": []}}},
        }
    )
    pod = cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "demo-a-x1", "ownerReferences": owned_by(job)},
            "spec": {"containers": []},
        }
    )
    return config, job, pod


def test_deleting_the_owner_collects_its_children_recursively(cluster: EmulatedCluster) -> None:
    a_run_with_children(cluster)
    cluster.create(a_configmap("unrelated"))
    cluster.delete(RUNS, "federatedruns", "default", "demo")
    assert not cluster.exists(RUNS, "federatedruns", "default", "demo")
    assert not cluster.exists("v1", "configmaps", "default", "demo-config")
    assert not cluster.exists("batch/v1", "jobs", "default", "demo-a")
    assert not cluster.exists("v1", "pods", "default", "demo-a-x1")  # the Job's Pod too
    assert cluster.exists("v1", "configmaps", "default", "unrelated")


def test_orphan_propagation_keeps_children_without_the_reference(cluster: EmulatedCluster) -> None:
    a_run_with_children(cluster)
    cluster.delete(RUNS, "federatedruns", "default", "demo", propagation="Orphan")
    config = cluster.get("v1", "configmaps", "default", "demo-config")
    assert "ownerReferences" not in config["metadata"]
    assert cluster.exists("v1", "pods", "default", "demo-a-x1")


def test_a_job_deleted_without_a_policy_orphans_its_pods(cluster: EmulatedCluster) -> None:
    # batch/v1 Jobs default to Orphan, as in kube-apiserver; kubectl asks for Background.
    _, _, pod = a_run_with_children(cluster)
    cluster.delete("batch/v1", "jobs", "default", "demo-a")
    assert cluster.exists("v1", "pods", "default", "demo-a-x1")
    cluster.delete("v1", "pods", "default", "demo-a-x1")
    a_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "demo-b"},
        "spec": {"template": {"spec": {"containers": []}}},
    }
    job = cluster.create(a_job)
    cluster.create({**pod, "metadata": {"name": "demo-b-x1", "ownerReferences": owned_by(job)}})
    cluster.delete("batch/v1", "jobs", "default", "demo-b", propagation="Background")
    assert not cluster.exists("v1", "pods", "default", "demo-b-x1")


def test_a_child_with_another_live_owner_stays(cluster: EmulatedCluster) -> None:
    first = cluster.create(a_run("first"))
    second = cluster.create(a_run("second"))
    both = [*owned_by(first), {**owned_by(second)[0], "controller": False}]
    cluster.create(
        {**a_configmap("shared"), "metadata": {"name": "shared", "ownerReferences": both}}
    )
    cluster.delete(RUNS, "federatedruns", "default", "first")
    shared = cluster.get("v1", "configmaps", "default", "shared")
    assert [o["name"] for o in shared["metadata"]["ownerReferences"]] == ["second"]
    cluster.delete(RUNS, "federatedruns", "default", "second")
    assert not cluster.exists("v1", "configmaps", "default", "shared")


def test_finalizers_hold_the_deletion_and_its_collection(cluster: EmulatedCluster) -> None:
    run = cluster.create(
        {**a_run(), "metadata": {"name": "demo", "finalizers": ["fedrun.io/cleanup"]}}
    )
    cluster.create(
        {
            **a_configmap("demo-config"),
            "metadata": {"name": "demo-config", "ownerReferences": owned_by(run)},
        }
    )
    marked = cluster.delete(RUNS, "federatedruns", "default", "demo")
    assert marked["metadata"]["deletionTimestamp"]
    assert cluster.exists(RUNS, "federatedruns", "default", "demo")
    assert cluster.exists("v1", "configmaps", "default", "demo-config")
    # No new finalizer while being deleted, as kube-apiserver says.
    adding = {"metadata": {"finalizers": ["fedrun.io/cleanup", "other"]}}
    assert (
        refused(lambda: cluster.patch(RUNS, "federatedruns", "default", "demo", adding)).code == 422
    )
    cluster.patch(RUNS, "federatedruns", "default", "demo", {"metadata": {"finalizers": None}})
    assert not cluster.exists(RUNS, "federatedruns", "default", "demo")
    assert not cluster.exists("v1", "configmaps", "default", "demo-config")


def test_delete_preconditions(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("x"))
    body = {"preconditions": {"uid": "not-it"}}
    path = cluster.path("v1", "configmaps", "default", "x")
    assert refused(lambda: cluster.request("DELETE", path, body)).code == 409
    assert cluster.exists("v1", "configmaps", "default", "x")


def test_namespaces_are_objects_and_take_their_contents_along(cluster: EmulatedCluster) -> None:
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "hospital"}})
    assert cluster.get("v1", "namespaces", None, "hospital")["metadata"]["name"] == "hospital"
    names = [n["metadata"]["name"] for n in cluster.list("v1", "namespaces")]
    assert names == ["default", "hospital", "kube-node-lease", "kube-public", "kube-system"]
    cluster.create(a_configmap("inside", namespace="hospital"))
    cluster.delete("v1", "namespaces", None, "hospital")
    assert not cluster.exists("v1", "configmaps", "hospital", "inside")
    assert cluster.list("v1", "configmaps", "hospital") == []


# --------------------------------------------------------------------------- admission


def test_an_invalid_run_is_refused_like_kube_apiserver_does(cluster: EmulatedCluster) -> None:
    error = refused(lambda: cluster.create(a_run(minHospitals=3)))
    assert (error.code, error.reason) == (422, "Invalid")
    assert error.message == (
        'FederatedRun.fedrun.io "demo" is invalid: spec.minHospitals: minHospitals must not '
        "exceed the number of hospitals"
    )
    assert error.status["details"]["causes"][0]["field"] == "spec.minHospitals"
    assert not cluster.exists(RUNS, "federatedruns", "default", "demo")


def test_schema_errors_name_the_field(cluster: EmulatedCluster) -> None:
    error = refused(lambda: cluster.create(a_run(rounds=0)))
    assert error.code == 422
    assert "spec.rounds" in error.message


def test_the_stored_run_carries_the_schema_defaults(cluster: EmulatedCluster) -> None:
    stored = cluster.create(a_run())
    assert stored["spec"]["privacy"]["targetEpsilon"] == 1.0
    assert stored["spec"]["strategy"]["name"] == "FedAvg"
    assert cluster.get(RUNS, "federatedruns", "default", "demo")["spec"] == stored["spec"]


def test_transition_rules_see_the_old_object(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    cluster.patch_status(RUNS, "federatedruns", "default", "demo", {"phase": "Running"})
    error = refused(
        lambda: cluster.patch(RUNS, "federatedruns", "default", "demo", {"spec": {"rounds": 9}})
    )
    assert error.code == 422
    assert "spec is immutable while the run is Running" in error.message
    suspended = cluster.patch(RUNS, "federatedruns", "default", "demo", {"spec": {"suspend": True}})
    assert suspended["spec"]["suspend"] is True


def test_unknown_fields_are_dropped_or_refused_under_strict_validation(
    cluster: EmulatedCluster,
) -> None:
    with_typo = a_run(trainng={"model": "mlp"})
    error = refused(lambda: cluster.create(with_typo, strict=True))
    assert (error.code, error.message) == (
        400,
        'strict decoding error: unknown field "spec.trainng"',
    )
    stored = cluster.create(with_typo)
    assert "trainng" not in stored["spec"]
    # The operator's unknown status fields vanish the same way (kopf's status.kopf, say).
    patched = cluster.patch_status(
        RUNS, "federatedruns", "default", "demo", {"phase": "Pending", "kopf": {"progress": {}}}
    )
    assert patched["status"] == {"phase": "Pending"}


def test_admission_can_be_switched_off(tmp_path: Path) -> None:
    with EmulatedCluster(tmp_path, admission=False) as bare:
        stored = bare.create(a_run(minHospitals=3))
        assert stored["spec"]["minHospitals"] == 3
        assert "privacy" not in stored["spec"]


# --------------------------------------------------------------------------- request log


def test_every_request_is_logged_in_rbac_terms(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    cluster.get(RUNS, "federatedruns", "default", "demo")
    cluster.list(RUNS, "federatedruns")
    cluster.patch_status(RUNS, "federatedruns", "default", "demo", {"phase": "Pending"})
    cluster.replace(cluster.get(RUNS, "federatedruns", "default", "demo"))
    with watching(cluster, cluster.path("v1", "pods", "default")):
        pass
    cluster.request(
        "DELETE", cluster.path("v1", "configmaps", "default"), params={"labelSelector": "a=b"}
    )
    cluster.delete(RUNS, "federatedruns", "default", "demo")
    refused(lambda: cluster.get("v1", "secrets", "default", "missing"))

    runs = ("fedrun.io", "federatedruns")
    assert cluster.requests() == [
        ApiRequest("create", *runs, "", "default", "", "fedrun-tests"),
        ApiRequest("get", *runs, "", "default", "demo", "fedrun-tests"),
        ApiRequest("list", *runs, "", "", "", "fedrun-tests"),
        ApiRequest("patch", *runs, "status", "default", "demo", "fedrun-tests"),
        ApiRequest("get", *runs, "", "default", "demo", "fedrun-tests"),
        ApiRequest("update", *runs, "", "default", "demo", "fedrun-tests"),
        ApiRequest("watch", "", "pods", "", "default", "", "Python-urllib/3.11"),
        ApiRequest("deletecollection", "", "configmaps", "", "default", "", "fedrun-tests"),
        ApiRequest("delete", *runs, "", "default", "demo", "fedrun-tests"),
        ApiRequest("get", "", "secrets", "", "default", "missing", "fedrun-tests"),
    ]
    assert cluster.requests()[3].rbac_resource == "federatedruns/status"
    assert len(cluster.requests(client="fedrun-tests")) == 9


# --------------------------------------------------------------------------- discovery, tables


def test_discovery_describes_the_served_resources(cluster: EmulatedCluster) -> None:
    groups = {g["name"] for g in cluster.request("GET", "/apis")["groups"]}
    assert groups >= {
        "fedrun.io",
        "apps",
        "batch",
        "networking.k8s.io",
        "apiextensions.k8s.io",
        "events.k8s.io",
    }
    fedrun = {r["name"]: r for r in cluster.request("GET", "/apis/fedrun.io/v1alpha1")["resources"]}
    assert fedrun["federatedruns"]["kind"] == "FederatedRun"
    assert fedrun["federatedruns"]["namespaced"] is True
    assert fedrun["federatedruns"]["shortNames"] == ["fedrun", "fr"]
    assert set(fedrun["federatedruns"]["verbs"]) >= {"get", "list", "watch", "patch"}
    assert fedrun["federatedruns/status"]["verbs"] == ["get", "patch", "update"]
    core = {r["name"] for r in cluster.request("GET", "/api/v1")["resources"]}
    assert {
        "configmaps",
        "services",
        "serviceaccounts",
        "secrets",
        "pods",
        "pods/status",
        "events",
        "namespaces",
    } <= core
    assert "deployments/status" in {
        r["name"] for r in cluster.request("GET", "/apis/apps/v1")["resources"]
    }
    crds = cluster.list("apiextensions.k8s.io/v1", "customresourcedefinitions")
    assert [c["metadata"]["name"] for c in crds] == [
        "federatedruns.fedrun.io",
        "privacybudgets.fedrun.io",
    ]
    assert refused(lambda: cluster.request("GET", "/apis/nothing.io/v1")).code == 404


def test_tables_carry_the_printer_columns(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    cluster.patch_status(
        RUNS,
        "federatedruns",
        "default",
        "demo",
        {"phase": "Running", "progress": "2/3", "privacy": {"epsilonSpent": 0.5}, "metadata": None},
    )
    request = urllib.request.Request(
        f"{cluster.url}{cluster.path(RUNS, 'federatedruns', 'default')}",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        table = json.loads(response.read())
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Phase",
        "Round",
        "Epsilon",
        "AUROC",
        "Age",
    ]
    cells = table["rows"][0]["cells"]
    assert cells[:5] == ["demo", "Running", "2/3", 0.5, None]
    assert cells[5].endswith("s")


# --------------------------------------------------------------------------- clients


def test_kubeconfig_names_the_server_a_token_and_the_namespace(cluster: EmulatedCluster) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text(encoding="utf-8"))
    assert config["clusters"][0]["cluster"]["server"] == cluster.url
    assert config["users"][0]["user"]["token"]
    assert config["contexts"][0]["context"]["namespace"] == "default"
    assert "KUBECONFIG" not in os.environ or os.environ["KUBECONFIG"] != str(cluster.kubeconfig)


def kubectl(cluster: EmulatedCluster, *args: str) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HOME": str(cluster.kubeconfig.parent),
    }
    done = subprocess.run(
        ["kubectl", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kubectl_reads_runs_and_configmaps(cluster: EmulatedCluster) -> None:
    cluster.create(a_run())
    cluster.create(a_configmap("settings"))
    cluster.patch_status(
        RUNS, "federatedruns", "default", "demo", {"phase": "Running", "progress": "1/3"}
    )

    runs = json.loads(kubectl(cluster, "get", "federatedruns", "-o", "json"))
    assert [r["status"]["phase"] for r in runs["items"]] == ["Running"]
    assert "settings" in kubectl(cluster, "get", "configmaps")
    header, row = kubectl(cluster, "get", "fr").splitlines()
    assert header.split() == ["NAME", "PHASE", "ROUND", "EPSILON", "AUROC", "AGE"]
    assert row.split()[:3] == ["demo", "Running", "1/3"]
    assert {r.user_agent.split("/")[0] for r in cluster.requests(client="kubectl")} == {"kubectl"}


def test_wait_for_returns_the_value_or_names_the_last_one(cluster: EmulatedCluster) -> None:
    cluster.create(a_configmap("x"))
    data = cluster.wait_for(lambda: cluster.get("v1", "configmaps", "default", "x")["data"])
    assert data == {"k": "v"}
    with pytest.raises(TimeoutError, match="NotFound"):
        cluster.wait_for(lambda: cluster.get("v1", "configmaps", "default", "y"), timeout=0.2)


def test_call_runs_on_the_emulator_loop_and_can_inject_failures(
    cluster: EmulatedCluster,
) -> None:
    cluster.create(a_configmap("x"))
    configmaps = kmock.resource("", "v1", "configmaps")
    cluster.call(lambda e: e[kmock.method.GET, configmaps][:1] << 503)
    assert refused(lambda: cluster.get("v1", "configmaps", "default", "x")).code == 503
    assert cluster.get("v1", "configmaps", "default", "x")["data"] == {"k": "v"}  # only once
    stored = cluster.call(lambda e: dict(e.objects[configmaps, "default", "x"]["data"]))
    assert stored == {"k": "v"}


def test_a_kopf_operator_patches_status_through_the_subresource(
    cluster: EmulatedCluster,
) -> None:
    def marked() -> Obj | None:
        run = cluster.get(RUNS, "federatedruns", "default", "demo")
        return run if run.get("status", {}).get("phase") else None

    # A file path, so kopf executes it afresh; kopf puts its directory first on sys.path,
    # which is why it sits alone in smoke/ (nothing there can shadow another module).
    args = ["run", "-A", "--standalone", str(HERE / "smoke" / "smoke_operator.py")]
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    # kopf registers the module's handlers in its process-wide default registry: give this
    # run its own and put the old one back, so no other test's operator inherits them.
    previous = kopf.get_default_registry()
    try:
        with KopfRunner(args, env=env, timeout=30, registry=kopf.OperatorRegistry()) as runner:
            cluster.create(a_run())
            run = cluster.wait_for(marked, what="status.phase")
            events = cluster.wait_for(
                lambda: cluster.list(
                    "v1", "events", "default", field_selector="involvedObject.name=demo"
                ),
                what="kopf's Events about the run",
            )
    finally:
        kopf.set_default_registry(previous)
    assert runner.exit_code == 0, runner.output
    assert run["status"] == {"phase": "Pending", "message": "seen by the smoke operator"}
    assert run["metadata"]["generation"] == 1  # status changes never bump it
    assert [(e["reason"], e["metadata"]["name"][:11]) for e in events] == [("Seen", "kopf-event-")]
    seen = {(r.verb, r.rbac_resource, r.namespace, r.name) for r in cluster.requests("kopf/")}
    assert seen >= {
        ("list", "federatedruns", "", ""),
        ("watch", "federatedruns", "", ""),
        ("patch", "federatedruns/status", "default", "demo"),
        ("create", "events", "default", ""),
    }
