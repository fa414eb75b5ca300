"""A small asynchronous Kubernetes API client for the operator's own calls.

kopf watches FederatedRuns and patches their status; everything else the operator does
(create and repair children, read Jobs and Pods, scale the server, delete an expired run)
goes through :class:`Kube`, which uses the credentials kopf logged in with
(:class:`kopf.ConnectionInfo`), so there is one source of credentials. Requests that were
throttled (429), failed on the server (5xx) or lost their connection are retried with
backoff; every request and retry is counted in :mod:`fedrun_operator.metrics`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from fedrun_core import names as c
from fedrun_operator import metrics

log = logging.getLogger("fedrun.operator.kube")

Obj = dict[str, Any]

# Plural names of the kinds the operator touches (no discovery round-trip needed).
_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Secret": "secrets",
    "Pod": "pods",
    "Event": "events",
    "Deployment": "deployments",
    "Job": "jobs",
    "NetworkPolicy": "networkpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    c.KIND: c.PLURAL,
    c.BUDGET_KIND: c.BUDGET_PLURAL,
}

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = "fedrun-operator/0.1"


class ApiError(Exception):
    """The API answered with an error status; ``status`` and ``reason`` say which."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFoundError(ApiError):
    """404: the object (or resource) does not exist."""


class ConflictError(ApiError):
    """409: the object exists already, or was changed since it was read."""


class ForbiddenError(ApiError):
    """403: the operator's ServiceAccount may not make this call (its RBAC lacks a rule)."""


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how to authenticate (a subset of kopf.ConnectionInfo)."""

    server: str
    token: str | None = None
    scheme: str | None = None
    ca_path: str | None = None
    ca_data: str | bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    certificate_data: str | bytes | None = None
    private_key_path: str | None = None
    private_key_data: str | bytes | None = None

    @classmethod
    def from_kopf(cls, info: Any) -> Credentials:
        """From the ``kopf.ConnectionInfo`` a login handler returned."""

        def text(value: Any) -> str | None:
            return None if value is None else str(value)

        return cls(
            server=str(info.server),
            token=info.token,
            scheme=info.scheme,
            ca_path=text(info.ca_path),
            ca_data=info.ca_data,
            insecure=bool(info.insecure),
            certificate_path=text(info.certificate_path),
            certificate_data=info.certificate_data,
            private_key_path=text(info.private_key_path),
            private_key_data=info.private_key_data,
        )


def _decoded(data: str | bytes) -> bytes:
    """Kubeconfig `*-data` fields are base64; kopf may hand them over decoded or not."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        return raw
    return base64.b64decode(raw)


def _ssl_context(creds: Credentials) -> ssl.SSLContext | bool:
    if not creds.server.startswith("https"):
        return False
    if creds.insecure:
        return False
    ctx = ssl.create_default_context(cafile=creds.ca_path)
    if creds.ca_data:
        ctx.load_verify_locations(cadata=_decoded(creds.ca_data).decode())
    cert, key = creds.certificate_path, creds.private_key_path
    if creds.certificate_data and creds.private_key_data:
        # ssl wants files; the pair lives in a private temporary directory for the process.
        tmp = tempfile.mkdtemp(prefix="fedrun-kube-")
        cert, key = f"{tmp}/client.crt", f"{tmp}/client.key"
        with open(cert, "wb") as f:
            f.write(_decoded(creds.certificate_data))
        with open(key, "wb") as f:
            f.write(_decoded(creds.private_key_data))
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def path_of(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The API path of a kind's collection, or of one object when `name` is given."""
    plural = _PLURALS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name)}"
    return base


