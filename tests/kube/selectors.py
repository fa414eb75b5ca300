"""Label and field selectors, as `?labelSelector=` and `?fieldSelector=` give them.

Labels: `a=b`, `a==b`, `a!=b`, `a` (exists), `!a` (absent), `a in (x,y)`, `a notin (x,y)`.
Fields: `path=value`, `path==value`, `path!=value` for any dotted path into the object
(`metadata.name`, `metadata.namespace`, `status.phase`, `involvedObject.name`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_SET = re.compile(r"^([^\s!=(),]+)\s+(in|notin)\s+\(([^()]*)\)$")
_EQUALITY = re.compile(r"^([^\s!=(),]+)\s*(==|!=|=)\s*([^\s!=(),]*)$")
_EXISTS = re.compile(r"^(!?)\s*([^\s!=(),]+)$")


class SelectorError(ValueError):
    """A selector the API server would refuse (400 Bad Request)."""


def _terms(selector: str) -> list[str]:
    """Split at the commas that are not inside `( )`."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    terms.append(current.strip())
    return [t for t in terms if t]


def _label_term(term: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET.match(term):
        key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _EQUALITY.match(term):
        key, op, value = m[1], m[2], m[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS.match(term):
        negated, key = m[1] == "!", m[2]
        return lambda labels: (key in labels) != negated
    raise SelectorError(f"unable to parse requirement: {term!r}")


def label_matcher(selector: str | None) -> Matcher:
    """A predicate on whole objects for `?labelSelector=` (everything matches when empty)."""
    terms = [_label_term(t) for t in _terms(selector or "")]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return str(node).lower()
    return str(node)


def field_matcher(selector: str | None) -> Matcher:
    """A predicate on whole objects for `?fieldSelector=` (everything matches when empty)."""
    checks: list[tuple[str, bool, str]] = []
    for term in _terms(selector or ""):
        m = _EQUALITY.match(term)
        if not m or not m[1]:
            raise SelectorError(f"invalid field selector: {term!r}")
        checks.append((m[1], m[2] != "!=", m[3]))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_field_value(obj, path) == value) == equal for path, equal, value in checks)

    return matches
