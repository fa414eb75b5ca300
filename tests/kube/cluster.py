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
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiohttp.test_utils
import yaml

from .client import USER_AGENT, ApiError, KubeClient, Obj
from .emulator import ApiRequest, FedrunEmulator

T = TypeVar("T")

__all__ = ["USER_AGENT", "ApiError", "EmulatedCluster"]


class EmulatedCluster(KubeClient):
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

    def _plural(self, api_version: str, kind: str) -> tuple[str, bool]:
        group = api_version.rpartition("/")[0]
        for served in self.emulator.served:
            if (served.group, served.kind) == (group, kind) and served.api_version == api_version:
                return served.plural, served.namespaced
        raise KeyError(f"{kind} ({api_version}) is not served")

    # ------------------------------------------------------------------ conditions

    def _changes(self) -> int:
        with self._changed:
            return self._change_count

    def _wait_for_change(self, seen: int, timeout: float) -> None:
        with self._changed:
            if self._change_count == seen:
                self._changed.wait(timeout)
