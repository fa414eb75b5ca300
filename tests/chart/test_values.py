"""values.yaml, values.schema.json and docs/install.md describe the same values.

Every value is documented where it is declared (a `# --` comment above it, or above each
of its children), the schema is strict wherever the chart owns the shape, and the install
guide's values reference names every documented value.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from .tools import CHART, REPO

VALUES_TEXT = (CHART / "values.yaml").read_text(encoding="utf-8")
VALUES: dict[str, Any] = yaml.safe_load(VALUES_TEXT)
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
INSTALL = (REPO / "docs" / "install.md").read_text(encoding="utf-8")

# Values whose inside is a Kubernetes type passed through as is (the API server and the
# kubernetes-validate checks of rendered objects validate them), or free-form maps.
PASSTHROUGH = {
    "global",
    "resources.requests",
    "resources.limits",
    "podSecurityContext",
    "securityContext",
    "affinity",
    # A FederatedRun's pod settings: the schema names their fields; the operator checks
    # the rest with fedrun's own models when it starts.
    "runDefaults.server",
    "runDefaults.hospital",
}


def documented_keys(text: str) -> dict[str, bool]:
    """Dotted path of every mapping key in values.yaml -> whether a `# --` comment
    block sits directly above it."""
    out: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not stripped:
            comment = []
            continue
        key = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if key is None:  # a list item or a continuation line
            comment = []
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(k for _, k in stack), key.group(2)])
        stack.append((indent, key.group(2)))
        out[path] = any(c.startswith("# --") for c in comment)
        comment = []
    return out


def leaves_documented(tree: Any, documented: dict[str, bool], prefix: str = "") -> list[str]:
    """Paths of values with no documentation on themselves or on every child."""
    missing = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if documented.get(path):
            continue
        if isinstance(value, dict) and value:
            missing += leaves_documented(value, documented, f"{path}.")
        else:
            missing.append(path)
    return missing


def test_the_comment_parser_sees_undocumented_values() -> None:
    text = "a:\n  # -- documented\n  b: 1\n  c: 2\n# -- whole\nd:\n  e: 1\n"
    documented = documented_keys(text)
    assert documented == {"a": False, "a.b": True, "a.c": False, "d": True, "d.e": False}
    assert leaves_documented(yaml.safe_load(text), documented) == ["a.c"]


def test_every_value_is_documented() -> None:
    assert leaves_documented(VALUES, documented_keys(VALUES_TEXT)) == []


def test_install_guide_names_every_documented_value() -> None:
    documented = [p for p, ok in documented_keys(VALUES_TEXT).items() if ok]
    assert len(documented) > 30
    missing = [p for p in documented if f"`{p}`" not in INSTALL]
    assert missing == [], "docs/install.md's values reference lacks these"


def test_install_guide_states_the_defaults() -> None:
    rows = re.findall(r"^\| `([\w.]+)` \| `(.*)` \| ", INSTALL, re.M)
    rows = [(path, default) for path, default in rows if path.split(".")[0] in VALUES]
    assert len(rows) > 30
    for path, default in rows:
        value: Any = VALUES
        for key in path.split("."):
            value = value[key]
        assert json.loads(default) == value, f"docs/install.md: default of {path}"


def walk_schema(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        out += walk_schema(sub, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        out += walk_schema(node["items"], f"{path}[]")
    return out


def test_schema_is_strict_where_the_chart_owns_the_shape() -> None:
    for path, node in walk_schema(SCHEMA):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
        elif node.get("type") == "object":
            loose = path in PASSTHROUGH or path.endswith("[]")
            typed_map = isinstance(node.get("additionalProperties"), dict)
            assert loose or typed_map, f"{path} accepts anything"


def flat_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(f"{prefix}{key}")
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
    return out


def test_schema_and_values_declare_the_same_keys() -> None:
    # Below a passed-through Kubernetes type or a map of the user's own keys (labels,
    # selectors) there are no fixed keys to compare.
    open_maps = PASSTHROUGH | {
        p for p, n in walk_schema(SCHEMA) if isinstance(n.get("additionalProperties"), dict)
    }

    def fixed(paths: set[str]) -> set[str]:
        return {p for p in paths if not any(p.startswith(f"{m}.") for m in open_maps)}

    declared = {p for p, _ in walk_schema(SCHEMA) if p and "[]" not in p} - {"global"}
    assert fixed(flat_keys(VALUES)) == fixed(declared)
