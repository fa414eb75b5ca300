"""Server-side `Table`s, which `kubectl get` asks for (`Accept: ...;as=Table`).

A FederatedRun's columns come from its CRD's `additionalPrinterColumns` (PHASE, ROUND,
EPSILON, AUROC, AGE), as kube-apiserver builds them; other kinds get NAME and AGE.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from .resources import FEDERATED_RUNS, PRIVACY_BUDGETS, Served

_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def json_path(obj: Any, path: str) -> Any:
    """The value at a simple JSONPath (`.status.phase`, `.spec.hospitals[0].name`), or None."""
    node = obj
    for key, index in _STEP.findall(path.strip().removeprefix("{").removesuffix("}")):
        if key and isinstance(node, dict):
            node = node.get(key)
        elif index and isinstance(node, list) and int(index) < len(node):
            node = node[int(index)]
        else:
            return None
    return node


def human_duration(seconds: float) -> str:
    """A duration as kubectl's AGE shows it (k8s.io/apimachinery duration.HumanDuration)."""
    s = int(seconds)
    if s < 0:
        return "0s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def _columns(served: Served) -> list[dict[str, Any]]:
    if served == FEDERATED_RUNS:
        from fedrun_render.crd import build_crd

        return list(build_crd()["spec"]["versions"][0].get("additionalPrinterColumns", []))
    if served == PRIVACY_BUDGETS:
        from fedrun_render.crd import build_budget_crd

        crd = build_budget_crd()
        return list(crd["spec"]["versions"][0].get("additionalPrinterColumns", []))
    return [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def table(served: Served, items: list[dict[str, Any]], rv: str, *, single: bool) -> dict[str, Any]:
    """A `meta.k8s.io/v1` Table of `items` with metadata-only row objects."""
    columns = _columns(served)
    definitions = [
        {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}
    ] + [
        {
            "name": c["name"],
            "type": c["type"],
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in columns:
            value = json_path(obj, column["jsonPath"])
            cells.append(_age(value) if column["type"] == "date" else value)
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {} if single else {"resourceVersion": rv},
        "columnDefinitions": definitions,
        "rows": rows,
    }
