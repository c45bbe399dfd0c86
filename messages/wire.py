"""The outside contract (docs/contract.md): what other teams code against.

Kafka in (`ChatRequest`, `ControlMessage`), Redis out (`StreamEvent` and the
event bodies). Each type is versioned by the `v` field; new fields must get
defaults so older producers keep working.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from itertools import accumulate
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
from msgspec import Meta

from messages.images import Image, ImageProblem, check_image
from messages.schemas import SchemaLimits, SchemaProblem, check_schema

SCHEMA_VERSION = 1  # what a request means when it says no `v`
SCHEMA_VERSIONS = (1, 2, 3)  # contract 2.1: v2 and v3 are additive
MAX_TOOLS = 64
MAX_TOOL_RESULTS = 64
MAX_DESCRIPTION_CHARS = 4096
MAX_ATTACHMENTS = 8
MAX_HISTORY = 4096  # v3: carried messages
MAX_HISTORY_IMAGES = 64  # v3: images in the carried messages, all together
MAX_METADATA = 16  # v3: metadata pairs (OpenAI's limits: keys 64 chars, values 512)

# contract 2.1: ids are 1-128 chars of [A-Za-z0-9._:-]. (?!\n): Python's `$` also matches
# before a last newline, which an id must not end with (JSON Schema's `$` does not).
IDENT_PATTERN = r"^[A-Za-z0-9._:-]+$(?!\n)"
Ident = Annotated[str, Meta(min_length=1, max_length=128, pattern=IDENT_PATTERN)]
UnitFloat = Annotated[float, Meta(ge=0.0, le=1.0)]


def is_ident(value: object) -> bool:
    """Is `value` an id of the contract (1-128 chars of [A-Za-z0-9._:-])?"""
    return isinstance(value, str) and 0 < len(value) <= 128 \
        and re.fullmatch(r"[A-Za-z0-9._:-]+", value) is not None


class BadInput(ValueError):
    """A message broke the contract. `field` is a JSON path, `rule` what it broke."""

    def __init__(self, field: str, rule: str, *, job_id: str | None = None,
                 user_id: str | None = None, session_id: str | None = None) -> None:
        super().__init__(f"{field}: {rule}" if field else rule)
        self.field = field
        self.rule = rule
        self.job_id = job_id
        self.user_id = user_id
        self.session_id = session_id


class Params(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: (
        Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=4)]
        | None
    ) = None
    # v2
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # v3: passed on to aliases that take them, left out for the rest
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    logit_bias: (Annotated[dict[Annotated[str, Meta(pattern=r"^[0-9]{1,10}$")],
                                Annotated[int, Meta(ge=-100, le=100)]], Meta(max_length=300)]
                 | None) = None


# contract 2.1, version 2.
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Tool(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    name: ToolName
    description: Annotated[str, Meta(max_length=MAX_DESCRIPTION_CHARS)] = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}})


class ToolChoiceName(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: ToolName


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceName


class ToolResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)]
    content: str


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    type: Literal["text", "json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: ToolName | None = None
    strict: bool | None = None


class Attachment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An image: a data URL, or an https URL of an allowed host (messages.images)."""

    type: Literal["image"]
    url: Annotated[str, Meta(min_length=1)]


class TextPart(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="image"):
    """An image of a carried user message: checked as an attachment is."""

    url: Annotated[str, Meta(min_length=1)]


