"""kmock's Kubernetes emulator with the API server behaviour fedrun's operator relies on.

kmock stores objects and streams watch events; this subclass adds what kube-apiserver does
and kmock does not (see docs/facts.md): object metadata (uid, a global resourceVersion,
creationTimestamp, generation), status-subresource isolation, RFC 7386 merge patches,
409 on a stale resourceVersion, PUT, label and field selectors on list and watch, watches
that resume from a resourceVersion, owner-reference garbage collection, admission of
FederatedRuns against the generated CRD, a `Table` for `kubectl get`, and a log of every
request in RBAC terms.

Not emulated: Foreground propagation (served as Background), collection of objects whose
owner never existed, server-side apply, protobuf bodies, OpenAPI documents (so `kubectl
apply` and `kubectl create` need `--validate=false`), RBAC enforcement (the log is for
proofs), and any controller (no Pods appear for a Job; tests write what kubelet would).

Everything runs on one event loop and every change is made without awaiting, so each
request's change is atomic. kmock's own semantics stay: a reaction a test adds with the DSL
(`emulator['get /api/v1/...'] << 500`) replaces the response, but the change is still made.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal.rendering import Response, StreamingError  # kmock is pinned (==0.8)

from fedrun_render.admission import Admission, budget_admission, fedrun_admission

from . import errors, tables
from .patching import (
    APPLY_PATCH,
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    PatchError,
    apply_patch,
    spec_part,
)
from .resources import FEDERATED_RUNS, PRIVACY_BUDGETS, SERVED, Served
from .routing import parse_request
from .selectors import SelectorError, field_matcher, label_matcher

Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]

PRELOADED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# Set by the API server only; a client's values are ignored on every write.
SERVER_FIELDS = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


@dataclass(frozen=True)
class ApiRequest:
    """One request as RBAC sees it ("" where a part does not apply, as in RBAC itself)."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    api_group: str  # "" for the core group
    resource: str  # plural, e.g. "federatedruns"
    subresource: str = ""  # e.g. "status"
    namespace: str = ""  # "" for cluster-scoped resources and cluster-wide list/watch
    name: str = ""  # "" for list, watch, create and deletecollection
    user_agent: str = ""  # who asked: "kopf/1.45.2", "kubectl/v1.32...", "fedrun-tests"

    @property
    def rbac_resource(self) -> str:
        """The name an RBAC rule uses: `federatedruns` or `federatedruns/status`."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


@dataclass(frozen=True)
class _Change:
    """One entry of the change log that watches replay (old is the state before MODIFIED)."""

    rv: int
    served: Served
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None = None


def now() -> str:
    """The current time as kube-apiserver writes it (RFC 3339, seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rbac_verb(method: str, named: bool, params: Mapping[str, str]) -> str:
    """The RBAC verb of an HTTP request on a resource endpoint."""
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else "get" if named else "list"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    if method == "DELETE":
        return "delete" if named else "deletecollection"
    return verbs.get(method, method.lower())


@attrs.define(kw_only=True)
class FedrunEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator plus the kube-apiserver behaviour listed in the module doc.

    Serves the resources in `resources.SERVED` (FederatedRuns, the kinds the operator
    creates, namespaces, events and CRDs), with the namespaces `default`, `kube-system`,
    `kube-public`, `kube-node-lease` and the FederatedRun CRD already present.
    `admission=False` stores FederatedRuns without checking them against the CRD;
    `on_change` is called after every request that changed something.
    """

    admission: bool = True
    served: tuple[Served, ...] = SERVED
    on_change: Callable[[], None] | None = None  # called (on the loop) after each change

    _by_resource: dict[kmock.resource, Served] = attrs.field(factory=dict, init=False)
    _admissions: dict[Served, Admission] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _changes: list[_Change] = attrs.field(factory=list, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _calls: list[ApiRequest] = attrs.field(factory=list, init=False)
    _results: dict[int, Any] = attrs.field(factory=dict, init=False)
    _orphaning: set[str] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _base_payloads: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock derives no action for PUT or a DELETE of a collection: answer them too.
        self.fallback[kmock.method.PUT] << self._serve_result
        self.fallback[kmock.method.DELETE] << self._serve_result
        for served in self.served:
            ref = _ref(served)
            self._by_resource[ref] = served
            self.resources[ref] = kmock.ResourceInfo(
                namespaced=served.namespaced,
                kind=served.kind,
                singular=served.singular,
                verbs=set(served.discovery()[0]["verbs"]),
                shortnames=set(served.short_names),
                subresources=set(served.subresources),
            )
        if self.admission:
            self._admissions[FEDERATED_RUNS] = fedrun_admission()
            self._admissions[PRIVACY_BUDGETS] = budget_admission()
        for name in PRELOADED_NAMESPACES:
            self._insert(self._served("", "namespaces"), {"metadata": {"name": name}})
        crds = self._served("apiextensions.k8s.io", "customresourcedefinitions")
        self._insert(crds, _crd())
        self._insert(crds, _crd(budget=True))
        self._base_payloads = len(self._payloads)  # reactions beyond these come from tests

    # ------------------------------------------------------------------ public API

    def requests(self, client: str | None = None) -> list[ApiRequest]:
        """Every request on a resource so far, in order, as RBAC would authorize it.

        `client` keeps only the requests whose User-Agent starts with it (`"kopf/"`: the
        operator's own; `"kubectl/"`; the test helpers send `"fedrun-tests"`).
        """
        return [c for c in self._calls if client is None or c.user_agent.startswith(client)]

    async def close_watches(self) -> None:
        """End every watch stream (so that the HTTP server can stop at once)."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ dispatch

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, with paths read by `routing.route` (Namespace objects)."""
        request = await parse_request(raw_request, id=len(self._requests))
        self._requests.append(request)
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            try:
                return await self._handle(request)
            except StreamingError as exc:  # a watch failed after its headers went out
                raw_response = exc.args[0]
                raise exc.__cause__ or exc from None
        except Exception as exc:
            if self._errors:  # kmock keeps them for tests that enter it as a context manager
                self._errors[-1].append(exc)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        ref = request.resource
        if ref is None or not ref.plural:  # discovery and anything else that is not a resource
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        verb = rbac_verb(request.method.value, request.name is not None, request.params)
        self._calls.append(
            ApiRequest(
                verb=verb,
                api_group=ref.group or "",
                resource=ref.plural,
                subresource=request.subresource or "",
                namespace=request.namespace or "",
                name=request.name or "",
                user_agent=request.headers.get("User-Agent", ""),
            )
        )
        changes = len(self._changes)
        try:
            result = self._answer(verb, request)
        except kmock.KubernetesError as exc:
            return await self._render_error(exc)
        except (SelectorError, PatchError, ValueError) as exc:
            return await self._render_error(errors.bad_request(str(exc)))
        if len(self._changes) > changes:
            async with self._changed:
                self._changed.notify_all()
            if self.on_change is not None:
                self.on_change()
        if verb != "watch" and len(self._payloads) == self._base_payloads:
            # No test added a reaction: answer directly. kmock's matching walks every
            # request seen so far for each reaction, which makes a request cost O(history)
            # (600 ms per GET after 1,500 writes) and the operator benchmark meaningless.
            if isinstance(result, Response):
                return aiohttp.web.json_response(result.payload, status=result.status or 200)
            return aiohttp.web.json_response(result)
        self._results[request.id] = result
        try:
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        finally:
            self._results.pop(request.id, None)

    def _answer(self, verb: str, request: kmock.Request) -> Any:
        """Make the request's change (synchronously, so atomically) and return the answer."""
        served = self._served_for(request)
        if request.subresource and verb not in ("get", "update", "patch"):
            raise errors.method_not_allowed(verb)
        if verb == "get":
            obj = self._get(served, request.namespace, request.name)
            return self._maybe_table(request, served, [obj], single=True) or obj
        if verb == "list":
            return self._list(served, request)
        if verb == "watch":
            self._matcher(served, request)  # refuse a bad selector or version before streaming
            int(request.params.get("resourceVersion") or 0)
            return None
        if verb == "create":
            return Response(status=201, payload=self._create(served, request))
        if verb in ("update", "patch"):
            return self._update(served, request, verb)
        if verb == "delete":
            return self._delete(served, request)
        if verb == "deletecollection":
            return self._delete_collection(served, request)
        raise errors.method_not_allowed(verb)

    async def _serve_result(self, request: kmock.Request) -> Any:
        if request.id not in self._results:
            raise NotImplementedError  # not ours: let kmock answer
        return self._results[request.id]

    # kmock's default handlers answer from what `_handle` prepared.
    _serve_list = _serve_fetch = _serve_create = _serve_update = _serve_delete = _serve_result

    # ------------------------------------------------------------------ storage

    def _served(self, group: str, plural: str) -> Served:
        for served in self.served:
            if served.group == group and served.plural == plural:
                return served
        raise KeyError(f"{plural}.{group} is not served")

    def _served_for(self, request: kmock.Request) -> Served:
        ref = request.resource
        assert ref is not None
        served = self._by_resource.get(ref)
        if served is None:
            raise errors.not_found()  # the message names no resource
        if request.subresource and request.subresource not in served.subresources:
            raise errors.not_found(served)
        if request.namespace is not None and not served.namespaced:
            raise errors.not_found(served)
        named_or_create = request.name is not None or request.method.value == "POST"
        if served.namespaced and request.namespace is None and named_or_create:
            raise errors.not_found(served)
        return served

    @staticmethod
    def _key(served: Served, namespace: str | None, name: str) -> Key:
        return (_ref(served), namespace if served.namespaced else None, name)

    def _lookup(self, served: Served, namespace: str | None, name: str) -> Obj | None:
        key = self._key(served, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        found: Obj = self.objects[key].raw
        return found

    def _get(self, served: Served, namespace: str | None, name: str | None) -> Obj:
        found = self._lookup(served, namespace, name or "")
        if found is None:
            raise errors.not_found(served, name)
        return found

    def _items(self, served: Served, namespace: str | None = None) -> list[tuple[Key, Obj]]:
        ref = _ref(served)
        found = [
            ((res, ns, name), stored.raw)
            for (res, ns, name), stored in self.objects.items()
            if res == ref and not stored.deleted and (namespace is None or ns == namespace)
        ]
        return sorted(found, key=lambda item: (item[0][1] or "", item[0][2]))

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, served: Served, kind: str, obj: Obj, old: Obj | None = None) -> None:
        self._changes.append(_Change(self._rv, served, kind, obj, old))

    def _insert(self, served: Served, obj: Obj) -> Obj:
        """Store a new object with its server-set metadata and log ADDED."""
        meta = obj["metadata"]
        for field in (*SERVER_FIELDS, "resourceVersion", "generation"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv()
        obj["apiVersion"], obj["kind"] = served.api_version, served.kind
        key = self._key(served, meta.get("namespace"), meta["name"])
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._record(served, "ADDED", obj)
        return obj

    def _replace(self, served: Served, old: Obj, new: Obj) -> Obj:
        """Store `new` in place of `old`, keeping what only the server sets; log MODIFIED.

        A write that changes nothing keeps the old resourceVersion and logs nothing, as the
        API server does. An object whose deletion waited only for its last finalizer goes.
        """
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for field in (*SERVER_FIELDS, "name", "namespace", "generation"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        new["apiVersion"], new["kind"] = served.api_version, served.kind
        if spec_part(new) != spec_part(old):
            meta["generation"] = old_meta.get("generation", 0) + 1
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:
            return old
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers", [])) - set(old_meta.get("finalizers", []))
            if added:
                raise errors.invalid(
                    served,
                    meta["name"],
                    [
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the "
                        "object is being deleted"
                    ],
                )
        meta["resourceVersion"] = self._next_rv()
        self.objects[self._key(served, meta.get("namespace"), meta["name"])].history.append(new)
        self._record(served, "MODIFIED", new, old)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(served, new)
        return new

    def _remove(self, served: Served, obj: Obj) -> Obj:
        """Delete for good, then collect what it owned (or orphan it); log DELETED."""
        meta = obj["metadata"]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[self._key(served, meta.get("namespace"), meta["name"])].delete()
        self._record(served, "DELETED", gone)
        orphan = meta["uid"] in self._orphaning
        self._orphaning.discard(meta["uid"])
        self._collect(meta["uid"], orphan)
        if served.plural == "namespaces" and not served.group:  # the namespace controller
            for ns_served in self.served:
                if ns_served.namespaced:
                    for _, inside in self._items(ns_served, meta["name"]):
                        self._delete_current(ns_served, inside, "Background")
        return gone

    def _collect(self, owner_uid: str, orphan: bool) -> None:
        """The garbage collector's part once an owner is gone.

        A dependent whose owners are now all gone is deleted (background propagation);
        one that keeps a live owner, or whose owner was deleted with Orphan, only loses the
        reference.
        """
        dependents = [
            (served, obj)
            for served in self.served
            for _, obj in self._items(served)
            if any(o.get("uid") == owner_uid for o in obj["metadata"].get("ownerReferences") or [])
        ]
        live = {obj["metadata"]["uid"] for served in self.served for _, obj in self._items(served)}
        for served, obj in dependents:
            current = self._lookup(
                served, obj["metadata"].get("namespace"), obj["metadata"]["name"]
            )
            if current is None:
                continue  # already collected through another owner
            owners = current["metadata"].get("ownerReferences") or []
            kept = [o for o in owners if o.get("uid") != owner_uid]
            if orphan or any(o.get("uid") in live for o in kept):
                freed = copy.deepcopy(current)
                freed["metadata"]["ownerReferences"] = kept
                if not kept:
                    del freed["metadata"]["ownerReferences"]
                self._replace(served, current, freed)
            else:
                self._begin_delete(served, current, "Background")

    def _delete_current(self, served: Served, obj: Obj, policy: str) -> None:
        """Delete what is stored now under `obj`'s name, if it is still there."""
        meta = obj["metadata"]
        current = self._lookup(served, meta.get("namespace"), meta["name"])
        if current is not None:
            self._begin_delete(served, current, policy)

    def _begin_delete(self, served: Served, obj: Obj, policy: str) -> Obj:
        """Delete now, or mark with deletionTimestamp while finalizers remain."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj
        if policy == "Orphan":
            self._orphaning.add(meta["uid"])
        if not meta.get("finalizers"):
            return self._remove(served, obj)
        marked = copy.deepcopy(obj)
        marked["metadata"]["deletionTimestamp"] = now()
        marked["metadata"]["deletionGracePeriodSeconds"] = 0
        marked["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[self._key(served, meta.get("namespace"), meta["name"])].history.append(marked)
        self._record(served, "MODIFIED", marked, obj)
        return marked

    # ------------------------------------------------------------------ reads

    def _matcher(self, served: Served, request: kmock.Request) -> Callable[[Obj], bool]:
        labels = label_matcher(request.params.get("labelSelector"))
        fields = field_matcher(request.params.get("fieldSelector"))
        namespace = request.namespace if served.namespaced else None
        name = request.name

        def matches(obj: Obj) -> bool:
            meta = obj.get("metadata", {})
            return (
                (namespace is None or meta.get("namespace") == namespace)
                and (name is None or meta.get("name") == name)
                and labels(obj)
                and fields(obj)
            )

        return matches

    def _list(self, served: Served, request: kmock.Request) -> Obj:
        matches = self._matcher(served, request)
        items = [obj for _, obj in self._items(served, request.namespace) if matches(obj)]
        table = self._maybe_table(request, served, items, single=False)
        if table is not None:
            return table
        start = int(request.params.get("continue") or 0)
        limit = int(request.params.get("limit") or 0)
        page = items[start : start + limit] if limit > 0 else items[start:]
        meta: Obj = {"resourceVersion": str(self._rv)}
        if limit > 0 and start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
        return {
            "apiVersion": served.api_version,
            "kind": f"{served.kind}List",
            "metadata": meta,
            "items": page,
        }

    def _maybe_table(
        self, request: kmock.Request, served: Served, items: list[Obj], *, single: bool
    ) -> Obj | None:
        if "as=Table" not in request.headers.get("Accept", ""):
            return None
        return tables.table(served, items, str(self._rv), single=single)

    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        # kmock streams an async generator; the Content-Type says it is JSON (kubectl asks).
        return Response(headers={"Content-Type": "application/json"}, payload=self._stream(request))

    async def _stream(self, request: kmock.Request) -> AsyncIterator[Any]:
        served = self._served_for(request)
        matches = self._matcher(served, request)
        since = request.params.get("resourceVersion") or ""
        initial = request.params.get("sendInitialEvents") == "true" or since in ("", "0")
        timeout = float(request.params.get("timeoutSeconds") or 0)
        snapshot_rv = self._rv
        # The snapshot and the cursor come from the same instant: no change is lost between.
        if initial:
            existing = [obj for _, obj in self._items(served, request.namespace) if matches(obj)]
            cursor = len(self._changes)
        else:
            existing = []
            cursor = bisect.bisect_right([c.rv for c in self._changes], int(since))
        yield b""  # send the headers now: a watch may stay quiet for long
        for obj in existing:
            yield {"type": "ADDED", "object": obj}
        if request.params.get("sendInitialEvents") == "true":
            yield {
                "type": "BOOKMARK",
                "object": {
                    "apiVersion": served.api_version,
                    "kind": served.kind,
                    "metadata": {
                        "resourceVersion": str(snapshot_rv),
                        "annotations": {"k8s.io/initial-events-end": "true"},
                    },
                },
            }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        while not self._closing:
            while cursor < len(self._changes):
                change = self._changes[cursor]
                cursor += 1
                event = _seen_as(change, served, matches)
                if event is not None:
                    yield event
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            async with self._changed:
                if cursor >= len(self._changes) and not self._closing:
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        return

    # ------------------------------------------------------------------ writes

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        if not request.body:
            return None
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type and not content_type.endswith("json"):  # e.g. protobuf
            raise errors.unsupported_media_type(content_type)
        try:
            return json.loads(request.body)
        except ValueError as exc:
            raise errors.bad_request(f"the request body is not JSON: {exc}") from exc

    def _admit(
        self, served: Served, request: kmock.Request, obj: Obj, old: Obj | None = None
    ) -> Obj:
        """What the API server stores for a custom resource, or its refusal."""
        admission = self._admissions.get(served)
        if admission is None:
            return obj
        dropped = admission.prune_unknown(obj)
        if dropped and request.params.get("fieldValidation") == "Strict":
            raise errors.bad_request(
                "strict decoding error: " + ", ".join(f'unknown field "{p}"' for p in dropped)
            )
        problems = admission.admit(obj, old)
        if problems:
            raise errors.invalid(served, obj["metadata"].get("name", ""), problems)
        return admission.prepare(obj)

    def _create(self, served: Served, request: kmock.Request) -> Obj:
        body = self._body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body of a create must be an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if obj.get("kind") not in (None, served.kind):
            raise errors.bad_request(f"the kind {obj['kind']!r} is not {served.kind!r}")
        if served.namespaced:
            if meta.get("namespace") not in (None, "", request.namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = request.namespace
            namespace = self._lookup(self._served("", "namespaces"), None, request.namespace or "")
            if namespace is None:
                raise errors.not_found(self._served("", "namespaces"), request.namespace)
            if namespace["metadata"].get("deletionTimestamp"):
                raise errors.status_error(
                    403,
                    "Forbidden",
                    f"unable to create new content in namespace {request.namespace} because it "
                    "is being terminated",
                )
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise errors.status_error(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise errors.invalid(
                    served, "", ["metadata.name: Required value: name or generateName is required"]
                )
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if self._lookup(served, meta.get("namespace"), meta["name"]) is not None:
            raise errors.already_exists(served, meta["name"])
        if "status" in served.subresources:
            obj.pop("status", None)  # a create cannot set status where status is a subresource
        obj = self._admit(served, request, obj)
        return self._insert(served, obj)

    def _update(self, served: Served, request: kmock.Request, verb: str) -> Obj:
        old = self._get(served, request.namespace, request.name)
        name = old["metadata"]["name"]
        body = self._body(request)
        if verb == "patch":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type == APPLY_PATCH or content_type not in (
                MERGE_PATCH,
                JSON_PATCH,
                STRATEGIC_MERGE_PATCH,
            ):
                raise errors.unsupported_media_type(content_type)
            if content_type == STRATEGIC_MERGE_PATCH and served.custom:
                raise errors.unsupported_media_type(content_type)
            wanted = (
                body.get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
            )
            try:
                new = apply_patch(content_type, old, body)
            except PatchError as exc:
                raise errors.invalid(served, name, [f"(patch): {exc}"]) from exc
            if content_type == JSON_PATCH:
                wanted = new.get("metadata", {}).get("resourceVersion")
        else:
            if not isinstance(body, dict):
                raise errors.bad_request("the body of an update must be an object")
            new = copy.deepcopy(body)
            if new.get("metadata", {}).get("name", name) != name:
                raise errors.bad_request(
                    f"the name of the object ({new['metadata']['name']}) does not match the name "
                    f"on the URL ({name})"
                )
            wanted = new.get("metadata", {}).get("resourceVersion")
            if not wanted and served.custom:
                raise errors.invalid(
                    served,
                    name,
                    [
                        "metadata.resourceVersion: Invalid value: 0x0: must be specified for an "
                        "update"
                    ],
                )
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise errors.conflict(served, name)
        if request.subresource == "status":
            # Through /status only status changes (metadata and spec stay as they were).
            only_status = copy.deepcopy(old)
            only_status.pop("status", None)
            if "status" in new:
                only_status["status"] = new["status"]
            new = only_status
        elif "status" in served.subresources:
            new.pop("status", None)  # the main endpoint ignores status
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        if served in self._admissions:
            new.setdefault("metadata", {}).update(
                {k: old["metadata"][k] for k in ("name", "namespace") if k in old["metadata"]}
            )
            new = self._admit(served, request, new, old)
        return self._replace(served, old, new)

    def _delete_options(self, request: kmock.Request, served: Served) -> tuple[str, Obj]:
        """(propagation policy, preconditions) of a DELETE.

        Foreground is served as Background: the owner does not wait for its dependents.
        """
        body = self._body(request)
        options: Obj = body if isinstance(body, dict) else {}
        default = "Orphan" if (served.group, served.plural) == ("batch", "jobs") else "Background"
        policy = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        return policy or default, options.get("preconditions") or {}

    def _delete(self, served: Served, request: kmock.Request) -> Obj:
        obj = self._get(served, request.namespace, request.name)
        policy, preconditions = self._delete_options(request, served)
        meta = obj["metadata"]
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) and preconditions[field] != meta[field]:
                raise errors.conflict(
                    served,
                    meta["name"],
                    f"Precondition failed: {field} in precondition: {preconditions[field]}, "
                    f"{field} in object meta: {meta[field]}",
                )
        return self._begin_delete(served, obj, policy)

    def _delete_collection(self, served: Served, request: kmock.Request) -> Obj:
        policy, _ = self._delete_options(request, served)
        matches = self._matcher(served, request)
        deleted = [
            self._begin_delete(served, obj, policy)
            for _, obj in self._items(served, request.namespace)
            if matches(obj)
        ]
        return {
            "apiVersion": served.api_version,
            "kind": f"{served.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": deleted,
        }

    # ------------------------------------------------------------------ discovery

    async def _serve_api(self, request: kmock.Request) -> Obj:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}

    async def _serve_apis(self, request: kmock.Request) -> Obj:
        groups: dict[str, list[str]] = {}
        for served in self.served:
            if served.group and served.version not in groups.setdefault(served.group, []):
                groups[served.group].append(served.version)
        return {
            "apiVersion": "v1",
            "kind": "APIGroupList",
            "groups": [_group(name, versions) for name, versions in groups.items()],
        }

    async def _serve_group(self, request: kmock.Request) -> Obj:
        assert request.resource is not None
        versions = [s.version for s in self.served if s.group == request.resource.group]
        if not versions:
            raise errors.not_found()
        return {"apiVersion": "v1", **_group(request.resource.group or "", versions)}

    async def _serve_version(self, request: kmock.Request) -> Obj:
        assert request.resource is not None
        group, version = request.resource.group or "", request.resource.version
        entries = [
            entry
            for served in self.served
            if served.group == group and served.version == version
            for entry in served.discovery()
        ]
        if not entries:
            raise errors.not_found()
        return {
            "apiVersion": "v1",
            "kind": "APIResourceList",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }


def _ref(served: Served) -> kmock.resource:
    return kmock.resource(group=served.group, version=served.version, plural=served.plural)


def _group(name: str, versions: list[str]) -> Obj:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "name": name, "versions": listed, "preferredVersion": listed[0]}


def _seen_as(change: _Change, served: Served, matches: Callable[[Obj], bool]) -> Obj | None:
    """The event a watch with this filter sees for a change (None: it sees nothing).

    As kube-apiserver's watch cache does: an object that starts or stops matching a
    selector is ADDED to or DELETED from the watcher's view.
    """
    if change.served != served:
        return None
    now_matches = matches(change.obj)
    if change.type != "MODIFIED" or change.old is None:
        return {"type": change.type, "object": change.obj} if now_matches else None
    was_matching = matches(change.old)
    if now_matches:
        return {"type": "MODIFIED" if was_matching else "ADDED", "object": change.obj}
    return {"type": "DELETED", "object": change.obj} if was_matching else None


def _crd(*, budget: bool = False) -> Obj:
    """The FederatedRun (or PrivacyBudget) CRD as a cluster holds it after `helm install`
    (Established)."""
    from fedrun_render.crd import build_budget_crd, build_crd

    crd = build_budget_crd() if budget else build_crd()
    crd["status"] = {
        "acceptedNames": crd["spec"]["names"],
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        "conditions": [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
            for t, r, m in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            )
        ],
    }
    return crd
