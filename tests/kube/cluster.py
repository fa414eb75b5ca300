"""An emulated Kubernetes API server on a local port, with kubectl-like helpers for tests.

`EmulatedCluster` runs `FedrunEmulator` behind an aiohttp server in a thread with its own
event loop, so both synchronous test code and an operator under `kopf.testing.KopfRunner`
(another thread, another loop) can talk to it over HTTP. It writes a kubeconfig for it and
changes nothing global: point the operator at it with `KUBECONFIG` yourself.

    with EmulatedCluster() as cluster:
        cluster.create(run)
        with KopfRunner([...], env={"KUBECONFIG": str(cluster.kubeconfig)}):
            cluster.wait_for(lambda: cluster.get(API, "federatedruns", "default", "demo")
                             .get("status", {}).get("phase") == "Running")
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp.test_utils
import yaml

from .emulator import ApiRequest, FedrunEmulator
from .patching import MERGE_PATCH

T = TypeVar("T")
USER_AGENT = "fedrun-tests"
Obj = dict[str, Any]


# Every request each EmulatedCluster of this test session served, kept when it stops: the
# RBAC proof (tests/rbac) compares the operator's calls in the integration and e2e tests
# with the chart's rules.
RECORDED: list[ApiRequest] = []


class ApiError(Exception):
    """A request the emulated API server refused; `status` is the Kubernetes `Status` body."""

    def __init__(self, code: int, status: Obj) -> None:
        super().__init__(f"{code} {status.get('reason', '')}: {status.get('message', '')}")
        self.code = code
        self.reason: str = status.get("reason", "")
        self.message: str = status.get("message", "")
        self.status = status


class EmulatedCluster:
    """A running FedrunEmulator; use it as a context manager.

    `directory` receives the kubeconfig (a temporary directory, removed at exit, when None);
    `namespace` is the kubeconfig context's namespace and the helpers' default one;
    `admission=False` stores FederatedRuns without checking them against the CRD;
    `timeout` bounds each helper request and the server's start and stop.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        namespace: str = "default",
        admission: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.timeout = timeout
        self._admission = admission
        self._directory = directory
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._thread = threading.Thread(target=self._run, name="emulated-kube-api", daemon=True)
        self._ready = threading.Event()
        self._changed = threading.Condition()
        self._change_count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._emulator: FedrunEmulator | None = None
        self._url = ""
        self._kubeconfig: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(self.timeout) or self._failure is not None:
            raise RuntimeError(f"the emulated API server did not start: {self._failure!r}")
        if self._directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedrun-kube-")
            self._directory = Path(self._tmp.name)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._kubeconfig = self._directory / "kubeconfig"
        self._kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_dict()), encoding="utf-8")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._emulator is not None:
            RECORDED.extend(self._emulator.requests())
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._thread.is_alive():
            raise RuntimeError("the emulated API server did not stop")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop))
        except BaseException as exc:  # reported to __enter__, which is waiting
            self._failure = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop = asyncio.Event()
        emulator = FedrunEmulator(admission=self._admission, on_change=self._notify)
        async with emulator:
            # aiohttp's test server, as kmock.Server uses it, without kmock.Server's patch of
            # aiohttp's resolver (process-wide, and it must be undone in LIFO order).
            server = aiohttp.test_utils.RawTestServer(emulator, host="127.0.0.1", port=0)
            await server.start_server()
            try:
                self._emulator, self._loop = emulator, loop
                self._url = str(server.make_url("")).rstrip("/")
                self._ready.set()
                await self._stop.wait()
                await emulator.close_watches()
            finally:
                await server.close()

    def _notify(self) -> None:
        with self._changed:
            self._change_count += 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ what it is

    @property
    def url(self) -> str:
        """The API server's base URL, e.g. `http://127.0.0.1:41234`."""
        return self._url

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig file: this server, a dummy token, the context's namespace."""
        if self._kubeconfig is None:
            raise RuntimeError("the cluster is not running")
        return self._kubeconfig

    @property
    def emulator(self) -> FedrunEmulator:
        """The emulator itself; only touch its state from its own loop (or use `requests()`)."""
        if self._emulator is None:
            raise RuntimeError("the cluster is not running")
        return self._emulator

    def call(self, fn: Callable[[FedrunEmulator], T]) -> T:
        """Run `fn(emulator)` on the emulator's own loop and return its result.

        For reading its state (`emulator.objects`) or adding kmock reactions, such as a
        failure injected into the next matching request:
        `cluster.call(lambda e: e[kmock.method.PATCH, kmock.resource("fedrun.io", "v1alpha1",
        "federatedruns")][:1] << 503)`. (kmock's rule: a reaction replaces the answer, but a
        write is still made.)
        """
        if self._loop is None:
            raise RuntimeError("the cluster is not running")
        emulator = self.emulator

        async def on_loop() -> T:
            return fn(emulator)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(self.timeout)

    def kubeconfig_dict(self) -> Obj:
        """The kubeconfig's content."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "emulated", "user": {"token": "emulated-token"}}],
            "contexts": [
                {
                    "name": "emulated",
                    "context": {
                        "cluster": "emulated",
                        "user": "emulated",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "emulated",
        }

    def requests(self, client: str | None = None) -> list[ApiRequest]:
        """Every request on a resource so far, as RBAC sees it (see `ApiRequest`).

        `client="kopf/"` keeps the operator's requests only (by User-Agent; these helpers
        send `fedrun-tests`, kubectl `kubectl/...`).
        """
        return self.emulator.requests(client)

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
        req = urllib.request.Request(
            f"{self.url}{path}{query}",
            data=data,
            method=method,
            headers={
                "Content-Type": content_type,
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                status = json.loads(raw)
            except ValueError:
                status = {"message": raw.decode(errors="replace")}
            raise ApiError(exc.code, status) from None

    def _plural(self, api_version: str, kind: str) -> tuple[str, bool]:
        group = api_version.rpartition("/")[0]
        for served in self.emulator.served:
            if (served.group, served.kind) == (group, kind) and served.api_version == api_version:
                return served.plural, served.namespaced
        raise KeyError(f"{kind} ({api_version}) is not served")

    def create(self, obj: Obj, *, strict: bool = False) -> Obj:
        """POST a new object (into the kubeconfig's namespace when it names none).

        `strict=True` asks for kubectl's strict field validation (unknown fields refused).
        """
        plural, namespaced = self._plural(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace") or self.namespace
        params = {"fieldValidation": "Strict"} if strict else None
        path = self.path(obj["apiVersion"], plural, namespace if namespaced else None)
        created: Obj = self.request("POST", path, obj, params=params)
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

    def wait_for(
        self,
        condition: Callable[[], T | None],
        timeout: float = 10.0,
        interval: float = 0.5,
        what: str = "the condition",
    ) -> T:
        """Poll `condition` until it returns something truthy, and return that.

        It is re-checked at once after every change the API server makes, and at least
        every `interval` seconds. An `ApiError` (say, 404 before the object exists) or a
        missing key counts as "not yet". On timeout, `TimeoutError` names the last value
        (or error) seen.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with self._changed:
                seen = self._change_count
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
            with self._changed:
                if self._change_count == seen:
                    self._changed.wait(min(interval, remaining))