class CarriedCall(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call an assistant message of the carried history made."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    name: ToolName
    arguments: str


class CarriedMessage(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """v3: one message of the history a request carries (contract 2.1). `content` is
    text, or (a user message) text and image parts in order."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] = ""
    tool_calls: Annotated[list[CarriedCall], Meta(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def images(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [part.url for part in self.content if isinstance(part, ImagePart)]


class RagOptions(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    collection: Ident | None = None
    top_k: Annotated[int, Meta(ge=1, le=50)] | None = None  # None: rag.top_k of the config
    where: dict[str, Any] | None = None


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A value on `chat.request`. Unknown fields are ignored (forward compatibility)."""

    job_id: Ident
    user_id: Ident
    session_id: Ident
    message: str  # non-empty, unless v2 toolResults answer a call (then it may be "")
    mode: Literal["gen", "rag"] = "gen"
    model: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    params: Params = Params()
    timeout_s: Annotated[float, Meta(gt=0.0)] | None = None
    rag: RagOptions | None = None
    trace_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    v: int = SCHEMA_VERSION
    # v2 (contract 2.1): each needs "v": 2.
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    tool_results: Annotated[list[ToolResult], Meta(max_length=MAX_TOOL_RESULTS)] | None = None
    response_format: ResponseFormat | None = None
    attachments: Annotated[list[Attachment], Meta(max_length=MAX_ATTACHMENTS)] | None = None
    # v3 (contract 2.1): each needs "v": 3.
    history: Annotated[list[CarriedMessage], Meta(max_length=MAX_HISTORY)] | None = None
    store: bool | None = None  # False: no message rows (absent: stored, as before v3)
    api_key_id: Ident | None = None  # the gateway's: the API key that sent it
    end_user: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    metadata: (Annotated[dict[Annotated[str, Meta(min_length=1, max_length=64)],
                              Annotated[str, Meta(max_length=512)]], Meta(max_length=MAX_METADATA)]
               | None) = None

    @property
    def carried(self) -> bool:
        """v3: the request carries its history (never read from the session, no system
        prompt added, never trimmed)."""
        return self.history is not None

    @property
    def stored(self) -> bool:
        return self.store is not False


class _Ids(msgspec.Struct, rename="camel"):
    """The lenient view used to find who to tell when a request is bad."""

    job_id: Any = None
    user_id: Any = None
    session_id: Any = None


_request_decoder = msgspec.json.Decoder(ChatRequest)
_ids_decoder = msgspec.json.Decoder(_Ids)


# contract 2.1: no value may nest deeper than this (the request object itself is level 1).
MAX_DEPTH = 32
MAX_CONTROL_BYTES = 64 * 1024
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
NUL, ESCAPED_NUL = "\x00", "\\u0000"
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _nesting(raw: bytes) -> int:
    """How deep the JSON in `raw` nests, counted without decoding it: the decoder
    recurses, so a value nested 50,000 deep must never reach it. C-speed passes
    (a regex, translate, accumulate) keep this linear and short even at 1 MB."""
    if len(raw.translate(None, _NOT_BRACKETS)) <= MAX_DEPTH:
        return 0  # within the limit: too few brackets anywhere, strings included
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_DEPTH:
        return len(brackets)  # an upper bound, and within the limit
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)))


def check_shape(raw: bytes, max_bytes: int) -> None:
    """Size and nesting, checked before any decoder sees the value."""
    if len(raw) > max_bytes:
        raise BadInput("$", f"the value is {len(raw)} bytes; the limit is {max_bytes}")
    depth = _nesting(raw)
    if depth > MAX_DEPTH:
        raise BadInput("$", f"the value nests {depth} levels deep; the limit is {MAX_DEPTH}")


