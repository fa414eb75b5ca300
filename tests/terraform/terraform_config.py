"""Evaluate fedrun's Terraform configuration for chosen inputs, without Terraform or AWS.

No provider can be downloaded here, so `terraform plan` is out of reach. This module parses
`terraform/*.tf` with python-hcl2's grammar and evaluates what the tests ask for: variables
(with their type defaults and validations), locals, `for_each` instances, references between
resources, `lifecycle` preconditions, and `aws_iam_policy_document` data sources rendered to
the policy JSON AWS would receive (lists always, never a bare string).

Values known only after apply (ARNs, ids) are synthesised from the names the configuration
gives, the way AWS forms them; module outputs are stand-ins (`MODULE_OUTPUTS`). Anything it
cannot evaluate raises `EvalError`, so a check never passes on a value it did not see.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2.utils import process_escape_sequences
from lark import Token, Tree

ACCOUNT_ID = "123456789012"
PARTITION = "aws"
OIDC_ID = "EXAMPLED539D4633E53DE1B716D3041E"


class EvalError(Exception):
    """An expression this evaluator cannot (or Terraform would not) evaluate."""


# --------------------------------------------------------------------------- parsing


@dataclass
class Block:
    """One HCL block: its type, labels, attribute expressions and nested blocks in order."""

    type: str
    labels: tuple[str, ...]
    attrs: dict[str, Tree[Any]]
    blocks: list[Block]
    source: str

    def nested(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.type == kind]


def _trees(children: list[Any]) -> list[Tree[Any]]:
    return [c for c in children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def _name(node: Tree[Any]) -> str:
    if node.data in ("identifier", "keyword", "literal_value"):
        return str(node.children[0])
    if node.data == "string":
        parts = [p for p in node.children if isinstance(p, Tree)]
        if not all(isinstance(p.children[0], Token) for p in parts):
            raise EvalError("a block label cannot be a template")
        return "".join(str(p.children[0]) for p in parts)
    raise EvalError(f"not a name: {node.data}")


def _body(body: Tree[Any], source: str) -> tuple[dict[str, Tree[Any]], list[Block]]:
    attrs: dict[str, Tree[Any]] = {}
    blocks: list[Block] = []
    for node in _trees(body.children):
        if node.data == "attribute":
            parts = _trees(node.children)
            attrs[_name(parts[0])] = parts[-1]
        elif node.data == "block":
            parts = _trees(node.children)
            inner_attrs, inner_blocks = _body(parts[-1], source)
            line = getattr(node.meta, "line", "?") if not node.meta.empty else "?"
            blocks.append(
                Block(
                    type=_name(parts[0]),
                    labels=tuple(_name(p) for p in parts[1:-1]),
                    attrs=inner_attrs,
                    blocks=inner_blocks,
                    source=f"{source}:{line}",
                )
            )
    return attrs, blocks


def parse_directory(directory: Path) -> list[Block]:
    """Every top-level block of the `*.tf` files in `directory` (not its subdirectories)."""
    blocks: list[Block] = []
    for path in sorted(directory.glob("*.tf")):
        blocks.extend(_parse_file(path.name, path.read_text(encoding="utf-8")))
    return blocks


@functools.lru_cache(maxsize=64)
def _parse_file(name: str, text: str) -> tuple[Block, ...]:
    # Parsing is the slow part, and tests load the same files for many inputs; blocks are
    # never modified after parsing.
    body = _trees(hcl2.parses_to_tree(text).children)[0]
    attrs, top = _body(body, name)
    if attrs:
        raise EvalError(f"{name}: attributes outside any block")
    return tuple(top)


# --------------------------------------------------------------------------- values


class Ref:
    """Something an expression can traverse: `.name`, `[key]`, iteration."""

    def attr(self, name: str) -> Any:
        raise EvalError(f"{self} has no attribute {name}")

    def index(self, key: Any) -> Any:
        raise EvalError(f"{self} cannot be indexed")

    def items(self) -> dict[Any, Any]:
        raise EvalError(f"{self} cannot be iterated")


class Scope:
    """Names visible to an expression: loop variables and `each` over the configuration."""

    def __init__(self, config: Config, names: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.names = dict(names or {})

    def child(self, **names: Any) -> Scope:
        return Scope(self.config, {**self.names, **names})

    def lookup(self, name: str) -> Any:
        if name in self.names:
            return self.names[name]
        return self.config.root(name)


def _template(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    raise EvalError(f"cannot interpolate {type(value).__name__} {value!r}")


def _get_attr(base: Any, name: str) -> Any:
    if isinstance(base, Ref):
        return base.attr(name)
    if isinstance(base, dict):
        if name not in base:
            raise EvalError(f"object has no attribute {name!r} (has {sorted(base)})")
        return base[name]
    raise EvalError(f"cannot read .{name} of {type(base).__name__}")


def _get_index(base: Any, key: Any) -> Any:
    if isinstance(base, Ref):
        return base.index(key)
    if isinstance(base, list):
        if not isinstance(key, int | float) or isinstance(key, bool):
            raise EvalError(f"list index must be a number, not {key!r}")
        if not 0 <= int(key) < len(base):
            raise EvalError(f"index {key} out of range")
        return base[int(key)]
    if isinstance(base, dict):
        if _template(key) not in base:
            raise EvalError(f"no key {key!r} (has {sorted(base)})")
        return base[_template(key)]
    raise EvalError(f"cannot index {type(base).__name__}")


def _items(collection: Any) -> list[tuple[Any, Any]]:
    if isinstance(collection, Ref):
        collection = collection.items()
    if isinstance(collection, dict):
        return sorted(collection.items())
    if isinstance(collection, list):
        return list(enumerate(collection))
    raise EvalError(f"cannot iterate over {type(collection).__name__}")


# --------------------------------------------------------------------------- functions


def _as_map(value: Any) -> dict[Any, Any]:
    if isinstance(value, Ref):
        return value.items()
    if isinstance(value, dict):
        return value
    raise EvalError(f"not a map: {type(value).__name__}")


def _regex(pattern: str, text: str) -> Any:
    match = re.search(pattern, text)
    if match is None:
        raise EvalError(f"regex {pattern!r} does not match {text!r}")
    if match.re.groupindex:
        return match.groupdict()
    if match.groups():
        return list(match.groups())
    return match.group(0)


def _cidrhost(prefix: str, host: int) -> str:
    try:
        network = ipaddress.ip_network(prefix, strict=False)
    except ValueError as exc:
        raise EvalError(f"invalid CIDR {prefix!r}") from exc
    return str(network.network_address + int(host))


def _cidrsubnet(prefix: str, newbits: int, num: int) -> str:
    try:
        network = ipaddress.ip_network(prefix, strict=False)
    except ValueError as exc:
        raise EvalError(f"invalid CIDR {prefix!r}") from exc
    return str(list(network.subnets(prefixlen_diff=int(newbits)))[int(num)])


def _merge(*maps: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in maps:
        if m is None:
            continue
        if not isinstance(m, dict):
            raise EvalError("merge takes maps")
        out.update(m)
    return out


def _coalesce(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "":
            return v
    raise EvalError("coalesce: no non-null, non-empty argument")


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    for v in value:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _distinct(value: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in value:
        if v not in out:
            out.append(v)
    return out


def _toset(value: list[Any]) -> list[Any]:
    return sorted(_distinct(list(value)), key=json.dumps)


def _tonumber(value: Any) -> int | float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise EvalError(f"tonumber: {value!r} is not a number") from exc
    return int(number) if number.is_integer() else number


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "alltrue": lambda xs: all(xs),
    "anytrue": lambda xs: any(xs),
    "base64encode": lambda s: base64.b64encode(s.encode()).decode(),
    "cidrhost": _cidrhost,
    "cidrsubnet": _cidrsubnet,
    "coalesce": _coalesce,
    "concat": lambda *ls: [x for lst in ls for x in lst],
    "contains": lambda xs, x: x in xs,
    "distinct": _distinct,
    "endswith": lambda s, suffix: s.endswith(suffix),
    "flatten": _flatten,
    "format": lambda fmt, *args: re.sub(r"%[sd]", "{}", fmt).format(*map(_template, args)),
    "join": lambda sep, xs: sep.join(_template(x) for x in xs),
    "jsonencode": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
    "keys": lambda m: sorted(_as_map(m)),
    "length": lambda v: len(_as_map(v) if isinstance(v, Ref) else v),
    "lookup": lambda m, k, *default: m[k] if k in m or not default else default[0],
    "lower": lambda s: s.lower(),
    "merge": _merge,
    "regex": _regex,
    "regexall": lambda p, s: [m.group(0) for m in re.finditer(p, s)],
    "replace": lambda s, old, new: s.replace(old, new),
    "slice": lambda xs, start, end: xs[int(start) : int(end)],
    "sort": lambda xs: sorted(xs),
    "split": lambda sep, s: s.split(sep),
    "startswith": lambda s, prefix: s.startswith(prefix),
    "tolist": lambda xs: list(xs),
    "tomap": lambda m: dict(m),
    "tonumber": _tonumber,
    "toset": _toset,
    "tostring": _template,
    "upper": lambda s: s.upper(),
    "values": lambda m: [v for _, v in sorted(_as_map(m).items())],
    "yamlencode": lambda v: json.dumps(v, sort_keys=True),
}


# --------------------------------------------------------------------------- expressions


def evaluate(node: Tree[Any], scope: Scope) -> Any:
    """The value of the expression `node` in `scope`."""
    kind = node.data
    children = node.children
    if kind == "expr_term":
        (inner,) = _trees(children)
        return evaluate(inner, scope)
    if kind == "identifier":
        return scope.lookup(str(children[0]))
    if kind == "literal_value":
        return {"true": True, "false": False, "null": None}[str(children[0])]
    if kind == "int_lit":
        return int(str(children[0]))
    if kind == "float_lit":
        return float(str(children[0]))
    if kind == "string":
        return _string(node, scope)
    if kind in ("heredoc_template", "heredoc_template_trim"):
        return _heredoc(node)
    if kind == "tuple":
        return [evaluate(c, scope) for c in _trees(children)]
    if kind == "object":
        out: dict[str, Any] = {}
        for elem in _trees(children):
            key_node, value_node = _trees(elem.children)
            out[_object_key(key_node, scope)] = evaluate(value_node, scope)
        return out
    if kind == "function_call":
        return _call(node, scope)
    if kind == "get_attr_expr_term":
        base_node, get_attr = _trees(children)
        return _get_attr(evaluate(base_node, scope), _name(_trees(get_attr.children)[0]))
    if kind == "index_expr_term":
        base_node, index = _trees(children)
        return _get_index(evaluate(base_node, scope), _index_key(index, scope))
    if kind in ("attr_splat_expr_term", "full_splat_expr_term"):
        base_node, splat = _trees(children)
        base = evaluate(base_node, scope)
        elements = [] if base is None else base if isinstance(base, list) else [base]
        return [_traverse(e, _trees(splat.children), scope) for e in elements]
    if kind in ("for_tuple_expr", "for_object_expr"):
        return _for(node, scope)
    if kind == "conditional":
        cond, yes, no = _trees(children)
        test = evaluate(cond, scope)
        if not isinstance(test, bool):
            raise EvalError(f"condition is not a bool: {test!r}")
        return evaluate(yes if test else no, scope)
    if kind == "binary_op":
        left, term = _trees(children)
        operator, right = _trees(term.children)
        return _binary(str(operator.children[0]), left, right, scope)
    if kind == "unary_op":
        op = str(children[0])
        value = evaluate(_trees(children)[0], scope)
        return (not value) if op == "!" else -value
    raise EvalError(f"unsupported expression: {kind}")


def _string(node: Tree[Any], scope: Scope) -> Any:
    parts = [p.children[0] for p in node.children if isinstance(p, Tree)]
    if len(parts) == 1 and isinstance(parts[0], Tree) and parts[0].data == "interpolation":
        # "${x}" alone keeps x's type, as in Terraform.
        return evaluate(_trees(parts[0].children)[0], scope)
    out = []
    for part in parts:
        if isinstance(part, Token):
            if part.type in ("ESCAPED_INTERPOLATION", "ESCAPED_DIRECTIVE"):
                out.append(str(part)[1:])  # $${ and %%{ stand for a literal ${ and %{
            else:
                out.append(process_escape_sequences(str(part)))
        elif part.data == "interpolation":
            out.append(_template(evaluate(_trees(part.children)[0], scope)))
        else:
            raise EvalError(f"template directive {part.data} is not supported")
    return "".join(out)


def _heredoc(node: Tree[Any]) -> str:
    text = str(node.children[0])
    lines = text.split("\n")[1:-2]
    if any("${" in line or "%{" in line for line in lines):
        raise EvalError("templates inside heredocs are not supported")
    if node.data == "heredoc_template_trim":
        indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
        lines = [ln[indent:] for ln in lines]
    return "\n".join(lines) + "\n"


def _object_key(node: Tree[Any], scope: Scope) -> str:
    inner = _trees(node.children)[0]
    if inner.data == "keyword":
        return str(inner.children[0])
    terms = _trees(inner.children) if inner.data == "expr_term" else []
    if len(terms) == 1 and terms[0].data == "identifier":
        return str(terms[0].children[0])  # a bare name is the key itself
    return _template(evaluate(inner, scope))


def _index_key(index: Tree[Any], scope: Scope) -> Any:
    if index.data == "short_index":
        return int(str(index.children[-1]))
    return evaluate(_trees(index.children)[0], scope)


def _traverse(value: Any, steps: list[Tree[Any]], scope: Scope) -> Any:
    for step in steps:
        if step.data == "get_attr":
            value = _get_attr(value, _name(_trees(step.children)[0]))
        else:
            value = _get_index(value, _index_key(step, scope))
    return value


def _call(node: Tree[Any], scope: Scope) -> Any:
    if any(isinstance(c, Token) and c.type == "COLONS" for c in node.children):
        raise EvalError("provider-defined functions are not supported")
    parts = _trees(node.children)
    name = _name(parts[0])
    arg_nodes = _trees(parts[1].children) if len(parts) > 1 else []
    expand = len(parts) > 1 and any(
        isinstance(c, Token) and c.type == "ELLIPSIS" for c in parts[1].children
    )
    if name in ("can", "try"):
        for arg in arg_nodes:
            try:
                value = evaluate(arg, scope)
            except EvalError:
                continue
            return True if name == "can" else value
        if name == "can":
            return False
        raise EvalError("try: no argument could be evaluated")
    if name not in FUNCTIONS:
        raise EvalError(f"function {name}() is not supported")
    args = [evaluate(a, scope) for a in arg_nodes]
    if expand:
        args = args[:-1] + list(args[-1])
    try:
        return FUNCTIONS[name](*args)
    except EvalError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, re.error) as exc:
        raise EvalError(f"{name}(): {exc}") from exc


def _for(node: Tree[Any], scope: Scope) -> Any:
    parts = _trees(node.children)
    intro, body = parts[0], parts[1:]
    names = [str(n.children[0]) for n in _trees(intro.children) if n.data == "identifier"]
    (collection_node,) = [n for n in _trees(intro.children) if n.data != "identifier"]
    condition = body[-1] if body and body[-1].data == "for_cond" else None
    if condition is not None:
        body = body[:-1]
    grouped = any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in node.children)
    results: list[tuple[Any, Any]] = []
    for key, value in _items(evaluate(collection_node, scope)):
        inner = (
            scope.child(**{names[0]: value})
            if len(names) == 1
            else scope.child(**{names[0]: key, names[1]: value})
        )
        if condition is not None and not evaluate(_trees(condition.children)[0], inner):
            continue
        if node.data == "for_tuple_expr":
            results.append((None, evaluate(body[0], inner)))
        else:
            results.append((_template(evaluate(body[0], inner)), evaluate(body[1], inner)))
    if node.data == "for_tuple_expr":
        return [v for _, v in results]
    out: dict[str, Any] = {}
    for k, v in results:
        if grouped:
            out.setdefault(k, []).append(v)
        elif k in out:
            raise EvalError(f"duplicate key {k!r} in for expression")
        else:
            out[k] = v
    return out


def _binary(op: str, left_node: Tree[Any], right_node: Tree[Any], scope: Scope) -> Any:
    left = evaluate(left_node, scope)
    if op == "&&" and left is False:
        return False  # Terraform evaluates both sides, but the result is the same
    if op == "||" and left is True:
        return True
    right = evaluate(right_node, scope)
    operations: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b,
        "%": lambda a, b: a % b,
        "&&": lambda a, b: a and b,
        "||": lambda a, b: a or b,
    }
    try:
        return operations[op](left, right)
    except TypeError as exc:
        raise EvalError(f"{left!r} {op} {right!r}: {exc}") from exc


# --------------------------------------------------------------------------- types


def convert(type_node: Tree[Any] | None, value: Any) -> Any:
    """`value` converted to the variable type `type_node`, with optional attributes filled."""
    if type_node is None or value is None:
        return value
    terms = _trees(type_node.children) if type_node.data == "expr_term" else [type_node]
    node = terms[0]
    if node.data == "identifier":
        name = str(node.children[0])
        if name == "string":
            return _template(value)
        if name == "number":
            return _tonumber(value)
        if name == "bool":
            if not isinstance(value, bool):
                raise EvalError(f"{value!r} is not a bool")
            return value
        return value  # any
    if node.data != "function_call":
        raise EvalError(f"unsupported type expression {node.data}")
    parts = _trees(node.children)
    name = _name(parts[0])
    args = _trees(parts[1].children)
    if name in ("list", "set"):
        return [convert(args[0], v) for v in value]
    if name == "map":
        return {k: convert(args[0], v) for k, v in value.items()}
    if name == "object":
        if not isinstance(value, dict):
            raise EvalError(f"{value!r} is not an object")
        attrs = _object_type(args[0])
        unknown = set(value) - set(attrs)
        if unknown:
            raise EvalError(f"unknown attributes {sorted(unknown)}")
        out = {}
        for attr, (attr_type, optional, default) in attrs.items():
            if attr in value:
                out[attr] = convert(attr_type, value[attr])
            elif optional:
                out[attr] = convert(attr_type, default)
            else:
                raise EvalError(f"attribute {attr!r} is required")
        return out
    raise EvalError(f"unsupported type {name}()")


def _object_type(node: Tree[Any]) -> dict[str, tuple[Tree[Any], bool, Any]]:
    obj = _trees(node.children)[0] if node.data == "expr_term" else node
    out = {}
    for elem in _trees(obj.children):
        key_node, type_node = _trees(elem.children)
        key = _name(_trees(_trees(key_node.children)[0].children)[0])
        inner = _trees(type_node.children)[0] if type_node.data == "expr_term" else type_node
        if inner.data == "function_call" and _name(_trees(inner.children)[0]) == "optional":
            args = _trees(_trees(inner.children)[1].children)
            default = evaluate(args[1], Scope(_NO_CONFIG)) if len(args) > 1 else None
            out[key] = (args[0], True, default)
        else:
            out[key] = (type_node, False, None)
    return out


# --------------------------------------------------------------------------- configuration


MODULE_OUTPUTS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "eks": lambda c: {
        "cluster_name": c.module_input("eks", "cluster_name"),
        "cluster_endpoint": "https://EXAMPLE.gr7.eks.amazonaws.com",
        "cluster_certificate_authority_data": base64.b64encode(b"ca").decode(),
        "oidc_provider": f"oidc.eks.{c.region}.amazonaws.com/id/{OIDC_ID}",
        "oidc_provider_arn": (
            f"arn:{PARTITION}:iam::{ACCOUNT_ID}:oidc-provider/"
            f"oidc.eks.{c.region}.amazonaws.com/id/{OIDC_ID}"
        ),
    },
    "vpc": lambda c: {
        "vpc_id": "vpc-0a1b2c3d4e5f60718",
        "private_subnets": ["subnet-01", "subnet-02", "subnet-03"],
        "public_subnets": ["subnet-11", "subnet-12", "subnet-13"],
        "private_route_table_ids": ["rtb-01", "rtb-02", "rtb-03"],
    },
}


def _fake_id(prefix: str, address: str) -> str:
    return prefix + hashlib.sha256(address.encode()).hexdigest()[:17]


class _Namespace(Ref):
    def __init__(self, label: str, getter: Callable[[str], Any]) -> None:
        self.label = label
        self.getter = getter

    def __repr__(self) -> str:
        return self.label

    def attr(self, name: str) -> Any:
        return self.getter(name)


class Instance(Ref):
    """One instance of a resource or data source (`aws_s3_bucket.hospital["a"]`)."""

    def __init__(self, resource: Resource, key: Any, each_value: Any) -> None:
        self.resource = resource
        self.key = key
        self.each_value = each_value
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        key = "" if self.key is None else f"[{json.dumps(self.key)}]"
        return f"{self.resource.address}{key}"

    @property
    def address(self) -> str:
        return repr(self)

    @property
    def scope(self) -> Scope:
        config = self.resource.config
        if self.resource.block.attrs.get("count") is not None:
            return Scope(config, {"count": {"index": self.key}})
        if self.key is None:
            return Scope(config)
        return Scope(config, {"each": {"key": self.key, "value": self.each_value}})

    def has(self, name: str) -> bool:
        return name in self.resource.block.attrs

    def attr(self, name: str) -> Any:
        if name not in self._cache:
            block = self.resource.block
            if name in block.attrs:
                self._cache[name] = evaluate(block.attrs[name], self.scope)
            else:
                self._cache[name] = self.resource.config.computed(self, name)
        return self._cache[name]

    def blocks(
        self, kind: str, scope: Scope | None = None, block: Block | None = None
    ) -> Iterator[tuple[Block, Scope]]:
        """Nested blocks of `kind` with the scope to evaluate them in (dynamic blocks expanded)."""
        scope = scope or self.scope
        block = block or self.resource.block
        for nested in block.blocks:
            if nested.type == kind:
                yield nested, scope
            elif nested.type == "dynamic" and nested.labels == (kind,):
                iterator = kind
                if "iterator" in nested.attrs:
                    iterator = _name(_trees(nested.attrs["iterator"].children)[0])
                (content,) = nested.nested("content")
                for key, value in _items(evaluate(nested.attrs["for_each"], scope)):
                    yield content, scope.child(**{iterator: {"key": key, "value": value}})

    def nested(self, kind: str) -> list[dict[str, Any]]:
        """The nested blocks of `kind`, evaluated: attributes, and inner blocks as lists."""
        return [self._block_dict(b, s) for b, s in self.blocks(kind)]

    def _block_dict(self, block: Block, scope: Scope) -> dict[str, Any]:
        out = {name: evaluate(expr, scope) for name, expr in block.attrs.items()}
        kinds = {b.labels[0] if b.type == "dynamic" else b.type for b in block.blocks}
        for kind in sorted(kinds):
            out[kind] = [self._block_dict(b, s) for b, s in self.blocks(kind, scope, block)]
        return out


class Resource(Ref):
    """A resource or data source block and its instances."""

    def __init__(self, config: Config, mode: str, block: Block) -> None:
        self.config = config
        self.mode = mode
        self.block = block
        self.type, self.name = block.labels
        self._instances: dict[Any, Instance] | None = None

    def __repr__(self) -> str:
        return self.address

    @property
    def address(self) -> str:
        prefix = "data." if self.mode == "data" else ""
        return f"{prefix}{self.type}.{self.name}"

    def instances(self) -> dict[Any, Instance]:
        if self._instances is None:
            scope = Scope(self.config)
            attrs = self.block.attrs
            if "for_each" in attrs:
                collection = evaluate(attrs["for_each"], scope)
                if isinstance(collection, dict):
                    pairs = sorted(collection.items())
                elif isinstance(collection, list) and all(isinstance(x, str) for x in collection):
                    pairs = [(x, x) for x in sorted(set(collection))]
                else:
                    raise EvalError(f"{self.address}: for_each needs a map or a set of strings")
                self._instances = {k: Instance(self, k, v) for k, v in pairs}
            elif "count" in attrs:
                count = evaluate(attrs["count"], scope)
                self._instances = {i: Instance(self, i, None) for i in range(int(count))}
            else:
                self._instances = {None: Instance(self, None, None)}
        return self._instances

    def _single(self) -> Instance:
        instances = self.instances()
        if list(instances) != [None]:
            raise EvalError(f"{self.address} has several instances: index it")
        return instances[None]

    def attr(self, name: str) -> Any:
        return self._single().attr(name)

    def index(self, key: Any) -> Any:
        instances = self.instances()
        if key not in instances:
            raise EvalError(f"{self.address} has no instance {key!r}")
        return instances[key]

    def items(self) -> dict[Any, Any]:
        instances = self.instances()
        if list(instances) == [None]:
            raise EvalError(f"{self.address} is a single resource")
        return dict(instances)


class Config:
    """The configuration in `directory`, evaluated for the given variable values."""

    def __init__(self, directory: Path, variables: Mapping[str, Any]) -> None:
        self.directory = directory
        self.blocks = parse_directory(directory)
        self.variable_blocks = {b.labels[0]: b for b in self.blocks if b.type == "variable"}
        unknown = set(variables) - set(self.variable_blocks)
        if unknown:
            raise EvalError(f"no such variables: {sorted(unknown)}")
        self.inputs = dict(variables)
        self._variables: dict[str, Any] = {}
        self.local_exprs: dict[str, Tree[Any]] = {}
        for block in self.blocks:
            if block.type == "locals":
                for name, expr in block.attrs.items():
                    if name in self.local_exprs:
                        raise EvalError(f"local.{name} is defined twice")
                    self.local_exprs[name] = expr
        self._locals: dict[str, Any] = {}
        self._evaluating: set[str] = set()
        self.resources: dict[tuple[str, str], Resource] = {}
        self.data: dict[tuple[str, str], Resource] = {}
        for block in self.blocks:
            if block.type == "resource":
                self.resources[(block.labels[0], block.labels[1])] = Resource(
                    self, "resource", block
                )
            elif block.type == "data":
                self.data[(block.labels[0], block.labels[1])] = Resource(self, "data", block)
        self.modules = {b.labels[0]: b for b in self.blocks if b.type == "module"}
        self.outputs = {b.labels[0]: b for b in self.blocks if b.type == "output"}
        self.resource_types = {t for t, _ in self.resources}

    # ---- names

    @property
    def region(self) -> str:
        return str(self.variable("region"))

    def variable(self, name: str) -> Any:
        if name not in self._variables:
            if name not in self.variable_blocks:
                raise EvalError(f"var.{name} is not declared")
            block = self.variable_blocks[name]
            if name in self.inputs:
                raw = self.inputs[name]
            elif "default" in block.attrs:
                raw = evaluate(block.attrs["default"], Scope(_NO_CONFIG))
            else:
                raise EvalError(f"var.{name} has no default and no value was given")
            self._variables[name] = convert(block.attrs.get("type"), raw)
        return self._variables[name]

    def local(self, name: str) -> Any:
        if name not in self._locals:
            if name not in self.local_exprs:
                raise EvalError(f"local.{name} is not defined")
            if name in self._evaluating:
                raise EvalError(f"local.{name} depends on itself")
            self._evaluating.add(name)
            try:
                self._locals[name] = evaluate(self.local_exprs[name], Scope(self))
            finally:
                self._evaluating.discard(name)
        return self._locals[name]

    def module_input(self, module: str, name: str) -> Any:
        return evaluate(self.modules[module].attrs[name], Scope(self))

    def module_output(self, module: str, name: str) -> Any:
        if module not in self.modules or module not in MODULE_OUTPUTS:
            raise EvalError(f"module.{module} has no stand-in outputs")
        outputs = MODULE_OUTPUTS[module](self)
        if name not in outputs:
            raise EvalError(f"module.{module}.{name} has no stand-in value")
        return outputs[name]

    def output(self, name: str) -> Any:
        return evaluate(self.outputs[name].attrs["value"], Scope(self))

    def root(self, name: str) -> Any:
        if name == "var":
            return _Namespace("var", self.variable)
        if name == "local":
            return _Namespace("local", self.local)
        if name == "module":
            return _Namespace(
                "module", lambda m: _Namespace(f"module.{m}", lambda o: self.module_output(m, o))
            )
        if name == "data":
            return _Namespace(
                "data",
                lambda t: _Namespace(f"data.{t}", lambda n: self._lookup(self.data, t, n, "data.")),
            )
        if name == "path":
            return {"module": str(self.directory), "root": str(self.directory), "cwd": "."}
        if name == "terraform":
            return {"workspace": "default"}
        if name in self.resource_types:
            return _Namespace(name, lambda n: self._lookup(self.resources, name, n, ""))
        raise EvalError(f"unknown name {name!r} here")

    @staticmethod
    def _lookup(table: dict[tuple[str, str], Resource], type_: str, name: str, prefix: str) -> Any:
        if (type_, name) not in table:
            raise EvalError(f"{prefix}{type_}.{name} is not declared")
        return table[(type_, name)]

    def resource(self, type_: str, name: str) -> Resource:
        return self._lookup(self.resources, type_, name, "")

    def data_source(self, type_: str, name: str) -> Resource:
        return self._lookup(self.data, type_, name, "data.")

    def instances_of(self, type_: str) -> list[Instance]:
        """Every instance of every resource of `type_`."""
        return [
            inst
            for (t, _), res in sorted(self.resources.items())
            if t == type_
            for inst in res.instances().values()
        ]

    # ---- values known after apply

    def computed(self, inst: Instance, name: str) -> Any:
        kind, mode = inst.resource.type, inst.resource.mode
        arn_prefix = f"arn:{PARTITION}"
        if mode == "data":
            if kind == "aws_iam_policy_document" and name == "json":
                return json.dumps(render_policy_document(inst), sort_keys=True)
            if kind == "aws_caller_identity" and name == "account_id":
                return ACCOUNT_ID
            if kind == "aws_partition" and name == "partition":
                return PARTITION
            if kind == "aws_partition" and name == "dns_suffix":
                return "amazonaws.com"
            if kind == "aws_region" and name in ("name", "region"):
                return self.region
            if kind == "aws_availability_zones" and name == "names":
                wanted = [
                    evaluate(f.attrs["values"], s)
                    for f, s in inst.blocks("filter")
                    if evaluate(f.attrs["name"], s) == "zone-name"
                ]
                if not wanted:
                    raise EvalError("availability zones are only known for a zone-name filter")
                return sorted(wanted[0])
        elif kind == "aws_s3_bucket" and name in ("id", "bucket", "arn"):
            bucket = inst.attr("bucket")
            return f"{arn_prefix}:s3:::{bucket}" if name == "arn" else bucket
        elif kind == "aws_iam_role" and name in ("id", "name", "arn"):
            role = inst.attr("name")
            path = inst.attr("path") if inst.has("path") else "/"
            return f"{arn_prefix}:iam::{ACCOUNT_ID}:role{path}{role}" if name == "arn" else role
        elif kind == "aws_iam_policy" and name in ("id", "arn"):
            path = inst.attr("path") if inst.has("path") else "/"
            return f"{arn_prefix}:iam::{ACCOUNT_ID}:policy{path}{inst.attr('name')}"
        elif kind == "aws_kms_key" and name in ("id", "key_id", "arn"):
            key_id = _fake_id("k", inst.address)
            return (
                f"{arn_prefix}:kms:{self.region}:{ACCOUNT_ID}:key/{key_id}"
                if name == "arn"
                else key_id
            )
        elif kind == "aws_vpc_endpoint" and name == "id":
            return _fake_id("vpce-", inst.address)
        elif kind == "aws_ecr_repository" and name in ("name", "arn", "repository_url"):
            repo = inst.attr("name")
            if name == "arn":
                return f"{arn_prefix}:ecr:{self.region}:{ACCOUNT_ID}:repository/{repo}"
            if name == "repository_url":
                return f"{ACCOUNT_ID}.dkr.ecr.{self.region}.amazonaws.com/{repo}"
            return repo
        raise EvalError(f"{inst.address}.{name} is known only after apply")

    # ---- checks Terraform itself runs

    def validation_errors(self) -> list[str]:
        """Error messages of the variable validations that fail for these inputs."""
        errors = []
        for name, block in sorted(self.variable_blocks.items()):
            for validation in block.nested("validation"):
                scope = Scope(self, {"var": {name: self.variable(name)}})
                if not evaluate(validation.attrs["condition"], scope):
                    errors.append(
                        f"var.{name}: {evaluate(validation.attrs['error_message'], scope)}"
                    )
        return errors

    def precondition_errors(self) -> list[str]:
        """Error messages of the resources' lifecycle preconditions that fail for these inputs."""
        errors = []
        for _, res in sorted(self.resources.items()):
            for inst in res.instances().values():
                for lifecycle in res.block.nested("lifecycle"):
                    for pre in lifecycle.nested("precondition"):
                        if not evaluate(pre.attrs["condition"], inst.scope):
                            message = evaluate(pre.attrs["error_message"], inst.scope)
                            errors.append(f"{inst.address}: {message}")
        return errors