class Kube:
    """Create, read, patch and delete objects; one aiohttp session per operator."""

    def __init__(
        self,
        creds: Credentials,
        retries: int = 5,
        backoff_s: float = 0.2,
        timeout_s: float = 30.0,
    ) -> None:
        self.creds = creds
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.creds.token:
            headers["Authorization"] = f"{self.creds.scheme or 'Bearer'} {self.creds.token}"
        return headers

    async def session(self) -> aiohttp.ClientSession:
        """The shared session, made on first use (inside the operator's event loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self.creds), limit=50)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers(), timeout=self.timeout
            )
        return self._session

    async def close(self) -> None:
        """Close the session (on operator shutdown)."""
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        verb: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> Obj:
        """Send one request, retrying throttles, 5xx and connection errors with backoff."""
        url = self.creds.server.rstrip("/") + path
        if query:
            url += "?" + urlencode(query)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        session = await self.session()
        for attempt in range(self.retries + 1):
            try:
                async with session.request(method, url, data=data, headers=headers) as resp:
                    metrics.API_REQUESTS.labels(verb, str(resp.status)).inc()
                    text = await resp.text()
                    if resp.status in RETRY_STATUSES and attempt < self.retries:
                        retry_after = resp.headers.get("Retry-After")
                        delay = float(retry_after) if retry_after and retry_after.isdigit() else 0
                        await self._retry(verb, attempt, f"HTTP {resp.status}", delay)
                        continue
                    payload: Obj = json.loads(text) if text else {}
                    if resp.status >= 400:
                        raise _error(resp.status, payload, text)
                    return payload
            except (TimeoutError, aiohttp.ClientConnectionError) as err:
                metrics.API_REQUESTS.labels(verb, "error").inc()
                if attempt >= self.retries:
                    raise
                await self._retry(verb, attempt, repr(err), 0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _retry(self, verb: str, attempt: int, why: str, delay: float) -> None:
        metrics.API_RETRIES.labels(verb).inc()
        wait = max(delay, self.backoff_s * (2**attempt))
        log.warning(
            "Kubernetes API %s failed (%s); retry %d in %.1fs", verb, why, attempt + 1, wait
        )
        await asyncio.sleep(wait)

    # -- verbs -----------------------------------------------------------------------
    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("get", "GET", path_of(api_version, kind, namespace, name))
        except NotFoundError:
            return None

    async def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str | None = None
    ) -> list[Obj]:
        """Objects of a kind in a namespace, optionally filtered by a label selector."""
        query = {"labelSelector": label_selector} if label_selector else None
        result = await self.request(
            "list", "GET", path_of(api_version, kind, namespace), query=query
        )
        items: list[Obj] = result.get("items") or []
        return items

    async def create(self, obj: Obj) -> Obj:
        """Create `obj` in its namespace; raises :class:`ConflictError` if it exists."""
        meta = obj["metadata"]
        path = path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return await self.request("create", "POST", path, obj)

    async def patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Obj
    ) -> Obj:
        """JSON merge patch (RFC 7386) of one object."""
        return await self.request(
            "patch",
            "PATCH",
            path_of(api_version, kind, namespace, name),
            patch,
            content_type="application/merge-patch+json",
        )

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Obj
    ) -> Obj:
        """Merge-patch the status subresource."""
        return await self.request(
            "patch",
            "PATCH",
            path_of(api_version, kind, namespace, name) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    async def replace_status(self, obj: Obj) -> Obj:
        """PUT ``obj``'s status subresource (an update): the API server refuses it with 409
        (:class:`ConflictError`) unless ``metadata.resourceVersion`` is still current, which
        makes a read-decide-write of one object safe against concurrent writers."""
        meta = obj["metadata"]
        path = path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return await self.request("update", "PUT", path + "/status", obj)

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        propagation: str = "Background",
    ) -> bool:
        """Delete one object; False when it was already gone."""
        try:
            await self.request(
                "delete",
                "DELETE",
                path_of(api_version, kind, namespace, name),
                {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            )
        except NotFoundError:
            return False
        return True


def _error(status: int, payload: Obj, text: str) -> ApiError:
    reason = str(payload.get("reason") or "")
    message = str(payload.get("message") or text[:500])
    if status == 404:
        return NotFoundError(status, reason, message)
    if status == 409:
        return ConflictError(status, reason, message)
    if status == 403:
        return ForbiddenError(status, reason, message)
    return ApiError(status, reason, message)