def _nul_at(value: Any, path: str) -> str | None:
    """The JSON path of the first string (or key) holding U+0000, if any."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for key, item in cast(dict[str, Any], value).items():
            where = f"{path}.{key.replace(NUL, ESCAPED_NUL)}"
            found = where if NUL in key else _nul_at(item, where)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(cast(list[Any], value)):
            found = _nul_at(item, f"{path}[{index}]")
            if found:
                return found
    return None


# rag.where: the metadata filter grammar Chroma accepts, checked here so a filter it
# would refuse is bad input naming the rule, not a failed job.
MAX_WHERE_TERMS = 64
_COMPARE = frozenset({"$gt", "$gte", "$lt", "$lte"})
_EQUAL = frozenset({"$eq", "$ne"})
_MEMBER = frozenset({"$in", "$nin"})
_LOGICAL = frozenset({"$and", "$or"})


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _where_problem(where: Any, path: str, terms: list[int]) -> tuple[str, str] | None:
    """(path, rule) of the first thing Chroma would refuse in a `where` filter."""
    terms[0] += 1
    if terms[0] > MAX_WHERE_TERMS:
        return path, f"a filter may hold at most {MAX_WHERE_TERMS} conditions"
    if not isinstance(where, dict) or len(cast(dict[str, Any], where)) != 1:
        return path, "must be an object with exactly one field or one of $and, $or"
    ((key, value),) = cast(dict[str, Any], where).items()
    here = f"{path}.{key}"
    if key in _LOGICAL:
        if not isinstance(value, list) or len(cast(list[Any], value)) < 2:
            return here, "must be a list of at least two filters"
        for index, item in enumerate(cast(list[Any], value)):
            if found := _where_problem(item, f"{here}[{index}]", terms):
                return found
        return None
    if key.startswith("$"):
        return here, f"unknown operator (use a field name, {', '.join(sorted(_LOGICAL))})"
    if _is_scalar(value):
        return None
    if not isinstance(value, dict) or len(cast(dict[str, Any], value)) != 1:
        return here, "must be a string, number or boolean, or an object with one operator"
    ((operator, operand),) = cast(dict[str, Any], value).items()
    at = f"{here}.{operator}"
    if operator in _COMPARE:
        ok = isinstance(operand, int | float) and not isinstance(operand, bool)
        return None if ok else (at, "must be a number")
    if operator in _EQUAL:
        return None if _is_scalar(operand) else (at, "must be a string, number or boolean")
    if operator in _MEMBER:
        items = cast(list[Any], operand) if isinstance(operand, list) else []
        ok = bool(items) and all(_is_scalar(item) for item in items)
        return None if ok else (at, "must be a non-empty list of strings, numbers or booleans")
    known = ", ".join(sorted(_COMPARE | _EQUAL | _MEMBER))
    return at, f"unknown operator (known: {known})"


def _readable_ids(raw: bytes) -> dict[str, str | None]:
    try:
        ids = _ids_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {"job_id": None, "user_id": None, "session_id": None}

    def ok(value: Any) -> str | None:
        return value if is_ident(value) else None

    return {"job_id": ok(ids.job_id), "user_id": ok(ids.user_id),
            "session_id": ok(ids.session_id)}


def _field_of(error_text: str) -> tuple[str, str]:
    # msgspec says "Expected `int`, got `str` - at `$.params.maxTokens`".
    rule, sep, where = error_text.rpartition(" - at ")
    where = where.strip("`") if sep else "$"
    rule = rule if sep else error_text
    if where.startswith("key` in `"):  # a map's key: "... - at `key` in `$.metadata`"
        where, rule = where.removeprefix("key` in `"), f"a key: {rule}"
    missing = re.match(r"Object missing required field `(.+)`", rule)
    if missing:
        return f"{where}.{missing.group(1)}", "required field is missing"
    return where, rule


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("$", f"the value is not UTF-8 ({exc.reason} at byte {exc.start})") from exc


_V2_FIELDS = (("tools", "tools"), ("tool_choice", "toolChoice"), ("tool_results", "toolResults"),
              ("response_format", "responseFormat"), ("attachments", "attachments"))
_V2_PARAMS = (("seed", "seed"), ("reasoning_effort", "reasoningEffort"))
_V3_FIELDS = (("history", "history"), ("store", "store"), ("api_key_id", "apiKeyId"),
              ("end_user", "endUser"), ("metadata", "metadata"))
_V3_PARAMS = (("frequency_penalty", "frequencyPenalty"), ("presence_penalty", "presencePenalty"),
              ("logit_bias", "logitBias"))


def _fields_used(request: ChatRequest, fields: tuple[tuple[str, str], ...],
                 params: tuple[tuple[str, str], ...]) -> list[str]:
    return ([f"$.{name}" for field, name in fields if getattr(request, field) is not None]
            + [f"$.params.{name}" for field, name in params
               if getattr(request.params, field) is not None])


def _check_version(request: ChatRequest, ids: dict[str, str]) -> None:
    """`v` is 1, 2 or 3, and a field of a version comes only with a `v` at least that
    (contract 2.1): a worker that predates it refuses such a request instead of
    silently dropping the field."""
    if request.v not in SCHEMA_VERSIONS:
        raise BadInput("$.v", f"unsupported schema version {request.v} (this worker reads "
                       f"{', '.join(map(str, SCHEMA_VERSIONS))})", **ids)
    if request.v < 2 and (used := _fields_used(request, _V2_FIELDS, _V2_PARAMS)):
        raise BadInput(used[0], 'a version 2 field: the request must say "v": 2 (or 3)', **ids)
    if request.v < 3 and (used := _fields_used(request, _V3_FIELDS, _V3_PARAMS)):
        raise BadInput(used[0], 'a version 3 field: the request must say "v": 3', **ids)


def _check_history(request: ChatRequest, *, max_message_chars: int, max_bytes: int,
                   url_hosts: Collection[str], ids: dict[str, str]) -> None:
    """v3: each carried message is one a vendor takes: tool calls only on an assistant
    message, a tool message names its call, images only in user messages (each checked
    as an attachment, at most MAX_HISTORY_IMAGES in all), text within the limit."""
    images = 0
    for n, message in enumerate(request.history or ()):
        at = f"$.history[{n}]"
        if message.tool_calls is not None and message.role != "assistant":
            raise BadInput(f"{at}.toolCalls", "only an assistant message makes tool calls",
                           **ids)
        if (message.tool_call_id is None) == (message.role == "tool"):
            raise BadInput(f"{at}.toolCallId", "required on a tool message, and only there",
                           **ids)
        if len(message.text()) > max_message_chars:
            raise BadInput(f"{at}.content",
                           f"longer than limits.max_message_chars ({max_message_chars})", **ids)
        if isinstance(message.content, str):
            continue
        for k, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                continue
            if message.role != "user":
                raise BadInput(f"{at}.content[{k}]", "images go in user messages only", **ids)
            images += 1
            if images > MAX_HISTORY_IMAGES:
                raise BadInput(f"{at}.content[{k}]", f"more than {MAX_HISTORY_IMAGES} images "
                               "in the history", **ids)
            try:
                check_image(part.url, max_bytes=max_bytes, url_hosts=url_hosts)
            except ImageProblem as exc:
                raise BadInput(f"{at}.content[{k}].url", str(exc), **ids) from None


def _check_tools(request: ChatRequest, ids: dict[str, str]) -> None:
    tools = request.tools or []
    names = [tool.name for tool in tools]
    for n, tool in enumerate(tools):
        kind = tool.parameters.get("type", "object")
        if kind != "object":
            raise BadInput(f"$.tools[{n}].parameters",
                           f'a JSON Schema of an object ("type": "object"), not {kind!r}', **ids)
        if tool.name in names[:n]:
            raise BadInput(f"$.tools[{n}].name", f"tool {tool.name!r} is named twice", **ids)
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceName) and choice.name not in names:
        known = ", ".join(names) or "no tools"
        raise BadInput("$.toolChoice.name", f"names no tool of the request ({known})", **ids)
    if choice in ("required",) and not tools:
        raise BadInput("$.toolChoice", '"required" needs tools', **ids)
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.schema is None:
        raise BadInput("$.responseFormat.schema", 'required when "type" is "json_schema"', **ids)
    seen: set[str] = set()
    for n, result in enumerate(request.tool_results or ()):
        if result.tool_call_id in seen:
            raise BadInput(f"$.toolResults[{n}].toolCallId",
                           f"{result.tool_call_id!r} is answered twice", **ids)
        seen.add(result.tool_call_id)


def _check_schemas(request: ChatRequest, limits: SchemaLimits, ids: dict[str, str]) -> None:
    """Each tool's parameters and the response schema within limits.max_schema_* (contract
    2.1): a vendor library may expand their $refs, so they are measured as expanded."""
    schemas = [(f"$.tools[{n}].parameters", tool.parameters)
               for n, tool in enumerate(request.tools or ())]
    fmt = request.response_format
    if fmt is not None and fmt.schema is not None:
        schemas.append(("$.responseFormat.schema", fmt.schema))
    for field, schema in schemas:
        try:
            check_schema(schema, limits)
        except SchemaProblem as exc:
            raise BadInput(field + exc.where, exc.rule, **ids) from None


def request_images(request: ChatRequest, *, max_bytes: int,
                   url_hosts: Collection[str]) -> list[Image]:
    """The request's attachments, checked (contract 2.1 v2), or BadInput naming the rule."""
    images: list[Image] = []
    for n, attachment in enumerate(request.attachments or ()):
        try:
            images.append(check_image(attachment.url, max_bytes=max_bytes, url_hosts=url_hosts))
        except ImageProblem as exc:
            raise BadInput(f"$.attachments[{n}].url", str(exc), job_id=request.job_id,
                           user_id=request.user_id, session_id=request.session_id) from None
    return images