class _NoConfig(Config):
    """Scope owner for constants (variable defaults, type defaults): no names at all."""

    def __init__(self) -> None:  # no files
        pass

    def root(self, name: str) -> Any:
        raise EvalError(f"{name!r} is not allowed in a constant")


_NO_CONFIG = _NoConfig()


# --------------------------------------------------------------------------- IAM documents


def render_policy_document(inst: Instance) -> dict[str, Any]:
    """The policy an `aws_iam_policy_document` produces, every value as a list."""
    block = inst.resource.block
    unsupported = set(block.attrs) - {"version", "policy_id", "for_each", "count"}
    if unsupported:
        raise EvalError(f"{inst.address}: {sorted(unsupported)} not supported")
    statements = []
    for stmt, scope in inst.blocks("statement"):
        rendered: dict[str, Any] = {}
        fields = {
            "sid": "Sid",
            "effect": "Effect",
            "actions": "Action",
            "not_actions": "NotAction",
            "resources": "Resource",
            "not_resources": "NotResource",
        }
        for attr, key in fields.items():
            if attr in stmt.attrs:
                rendered[key] = evaluate(stmt.attrs[attr], scope)
        rendered.setdefault("Effect", "Allow")
        for kind, key in (("principals", "Principal"), ("not_principals", "NotPrincipal")):
            principals: dict[str, list[str]] = {}
            for p, pscope in inst.blocks(kind, scope, stmt):
                ptype = evaluate(p.attrs["type"], pscope)
                principals.setdefault(ptype, []).extend(evaluate(p.attrs["identifiers"], pscope))
            if principals:
                rendered[key] = principals
        conditions: dict[str, dict[str, list[Any]]] = {}
        for cond, cscope in inst.blocks("condition", scope, stmt):
            test = evaluate(cond.attrs["test"], cscope)
            variable = evaluate(cond.attrs["variable"], cscope)
            values = evaluate(cond.attrs["values"], cscope)
            conditions.setdefault(test, {}).setdefault(variable, []).extend(values)
        if conditions:
            rendered["Condition"] = conditions
        known = {"sid", "effect", "actions", "not_actions", "resources", "not_resources"}
        extra = set(stmt.attrs) - known
        nested = {b.type for b in stmt.blocks} - {
            "principals",
            "not_principals",
            "condition",
            "dynamic",
        }
        if extra or nested:
            raise EvalError(f"{inst.address}: statement has unsupported {sorted(extra | nested)}")
        statements.append(rendered)
    return {"Version": "2012-10-17", "Statement": statements}


