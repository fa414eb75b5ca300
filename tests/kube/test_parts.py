"""The emulator's pure parts: merge patches, selectors, paths, table cells."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube.patching import merge_patch, spec_part
from tests.kube.routing import Route, route
from tests.kube.selectors import SelectorError, field_matcher, label_matcher
from tests.kube.tables import human_duration, json_path


# RFC 7386, appendix A (the cases that apply to JSON objects).
@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ({"a": "foo"}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    before = repr(target)
    assert merge_patch(target, patch) == result
    assert repr(target) == before  # the stored object is never changed in place


def test_spec_part_leaves_out_metadata_and_status() -> None:
    obj = {"apiVersion": "v1", "kind": "X", "metadata": {}, "status": {}, "spec": 1, "data": 2}
    assert spec_part(obj) == {"spec": 1, "data": 2}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/namespaces", Route("", "v1", "namespaces")),
        ("/api/v1/namespaces/ns1", Route("", "v1", "namespaces", name="ns1")),
        ("/api/v1/namespaces/ns1/status", Route("", "v1", "namespaces", None, "ns1", "status")),
        ("/api/v1/namespaces/ns1/pods", Route("", "v1", "pods", "ns1")),
        ("/api/v1/namespaces/ns1/pods/p/status", Route("", "v1", "pods", "ns1", "p", "status")),
        ("/api/v1/pods", Route("", "v1", "pods")),
        ("/apis/fedrun.io/v1alpha1", Route("fedrun.io", "v1alpha1")),
        ("/apis/fedrun.io", Route("fedrun.io")),
        (
            "/apis/fedrun.io/v1alpha1/namespaces/d/federatedruns/x",
            Route("fedrun.io", "v1alpha1", "federatedruns", "d", "x"),
        ),
        ("/version", Route()),
        ("/api", Route()),
    ],
)
def test_paths_are_read_as_kube_apiserver_reads_them(path: str, expected: Route) -> None:
    assert route(path) == expected


def test_selectors() -> None:
    obj = {"metadata": {"name": "x", "labels": {"a": "1", "b": ""}}, "spec": {"on": True}}
    assert label_matcher("a=1,b")(obj)
    assert label_matcher("a in (1, 2), c notin (3)")(obj)
    assert not label_matcher("a=1,!b")(obj)
    assert label_matcher("")(obj)
    assert field_matcher("metadata.name=x,spec.on=true")(obj)
    assert not field_matcher("metadata.name!=x")(obj)
    for bad in ("a b", "a in 1", "=x", "a=(1)"):
        with pytest.raises(SelectorError):
            label_matcher(bad)
    with pytest.raises(SelectorError):
        field_matcher("metadata.name")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-3, "0s"),
        (5, "5s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 60, "3h1m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 3600, "3d1h"),
        (400 * 86400, "400d"),
        (800 * 86400, "2y"),
    ],
)
def test_ages_read_like_kubectl(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_json_path_subset() -> None:
    obj = {"status": {"phase": "Running", "list": [{"n": 1}]}}
    assert json_path(obj, ".status.phase") == "Running"
    assert json_path(obj, "{.status.list[0].n}") == 1
    assert json_path(obj, ".status.metrics.auroc") is None
    assert json_path(obj, ".status.list[3].n") is None
