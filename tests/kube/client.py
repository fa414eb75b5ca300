"""kubectl-like helpers over the Kubernetes REST API, for tests: one class for any API server.

`KubeClient` speaks plain HTTP(S) with `urllib` (no client library to mock or to differ from
what kubectl sends): create, get, list, patch, patch_status, replace, delete, exists and
`wait_for`. The emulated API server (`tests.kube.cluster.EmulatedCluster`) and the real
control plane (`tests.controlplane.cluster.RealCluster`) both build on it.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from .patching import MERGE_PATCH

T = TypeVar("T")
USER_AGENT = "fedrun-tests"
Obj = dict[str, Any]

__all__ = ["USER_AGENT", "ApiError", "KubeClient", "Obj"]


class ApiError(Exception):
    """A request the API server refused; `status` is the Kubernetes `Status` body."""

    def __init__(self, code: int, status: Obj) -> None:
        super().__init__(f"{code} {status.get('reason', '')}: {status.get('message', '')}")
        self.code = code
        self.reason: str = status.get("reason", "")
        self.message: str = status.get("message", "")
        self.status = status


class KubeClient:
    """Requests to one API server as one identity.

    Subclasses provide `url`, and may set `_ssl` (TLS context, with a client certificate)
    and `_token` (a bearer token). `namespace` is the default for objects that name none;
    `timeout` bounds each request.
    """

    namespace: str = "default"
    timeout: float = 10.0
    _ssl: ssl.SSLContext | None = None
    _token: str | None = None
    _plurals: dict[tuple[str, str], tuple[str, bool]]

    @property
    def url(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ HTTP, as kubectl does it

    def path(
        self,
        api_version: str,
        plural: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        """The URL path of a collection, an object or an object's subresource."""
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        parts = [base]
        if namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(plural)
        parts += [p for p in (name, subresource) if p]
        return "/".join(parts)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One HTTP request; the decoded JSON answer, or `ApiError` for a refusal."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = None if body is None else json.dumps(body).encode()
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(
            f"{self.url}{path}{query}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                status = json.loads(raw)
            except ValueError:
                status = {"message": raw.decode(errors="replace")}
            raise ApiError(exc.code, status) from None

    def _plural(self, api_version: str, kind: str) -> tuple[str, bool]:
        """The resource name and scope of a kind, from the server's discovery documents."""
        if not hasattr(self, "_plurals"):
            self._plurals = {}
        key = (api_version, kind)
        if key not in self._plurals:
            base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            for res in self.request("GET", base).get("resources", []):
                if "/" not in res["name"]:
                    self._plurals[(api_version, res["kind"])] = (res["name"], res["namespaced"])
        if key not in self._plurals:
            raise KeyError(f"{kind} ({api_version}) is not served")
        return self._plurals[key]

    def create(self, obj: Obj, *, strict: bool = False, dry_run: bool = False) -> Obj:
        """POST a new object (into the default namespace when it names none).

        `strict=True` asks for kubectl's strict field validation (unknown fields refused);
        `dry_run=True` for server-side dry run (admitted and validated, not stored).
        """
        plural, namespaced = self._plural(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace") or self.namespace
        params: dict[str, str] = {}
        if strict:
            params["fieldValidation"] = "Strict"
        if dry_run:
            params["dryRun"] = "All"
        path = self.path(obj["apiVersion"], plural, namespace if namespaced else None)
        created: Obj = self.request("POST", path, obj, params=params or None)
        return created

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Obj:
        """GET one object (namespace None for cluster-scoped resources)."""
        found: Obj = self.request("GET", self.path(api_version, plural, namespace, name))
        return found

    def list(
        self,
        api_version: str,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        """The items of a list (all namespaces when `namespace` is None)."""
        params = {
            k: v
            for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if v
        }
        found = self.request("GET", self.path(api_version, plural, namespace), params=params)
        items: list[Obj] = found["items"]
        return items

    def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        content_type: str = MERGE_PATCH,
    ) -> Obj:
        """PATCH an object (a JSON merge patch unless `content_type` says otherwise)."""
        path = self.path(api_version, plural, namespace, name, subresource)
        patched: Obj = self.request("PATCH", path, patch, content_type=content_type)
        return patched

    def patch_status(
        self, api_version: str, plural: str, namespace: str | None, name: str, status: Obj
    ) -> Obj:
        """Merge-patch `status` through the `/status` subresource, as an operator does."""
        return self.patch(
            api_version, plural, namespace, name, {"status": status}, subresource="status"
        )

    def replace(self, obj: Obj, *, subresource: str | None = None) -> Obj:
        """PUT a whole object (its metadata.resourceVersion makes it conditional)."""
        plural, namespaced = self._plural(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        namespace = (meta.get("namespace") or self.namespace) if namespaced else None
        path = self.path(obj["apiVersion"], plural, namespace, meta["name"], subresource)
        replaced: Obj = self.request("PUT", path, obj)
        return replaced

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        *,
        propagation: str | None = None,
    ) -> Obj:
        """DELETE an object; `propagation` is Background, Foreground or Orphan."""
        params = {"propagationPolicy": propagation} if propagation else None
        path = self.path(api_version, plural, namespace, name)
        deleted: Obj = self.request("DELETE", path, params=params)
        return deleted

    def exists(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        """Whether the object is stored (being deleted still counts)."""
        try:
            self.get(api_version, plural, namespace, name)
        except ApiError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    # ------------------------------------------------------------------ conditions

    def _wait_for_change(self, seen: int, timeout: float) -> None:
        """Sleep until the server changed something after `seen`, or `timeout` passed."""
        time.sleep(timeout)

    def _changes(self) -> int:
        """A counter of the server's changes, when the client can see it (else 0)."""
        return 0

    def wait_for(
        self,
        condition: Callable[[], T | None],
        timeout: float = 10.0,
        interval: float = 0.5,
        what: str = "the condition",
    ) -> T:
        """Poll `condition` until it returns something truthy, and return that.

        Re-checked after every change the client can see, and at least every `interval`
        seconds. An `ApiError` (say, 404 before the object exists) or a missing key counts
        as "not yet". On timeout, `TimeoutError` names the last value (or error) seen.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            seen = self._changes()
            try:
                value = condition()
            except (ApiError, LookupError) as exc:
                last = exc
            else:
                if value:
                    return value
                last = value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} did not hold within {timeout} s; last seen: {last!r}")
            self._wait_for_change(seen, min(interval, remaining))
