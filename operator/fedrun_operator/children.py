"""What to do about a run's children: pure comparisons of rendered and observed objects.

The API server adds defaults to what the operator creates (a Deployment's
``progressDeadlineSeconds``, a container's ``terminationMessagePath``, …), so a child is in
drift only when a field the operator *rendered* has another value (or is missing), never
because the server added one. Lists are compared element by element with the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Obj = dict[str, Any]

# Parts of a child's metadata the operator owns; the rest (uid, resourceVersion,
# managedFields, annotations added by others) is left alone.
_OWNED_METADATA = ("labels", "ownerReferences")


class Action(StrEnum):
    """What reconciling one child needs."""

    NONE = "none"
    CREATE = "create"
    PATCH = "patch"
    REPLACE = "replace"  # delete and create: the drifted field cannot be patched


@dataclass(frozen=True)
class Plan:
    """The action for one child and, for PATCH, the merge patch that repairs it."""

    kind: str
    name: str
    action: Action
    patch: Obj | None = None
    drift: tuple[str, ...] = ()


def covers(actual: Any, desired: Any) -> bool:
    """Whether `actual` holds every value `desired` sets (extra keys in `actual` are fine)."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        return all(k in actual and covers(actual[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return False
        return all(covers(a, d) for a, d in zip(actual, desired, strict=True))
    if isinstance(desired, (int, float)) and isinstance(actual, (int, float)):
        return bool(desired == actual) and isinstance(desired, bool) == isinstance(actual, bool)
    return bool(actual == desired)


def drifted_paths(actual: Any, desired: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths under which `actual` does not cover `desired` (lists count as one value)."""
    if isinstance(desired, dict) and isinstance(actual, dict):
        out: list[tuple[str, ...]] = []
        for key, value in desired.items():
            if key not in actual:
                out.append((*path, key))
            else:
                out += drifted_paths(actual[key], value, (*path, key))
        return out
    return [] if covers(actual, desired) else [path]


#: Kinds that are only ever created (when missing), never set back: a PersistentVolumeClaim's
#: spec is immutable once bound (and the API server rewrites its quantities), replacing the
#: claim would delete the checkpoint it holds, and the operator needs no patch on claims.
_CREATE_ONLY = frozenset({"PersistentVolumeClaim"})


def _owned(obj: Obj) -> Obj:
    """The parts of a rendered child the operator keeps in shape."""
    if obj.get("kind") in _CREATE_ONLY:
        return {}
    meta = obj.get("metadata", {})
    owned: Obj = {"metadata": {k: meta[k] for k in _OWNED_METADATA if k in meta}}
    for key, value in obj.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            owned[key] = value
    return owned


def _immutable_drift(kind: str, paths: list[tuple[str, ...]]) -> bool:
    """A Job's pod template and selector cannot be patched: the Job is replaced.

    (A Deployment's selector is immutable too, but the operator never changes it, so it
    can only differ on a Deployment someone else made; patching it fails loudly rather
    than deleting what is not ours.)
    """
    if kind == "Job":
        return any(p[:2] in (("spec", "template"), ("spec", "selector")) for p in paths)
    return False


def plan_child(desired: Obj, actual: Obj | None) -> Plan:
    """How to bring `actual` (None if missing) in line with the rendered `desired`."""
    kind, name = desired["kind"], desired["metadata"]["name"]
    if actual is None or actual.get("metadata", {}).get("deletionTimestamp"):
        return Plan(kind, name, Action.CREATE if actual is None else Action.NONE)
    want = _owned(desired)
    if covers(actual, want):
        return Plan(kind, name, Action.NONE)
    paths = drifted_paths(actual, want)
    shown = tuple(".".join(p) for p in paths)
    if _immutable_drift(kind, paths):
        return Plan(kind, name, Action.REPLACE, drift=shown)
    return Plan(kind, name, Action.PATCH, patch=repair_patch(want, paths), drift=shown)


def repair_patch(want: Obj, paths: list[tuple[str, ...]]) -> Obj:
    """A merge patch that sets back only the drifted subtrees (two levels deep at most).

    Patching only what drifted keeps the patch clear of immutable fields that did not
    change (a Job's pod template) and of values the API server defaulted.
    """
    patch: Obj = {}
    for path in paths:
        parts = path[:2]
        src: Any = want
        dst = patch
        for i, part in enumerate(parts):
            src = src[part]
            if i == len(parts) - 1:
                dst[part] = src
            else:
                dst = dst.setdefault(part, {})
    return patch


def owned_by(obj: Obj, uid: str | None) -> bool:
    """Whether `obj` names the run with `uid` as its controller."""
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj.get("metadata", {}).get("ownerReferences", [])
    )