def decode_request(
    raw: bytes | None, *, max_message_chars: int, model_aliases: frozenset[str],
    max_request_bytes: int = 1024 * 1024, max_attachment_bytes: int = 512 * 1024,
    image_url_hosts: Collection[str] = (), max_schema_bytes: int = 65_536,
    max_schema_depth: int = 32, max_schema_expanded_bytes: int = 262_144,
) -> ChatRequest:
    """Decode and validate one `chat.request` value, or raise BadInput naming the problem.
    Nothing else escapes: whatever the bytes, the answer is a request or a BadInput."""
    if raw is None:
        raise BadInput("$", "the message has no value")
    check_shape(raw, max_request_bytes)
    text = _utf8(raw)
    try:
        request = _request_decoder.decode(text)
    except msgspec.ValidationError as exc:
        field, rule = _field_of(str(exc))
        raise BadInput(field, rule, **_readable_ids(raw)) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadInput("$", f"the value is not a JSON object: {exc}") from exc
    ids = {"job_id": request.job_id, "user_id": request.user_id,
           "session_id": request.session_id}
    # Postgres cannot store U+0000; JSON can only carry it escaped, so look closer
    # only when the escape is there.
    if b"\\u0000" in raw:
        where = _nul_at(msgspec.to_builtins(request), "$")
        if where is not None:
            raise BadInput(where, "contains U+0000, which cannot be stored", **ids)
    _check_version(request, ids)
    if request.rag is not None and request.rag.where is not None:
        problem = _where_problem(request.rag.where, "$.rag.where", [0])
        if problem is not None:
            raise BadInput(*problem, **ids)
    if not request.message and not request.tool_results and not (
            request.v >= 3 and request.attachments):  # v3: images alone are a message
        raise BadInput("$.message", "Expected `str` of length >= 1", **ids)
    if len(request.message) > max_message_chars:
        raise BadInput("$.message", f"longer than limits.max_message_chars ({max_message_chars})",
                       **ids)
    for n, result in enumerate(request.tool_results or ()):
        if len(result.content) > max_message_chars:
            raise BadInput(f"$.toolResults[{n}].content",
                           f"longer than limits.max_message_chars ({max_message_chars})", **ids)
    _check_tools(request, ids)
    _check_schemas(request, SchemaLimits(max_bytes=max_schema_bytes, max_depth=max_schema_depth,
                                         max_expanded_bytes=max_schema_expanded_bytes), ids)
    request_images(request, max_bytes=max_attachment_bytes, url_hosts=image_url_hosts)
    _check_history(request, max_message_chars=max_message_chars, max_bytes=max_attachment_bytes,
                   url_hosts=image_url_hosts, ids=ids)
    if request.model is not None and request.model not in model_aliases:
        known = ", ".join(sorted(model_aliases))
        raise BadInput("$.model", f"unknown model alias {request.model!r} (known: {known})", **ids)
    return request