@dataclass
class AttachedPolicy:
    """An identity policy attached to a role, and where it comes from."""

    role: str  # role name
    source: str  # resource address
    document: dict[str, Any] | None  # None: a managed policy this configuration cannot see into
    arn: str | None = None


@dataclass
class RolePolicies:
    """Every identity policy the configuration attaches to each role name."""

    by_role: dict[str, list[AttachedPolicy]] = field(default_factory=dict)

    def add(self, policy: AttachedPolicy) -> None:
        self.by_role.setdefault(policy.role, []).append(policy)


def role_policies(config: Config) -> RolePolicies:
    """All identity policies attached to roles, by every route Terraform's AWS provider offers."""
    out = RolePolicies()
    managed = {inst.attr("arn"): inst for inst in config.instances_of("aws_iam_policy")}

    def attach(role: str, arn: str, source: str) -> None:
        inst = managed.get(arn)
        document = json.loads(inst.attr("policy")) if inst is not None else None
        out.add(AttachedPolicy(role, source, document, arn))

    for inst in config.instances_of("aws_iam_role_policy"):
        out.add(AttachedPolicy(inst.attr("role"), inst.address, json.loads(inst.attr("policy"))))
    for inst in config.instances_of("aws_iam_role_policy_attachment"):
        attach(inst.attr("role"), inst.attr("policy_arn"), inst.address)
    for inst in config.instances_of("aws_iam_policy_attachment"):
        for role in inst.attr("roles") if inst.has("roles") else []:
            attach(role, inst.attr("policy_arn"), inst.address)
    for inst in config.instances_of("aws_iam_role_policy_attachments_exclusive"):
        for arn in inst.attr("policy_arns"):
            attach(inst.attr("role_name"), arn, inst.address)
    for inst in config.instances_of("aws_iam_role"):
        role = inst.attr("name")
        for inline, scope in inst.blocks("inline_policy"):
            if "policy" in inline.attrs:
                document = json.loads(evaluate(inline.attrs["policy"], scope))
                out.add(AttachedPolicy(role, f"{inst.address}.inline_policy", document))
        if inst.has("managed_policy_arns"):
            for arn in inst.attr("managed_policy_arns"):
                attach(role, arn, f"{inst.address}.managed_policy_arns")
    return out
