"""The JSON Schemas a request hands to the vendor (tool parameters, the response
format), measured before anyone expands them (contract 2.1).

Vendor libraries inline `$ref`s for vendors that take none (LiteLLM on Gemini,
Vertex and Bedrock): a 2 KB schema whose definitions each refer to the next one
twice grows 4x every two levels, into gigabytes. So a schema is held to three
limits: its JSON size, its nesting depth and its size with its `$ref`s expanded,
both of the last two measured on the schema as it would be expanded. Neither is
found by building the expansion: each container's share is worked out once (memo
by identity), the walk never goes past the depth limit, and only containers whose
JSON holds a `$ref` are walked in Python at all (the rest count as written, read
at C speed). The work is linear in the schema whatever its references do.

The expansion measured replaces a `$ref`'s string by the expansion of its target
and keeps the object's other keys: `{"$ref": "#/$defs/a", "title": "A"}` becomes
`{"$ref": <a, expanded>, "title": "A"}`, a little larger and one level deeper than
an inliner's result, so it bounds that. The whole schema is expanded, its `$defs`
included. Only local references resolve (`#`, or `#` and a JSON pointer); any other
is bad input, as is a reference into itself (a cycle): a vendor library may expand
a recursive schema without end.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any, NamedTuple, cast
from urllib.parse import unquote

import msgspec

_encode = msgspec.json.Encoder().encode
Json = dict[str, Any] | list[Any] | str | int | float | bool | None


class SchemaLimits(NamedTuple):
    """limits.max_schema_* of the config (contract 5.1); the defaults are its defaults."""

    max_bytes: int = 65_536
    max_depth: int = 32
    max_expanded_bytes: int = 262_144


class SchemaProblem(ValueError):
    """The schema breaks a rule; `where` is the JSON path of the `$ref` at fault
    inside the schema ("" for the whole schema)."""

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(rule)
        self.where = where
        self.rule = rule
        self.anchored = False  # `where` starts at the schema: the walk adds nothing to it


def check_schema(schema: dict[str, Any], limits: SchemaLimits) -> None:
    """Raise SchemaProblem if `schema` is over a limit or has a `$ref` that does not
    resolve or refers back into itself."""
    encoded = _encode(schema)
    size = len(encoded)
    if size > limits.max_bytes:
        raise SchemaProblem("", f"the schema is {size} bytes of JSON; "
                                f"limits.max_schema_bytes is {limits.max_bytes}")
    if _REF in encoded:
        _Expansion(schema, size, limits).measure()
        return
    # No reference (the usual case): as written is as expanded.
    if _depth(encoded) > limits.max_depth:
        raise SchemaProblem("", _too_deep(limits))
    if size > limits.max_expanded_bytes:
        raise SchemaProblem("", _too_large(limits))


def _too_deep(limits: SchemaLimits) -> str:
    return (f"the schema nests more than {limits.max_depth} levels deep with its $refs "
            f"expanded; limits.max_schema_depth is {limits.max_depth}")


def _too_large(limits: SchemaLimits) -> str:
    return (f"the schema would be more than {limits.max_expanded_bytes} bytes with its $refs "
            f"expanded; limits.max_schema_expanded_bytes is {limits.max_expanded_bytes}")


_REF = b'"$ref"'  # JSON without it has nothing to expand
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_PEELS = 4


def _depth(encoded: bytes) -> int:
    """How deep JSON (one value, or several one after the other) nests, from its
    brackets outside strings, at C speed: a few passes each peel the innermost pairs
    (most schemas are shallow), then a running sum finds what is left."""
    brackets = _JSON_STRING.sub(b"", encoded).translate(None, _NOT_BRACKETS)
    for peeled in range(_PEELS):
        if not brackets:
            return peeled
        brackets = brackets.replace(b"[]", b"-").replace(b"{}", b"-").replace(b"-", b"")
    return _PEELS + max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


_FEW = 8  # a span of children at most this long is looked at child by child


def _holding_refs(values: list[Any], plain: list[bytes]) -> list[int]:
    """The indices of `values` whose JSON holds "$ref", in order; the JSON of the
    others goes to `plain`, as lists. Halving keeps a container of thousands of
    children to a few C-speed encodings."""
    found: list[int] = []
    spans = [(0, len(values))]
    while spans:
        low, high = spans.pop()
        if high - low > _FEW:
            encoded = _encode(values[low:high])
            if _REF not in encoded:
                plain.append(encoded)
            else:
                middle = (low + high) // 2
                spans += [(middle, high), (low, middle)]
            continue
        for index in range(low, high):
            value: Json = values[index]
            if type(value) is dict:
                if len(value) == 1 and type(value.get("$ref")) is str:
                    found.append(index)  # the usual {"$ref": ...}: no need to encode it
                    continue
            elif type(value) is not list:
                continue
            encoded = _encode(value)
            if _REF in encoded:
                found.append(index)
            else:
                plain.append(b"[" + encoded + b"]")
    return found


class _Over(Exception):
    """The walk passed a limit; the message says which."""


class _Expansion:
    """One schema's expanded size and depth, worked out without building it."""

    def __init__(self, root: dict[str, Any], size: int, limits: SchemaLimits) -> None:
        self.root = root
        self.limits = limits
        self.size = size
        # A container's expansion is never below 0 bytes, so what it adds is at least
        # minus its written size, at most the schema's: a sum past this is over.
        self.ceiling = limits.max_expanded_bytes + size
        # By container identity: (bytes its expansion adds to it as written, its depth).
        self.done: dict[int, tuple[int, int]] = {}
        self.open: set[int] = set()  # containers being measured: a ref to one is a cycle
        self.followed: dict[str, tuple[int, int]] = {}  # by ref: (bytes it adds, depth)

    def measure(self) -> None:
        try:
            extra, _ = self.walk(self.root, 1)
        except _Over as over:
            raise SchemaProblem("", str(over)) from None
        if self.size + extra > self.limits.max_expanded_bytes:
            raise SchemaProblem("", _too_large(self.limits))

    def walk(self, node: dict[str, Any] | list[Any], level: int) -> tuple[int, int]:
        """(bytes its expansion adds to `node` as written, the depth of that expansion),
        `node` being at nesting `level` (the schema itself is 1). Never deeper than the
        depth limit, so the recursion is bounded whatever the references do."""
        key = id(node)
        known = self.done.get(key)
        if known is not None:
            if level - 1 + known[1] > self.limits.max_depth:
                raise _Over(_too_deep(self.limits))
            return known
        if level > self.limits.max_depth:
            raise _Over(_too_deep(self.limits))
        self.open.add(key)
        extra = deepest = 0
        if type(node) is dict:
            values = list(node.values())
            ref = node.get("$ref")
            if type(ref) is str:
                try:
                    extra, deepest = self.follow(ref, level + 1)
                except SchemaProblem as problem:
                    _prefix(problem, ".$ref")
                    raise
        else:
            values = cast(list[Any], node)
        plain: list[bytes] = []  # the JSON of the children that hold no $ref
        index, alone = 0, False
        try:
            for index in _holding_refs(values, plain):
                value: Json = values[index]
                alone = False
                if type(value) is dict:
                    ref = value.get("$ref") if len(value) == 1 else None
                    alone = type(ref) is str
                    if type(ref) is str:  # {"$ref": ...} by itself, the usual case: no memo
                        grows, depth = self.follow(ref, level + 2)
                        depth += 1
                    else:
                        grows, depth = self.walk(value, level + 1)
                elif type(value) is list:
                    grows, depth = self.walk(value, level + 1)
                else:
                    continue  # a string that reads "$ref" (or the ref itself): as written
                extra += grows
                if depth > deepest:
                    deepest = depth
        except SchemaProblem as problem:
            _prefix(problem, (f"[{index}]" if type(node) is list else f".{list(node)[index]}")
                    + (".$ref" if alone else ""))
            raise
        if extra > self.ceiling:
            raise _Over(_too_large(self.limits))
        if plain:  # each piece is a list of children: one level more than they
            deepest = max(deepest, _depth(b"".join(plain)) - 1)
        if level + deepest > self.limits.max_depth:
            raise _Over(_too_deep(self.limits))
        self.open.discard(key)
        self.done[key] = found = (extra, deepest + 1)
        return found

    def follow(self, ref: str, level: int) -> tuple[int, int]:
        """What replacing the string `ref` (at `level`) by its target's expansion adds,
        and the depth of that expansion."""
        known = self.followed.get(ref)
        if known is not None:  # its target is measured, so no cycle runs through it
            if level - 1 + known[1] > self.limits.max_depth:
                raise _Over(_too_deep(self.limits))
            return known
        target = self.resolve(ref)
        if type(target) is dict or type(target) is list:
            container = cast(dict[str, Any] | list[Any], target)
            if id(container) in self.open:
                raise SchemaProblem("", f"$ref {ref!r} refers back into itself (a cycle); "
                                    "a recursive schema is not accepted")
            try:
                grows, depth = self.walk(container, level)
            except SchemaProblem as problem:  # at fault inside the target: say where it is
                _prefix(problem, _json_path(ref))
                problem.anchored = True
                raise
            whole = len(_encode(container)) + grows
        else:
            whole, depth = len(_encode(target)), 0
        if whole > self.limits.max_expanded_bytes:  # it is in the expansion at least once
            raise _Over(_too_large(self.limits))
        self.followed[ref] = found = (whole - len(_encode(ref)), depth)
        return found

    def resolve(self, ref: str) -> object:
        """The value a local `$ref` points to: `#` is the schema, `#/a/b` a JSON
        pointer into it (RFC 6901, percent-decoded as a URI fragment)."""
        if not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
            raise SchemaProblem("", f"$ref {ref!r} does not resolve: only a local reference "
                                "(# and a JSON pointer) is accepted")
        node: object = self.root
        try:
            for step in _pointer(ref):
                node = _member(node, step)
        except LookupError:
            raise SchemaProblem("", f"$ref {ref!r} does not resolve: nothing in the schema "
                                "is at that pointer") from None
        return node


def _member(node: object, step: str) -> object:
    """The member `step` of a JSON object or array (LookupError: there is none)."""
    if isinstance(node, dict):
        return cast(dict[str, Any], node)[step]
    if isinstance(node, list) and step.isdigit() and step == str(int(step)):
        return cast(list[Any], node)[int(step)]
    raise LookupError(step)


def _pointer(ref: str) -> list[str]:
    """The steps of a local ref's JSON pointer."""
    if len(ref) == 1:
        return []
    return [token.replace("~1", "/").replace("~0", "~")
            for token in unquote(ref[2:]).split("/")]


def _json_path(ref: str) -> str:
    return "".join(f"[{step}]" if step.isdigit() else f".{step}" for step in _pointer(ref))


def _prefix(problem: SchemaProblem, step: str) -> None:
    if not problem.anchored:
        problem.where = step + problem.where