# --- chat.control -----------------------------------------------------------------

class CancelRequested(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                      tag_field="type", tag="cancel"):
    job_id: Ident
    user_id: Ident
    reason: Annotated[str, Meta(max_length=512)] = ""


ControlMessage = CancelRequested
_control_decoder = msgspec.json.Decoder(ControlMessage)


def decode_control(raw: bytes | None) -> ControlMessage:
    """Decode one `chat.control` value, or raise BadInput; nothing else escapes."""
    if raw is None:
        raise BadInput("$", "the message has no value")
    check_shape(raw, MAX_CONTROL_BYTES)
    text = _utf8(raw)  # msgspec raises UnicodeDecodeError on bytes: it stopped the worker
    try:
        return _control_decoder.decode(text)
    except msgspec.ValidationError as exc:
        field, rule = _field_of(str(exc))
        raise BadInput(field, rule) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadInput("$", f"the value is not a JSON object: {exc}") from exc


# --- Redis stream events (contract 3) ----------------------------------------------

class _Event(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An event body; `EVENT` is the entry's `event` field."""

    EVENT: ClassVar[str]


class Resumes(msgspec.Struct, frozen=True, kw_only=True):
    """Keep the first `chars` characters (code points) of `attempt`'s text: this
    attempt continues it."""

    attempt: int
    chars: int


# Why a later attempt starts the answer over instead of continuing it (contract 3.3).
RestartReason = Literal["nothing_streamed", "stream_lost", "vendor", "vendor_refused",
                        "tool_call", "reasoning", "split_character", "think_block"]


class Restarts(msgspec.Struct, frozen=True, kw_only=True):
    """This attempt starts over from `attempt`'s answer, for `reason`."""

    attempt: int
    reason: RestartReason


class Started(_Event, frozen=True, omit_defaults=True):
    """The job was admitted. Attempt > 1: discard what an earlier attempt streamed,
    unless `resumes` says how much of it this attempt continues; `restarts` says why
    it does not."""

    EVENT: ClassVar[str] = "started"
    model: str
    mode: str
    attempt: int
    resumes: Resumes | None = None
    restarts: Restarts | None = None


class RetrievalHit(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    score: float
    source: str
    snippet: str


class Retrieval(_Event, frozen=True):
    """One RAG step (vector, keyword, fused...) and the chunks it found."""

    EVENT: ClassVar[str] = "retrieval"
    step: str
    query: str
    hits: list[RetrievalHit]


class Token(_Event, frozen=True):
    """Answer text (one or more tokens, coalesced): append it to the answer."""

    EVENT: ClassVar[str] = "token"
    text: str


class Reasoning(_Event, frozen=True):
    """v2: the model's reasoning (thinking) text, apart from `token` and never in it."""

    EVENT: ClassVar[str] = "reasoning"
    text: str


class ToolCall(_Event, frozen=True):
    """v2: one complete tool call; `arguments` is the vendor's JSON text, byte for byte."""

    EVENT: ClassVar[str] = "tool_call"
    index: int
    id: str
    name: str
    arguments: str


class ProviderSwitched(_Event, frozen=True):
    """A retry or a fallback switched provider mid-job; the answer goes on."""

    EVENT: ClassVar[str] = "provider"
    from_: str = msgspec.field(name="from")
    to: str
    reason: str


class Usage(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """contract 3's one accounting rule: `prompt_tokens` counts every prompt token, the
    cached ones (read or written) parts of it; `completion_tokens` every generated token,
    the reasoning ones part of it. The v2 parts are omitted when 0."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # v2: prompt tokens read from the vendor's cache
    cache_write_tokens: int = 0  # v2: prompt tokens written to it
    reasoning_tokens: int = 0  # v2: completion tokens spent reasoning


class Final(_Event, frozen=True, omit_defaults=True):
    """The answer is complete: its whole text, usage and cost."""

    EVENT: ClassVar[str] = "final"
    text: str
    finish_reason: str
    usage: Usage
    cost_usd: float | None
    model: str
    sources: list[str] = []  # RAG: the chunk ids the prompt held (omitted when empty)
    provider: str = ""  # the vendor that answered (LiteLLM's name: openai, anthropic, ...)
    retries: int = 0  # tries again on the same alias (omitted when 0)
    fallbacks: int = 0  # switches to a fallback alias (omitted when 0)
    # U+0000 characters removed from the vendor's text, the only thing it lost
    # (Postgres cannot store them; omitted when 0)
    nul_removed: int = 0
    tool_calls: list[ToolCall] = []  # v2: when finishReason is tool_calls (omitted when none)


class Error(_Event, frozen=True, omit_defaults=True):
    """Something failed; always followed by `done`."""

    EVENT: ClassVar[str] = "error"
    code: str
    message: str
    retryable: bool
    # A refusal that may pass later (rate_limited, session_busy): in how many seconds
    # (omitted when unknown)
    retry_after_s: float | None = None


DoneStatus = Literal["completed", "cancelled", "timeout", "failed", "rejected"]


class Done(_Event, frozen=True):
    """The job ended: exactly once per job, always the last entry."""

    EVENT: ClassVar[str] = "done"
    status: DoneStatus
    partial: bool


EventBody = (Started | Retrieval | Token | Reasoning | ToolCall | ProviderSwitched | Final | Error
             | Done)

_body_encoder = msgspec.json.Encoder()


def event_data(body: EventBody) -> bytes:
    """The `data` field of a stream entry: the body as camelCase JSON."""
    return _body_encoder.encode(body)


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One Redis stream entry, as the gateway reads it."""

    event: str
    job_id: str
    user_id: str
    session_id: str
    attempt: int
    seq: int
    ts: int  # milliseconds since the epoch
    data: bytes  # JSON

    def fields(self) -> dict[str, str | bytes | int]:
        return {"event": self.event, "jobId": self.job_id, "userId": self.user_id,
                "sessionId": self.session_id, "attempt": self.attempt, "seq": self.seq,
                "ts": self.ts, "data": self.data}


def now_ms() -> int:
    return time.time_ns() // 1_000_000
