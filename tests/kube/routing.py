"""URL paths to Kubernetes requests, namespaces included.

kmock 0.8 reads `/api/v1/namespaces/<x>` as "the namespace x" and fails on
`/api/v1/namespaces`, so Namespace objects cannot be created, read or deleted through it.
This is kube-apiserver's reading: `namespaces/<ns>/<plural>/...` is a namespaced path,
while `namespaces`, `namespaces/<name>` and `namespaces/<name>/{status,finalize}` address
Namespace objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp.web
import kmock

_NAMESPACE_SUBRESOURCES = ("status", "finalize")


@dataclass(frozen=True)
class Route:
    """The Kubernetes parts of a path; `group` is None for paths outside `/api`, `/apis`."""

    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def route(path: str) -> Route:
    """Read a URL path as kube-apiserver does."""
    parts = [p for p in path.strip("/").split("/") if p]
    version: str | None
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 2 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2] if len(parts) > 2 else None, parts[3:]
    else:
        return Route()
    namespace = None
    namespace_object = group == "" and len(rest) == 3 and rest[2] in _NAMESPACE_SUBRESOURCES
    if len(rest) >= 3 and rest[0] == "namespaces" and not namespace_object:
        namespace, rest = rest[1], rest[2:]
    return Route(
        group=group,
        version=version,
        plural=rest[0] if rest else None,
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


def _action(r: Route, method: str, watch: bool) -> kmock.action | None:
    """kmock's name for what the request does (None where kmock has none: PUT, ...)."""
    if r.group is None:
        return None
    if method == "GET":
        return kmock.action.WATCH if watch else kmock.action.FETCH if r.name else kmock.action.LIST
    if r.name is None:
        return kmock.action.CREATE if method == "POST" else None
    return {"PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(method)


async def parse_request(raw: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    """A kmock Request for an incoming HTTP request, its path read by `route`."""
    body = await raw.read()
    text = body.decode(errors="replace")
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    r = route(raw.path)
    resource = (
        None
        if r.group is None
        else kmock.resource(group=r.group, version=r.version, plural=r.plural)
    )
    params = dict(raw.query)
    return kmock.Request(
        id=id,
        raw_request=raw,
        url=raw.url,
        method=raw.method,
        params=params,
        headers=dict(raw.headers),
        cookies=dict(raw.cookies),
        body=body,
        text=text,
        data=data,
        action=_action(r, raw.method, params.get("watch") in ("true", "1")),
        resource=resource,
        namespace=r.namespace,
        name=r.name,
        subresource=r.subresource,
    )
