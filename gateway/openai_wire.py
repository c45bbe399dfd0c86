"""OpenAI's Chat Completions on the contract (docs/contract.md 7.2), sans I/O.

`to_request` turns a `POST /v1/chat/completions` body into a contract v3 request
(the messages before the last user turn are its carried `history`) or an
`OpenAIError` naming the parameter. `Chunks` turns a job's stream entries into
`chat.completion.chunk` lines; `completion` turns them into one `chat.completion`.
`failure` gives a refusal or failure the HTTP status and error body OpenAI's SDKs
map to their exception classes. Nothing here reads a socket or a clock it is not
given.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import msgspec

from messages.ports import Entry, int_field


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None, retry: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.retry = retry  # False: `x-should-retry: false` (a retry cannot fix it)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code, retry=False)


@dataclass(frozen=True)
class Translated:
    """A body as a contract v3 request (without the ids the gateway assigns)."""

    value: dict[str, Any]
    model: str  # the alias the client named
    stream: bool
    include_usage: bool


# -- the request ----------------------------------------------------------------------

def _obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(param, f"{param} must be an object")
    return cast(dict[str, Any], value)


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise bad(param, f"{param} must be an array")
    return cast(list[Any], value)


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise bad(param, f"{param} must be a string")
    return value


def _number(value: Any, param: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(param, f"{param} must be a number")
    return value


def _int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(param, f"{param} must be an integer")
    return value


def _bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise bad(param, f"{param} must be true or false")
    return value


def _content(value: Any, param: str, *, images: bool) -> tuple[str, list[dict[str, str]]]:
    """A message's content as (text, parts): parts are the v3 ones, text and images in
    order, when the content has an image; else [] and the text alone."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    parts: list[dict[str, str]] = []
    text: list[str] = []
    for k, raw in enumerate(_list(value, param)):
        at = f"{param}[{k}]"
        part = _obj(raw, at)
        kind = part.get("type")
        if kind == "text":
            piece = _str(part.get("text"), f"{at}.text")
        elif kind == "refusal":  # an assistant's earlier refusal, sent back as its text
            piece = _str(part.get("refusal"), f"{at}.refusal")
        elif kind == "image_url" and images:
            image: Any = part.get("image_url")
            url: Any = cast(dict[str, Any], image).get("url") if isinstance(image, dict) else image
            parts.append({"type": "image", "url": _str(url, f"{at}.image_url.url")})
            continue
        elif kind == "image_url":
            raise bad(f"{at}.type", "images go in user messages only")
        else:
            raise bad(f"{at}.type", f"content parts of type {kind!r} are not supported here "
                      "(text and image_url are)")
        text.append(piece)
        parts.append({"type": "text", "text": piece})
    joined = "".join(text)
    return joined, parts if any(p["type"] == "image" for p in parts) else []


def _tool_calls(value: Any, param: str) -> list[dict[str, str]]:
    calls: list[dict[str, str]] = []
    for k, raw in enumerate(_list(value, param)):
        at = f"{param}[{k}]"
        call = _obj(raw, at)
        if call.get("type", "function") != "function":
            raise bad(f"{at}.type", f"tool calls of type {call.get('type')!r} are not "
                      "supported (function is)")
        function = _obj(call.get("function"), f"{at}.function")
        calls.append({"id": _str(call.get("id"), f"{at}.id"),
                      "name": _str(function.get("name"), f"{at}.function.name"),
                      "arguments": _str(function.get("arguments", ""),
                                        f"{at}.function.arguments")})
    return calls


def _message(raw: Any, n: int) -> dict[str, Any]:
    """One of `messages` as a v3 carried message."""
    at = f"messages[{n}]"
    message = _obj(raw, at)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad(f"{at}.role", f"role {role!r} is not supported (system, developer, user, "
                  "assistant and tool are)")
    for legacy in ("function_call", "audio"):
        if message.get(legacy) is not None:
            raise bad(f"{at}.{legacy}", f"{legacy} is not supported")
    text, parts = _content(message.get("content"), f"{at}.content", images=role == "user")
    carried: dict[str, Any] = {"role": role, "content": parts or text}
    if role == "assistant" and message.get("tool_calls"):
        carried["toolCalls"] = _tool_calls(message["tool_calls"], f"{at}.tool_calls")
    if role == "tool":
        carried["toolCallId"] = _str(message.get("tool_call_id"), f"{at}.tool_call_id")
    elif message.get("content") is None and "toolCalls" not in carried:
        raise bad(f"{at}.content", "content is required")
    return carried


def _split(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The messages as history + the new turn: the last user message (`message`, its
    images as `attachments`), or the tool results answering the last assistant
    message's calls (`toolResults`)."""
    last = messages[-1]
    if last["role"] == "user":
        content = last["content"]
        if isinstance(content, str):
            return {"history": messages[:-1], "message": content}
        text = "".join(p["text"] for p in content if p["type"] == "text")
        images = [{"type": "image", "url": p["url"]} for p in content if p["type"] == "image"]
        return {"history": messages[:-1], "message": text, "attachments": images}
    if last["role"] == "tool":
        first = len(messages)
        while first > 0 and messages[first - 1]["role"] == "tool":
            first -= 1
        results = [{"toolCallId": m["toolCallId"],
                    "content": m["content"] if isinstance(m["content"], str) else "".join(
                        p.get("text", "") for p in m["content"])} for m in messages[first:]]
        return {"history": messages[:first], "message": "", "toolResults": results}
    raise bad(f"messages[{len(messages) - 1}].role",
              "the last message must be a user message or tool results")


def _no_op(body: Mapping[str, Any]) -> None:
    """Parameters we cannot honour are refused by name; at their no-op value, taken."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n", "only n = 1 is supported: send one request per choice")
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "logprobs are not supported")
    if body.get("top_logprobs") not in (None, 0):
        raise bad("top_logprobs", "logprobs are not supported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("modalities", 'only ["text"] output is supported')
    for name, why in (("audio", "audio output is not supported"),
                      ("prediction", "predicted outputs are not supported"),
                      ("web_search_options", "web search is not supported"),
                      ("functions", "functions is not supported: use tools"),
                      ("function_call", "function_call is not supported: use tool_choice")):
        if body.get(name) is not None:
            raise bad(name, why)
    if body.get("parallel_tool_calls") is not None:
        _bool(body["parallel_tool_calls"], "parallel_tool_calls")


def _tools(value: Any) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for k, raw in enumerate(_list(value, "tools")):
        tool = _obj(raw, f"tools[{k}]")
        if tool.get("type") != "function":
            raise bad(f"tools[{k}].type", f"tools of type {tool.get('type')!r} are not "
                      "supported (function is)")
        function = _obj(tool.get("function"), f"tools[{k}].function")
        entry: dict[str, Any] = {"name": _str(function.get("name"), f"tools[{k}].function.name")}
        if function.get("description") is not None:
            entry["description"] = _str(function["description"],
                                        f"tools[{k}].function.description")
        if function.get("parameters") is not None:
            entry["parameters"] = _obj(function["parameters"], f"tools[{k}].function.parameters")
        tools.append(entry)
    return tools


def _tool_choice(value: Any) -> Any:
    if value in ("auto", "none", "required"):
        return value
    choice = _obj(value, "tool_choice")
    if choice.get("type") != "function":
        raise bad("tool_choice.type", 'tool_choice must be "auto", "none", "required" or '
                  '{"type": "function", "function": {"name": ...}}')
    function = _obj(choice.get("function"), "tool_choice.function")
    return {"name": _str(function.get("name"), "tool_choice.function.name")}


def _response_format(value: Any) -> dict[str, Any]:
    fmt = _obj(value, "response_format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise bad("response_format.type", 'must be "text", "json_object" or "json_schema"')
    spec = _obj(fmt.get("json_schema"), "response_format.json_schema")
    out: dict[str, Any] = {"type": "json_schema",
                           "schema": _obj(spec.get("schema"), "response_format.json_schema.schema")}
    if spec.get("name") is not None:
        out["name"] = _str(spec["name"], "response_format.json_schema.name")
    if spec.get("strict") is not None:
        out["strict"] = _bool(spec["strict"], "response_format.json_schema.strict")
    return out


_PARAMS = (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
           ("frequency_penalty", "frequencyPenalty"), ("presence_penalty", "presencePenalty"))


def _params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, ours in _PARAMS:
        if body.get(name) is not None:
            params[ours] = (_int if name == "seed" else _number)(body[name], name)
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if body.get(name) is not None:
            params["maxTokens"] = _int(body[name], name)
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else [
            _str(s, f"stop[{k}]") for k, s in enumerate(_list(stop, "stop"))]
    if body.get("logit_bias") is not None:
        params["logitBias"] = _obj(body["logit_bias"], "logit_bias")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("low", "medium", "high"):
            raise bad("reasoning_effort", f"reasoning_effort {effort!r} is not supported "
                      "(low, medium and high are)")
        params["reasoningEffort"] = effort
    return params


def to_request(raw: Any, *, aliases: Collection[str]) -> Translated:
    """The body as a v3 request's fields, or OpenAIError naming what is wrong."""
    body = _obj(raw, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: one of GET /v1/models")
    if model not in aliases:
        raise OpenAIError(404, f"The model `{model[:128]}` does not exist; GET /v1/models "
                          "lists them", param="model", code="model_not_found", retry=False)
    messages = [_message(m, n) for n, m in enumerate(_list(body.get("messages"), "messages"))]
    if not messages:
        raise bad("messages", "messages must hold at least one message")
    _no_op(body)
    value: dict[str, Any] = {"v": 3, "model": model, **_split(messages)}
    params = _params(body)
    if params:
        value["params"] = params
    if body.get("tools"):
        value["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        value["toolChoice"] = _tool_choice(body["tool_choice"])
    if body.get("response_format") is not None:
        value["responseFormat"] = _response_format(body["response_format"])
    user = body.get("user") or body.get("safety_identifier")
    if user is not None:
        value["endUser"] = _str(user, "user")
    if body.get("metadata") is not None:
        value["metadata"] = _obj(body["metadata"], "metadata")
    value["store"] = _bool(body.get("store", False), "store")
    stream = _bool(body.get("stream", False), "stream") if body.get("stream") is not None \
        else False
    options = body.get("stream_options")
    usage = bool(options is not None and _bool(_obj(options, "stream_options").get(
        "include_usage", False), "stream_options.include_usage"))
    return Translated(value=value, model=model, stream=stream, include_usage=usage)


def param_of(field: str) -> str:
    """Our decoder's JSON path (`$.params.maxTokens`) as the OpenAI parameter it came from."""
    path = field.removeprefix("$").lstrip(".")
    for ours, theirs in (("params.maxTokens", "max_tokens"), ("params.topP", "top_p"),
                         ("params.temperature", "temperature"), ("params.stop", "stop"),
                         ("params.seed", "seed"), ("params.logitBias", "logit_bias"),
                         ("params.frequencyPenalty", "frequency_penalty"),
                         ("params.presencePenalty", "presence_penalty"),
                         ("params.reasoningEffort", "reasoning_effort"),
                         ("toolChoice", "tool_choice"), ("responseFormat", "response_format"),
                         ("history", "messages"), ("message", "messages"),
                         ("attachments", "messages"), ("toolResults", "messages"),
                         ("endUser", "user"), ("tools", "tools"), ("metadata", "metadata")):
        if path.startswith(ours):
            return theirs + path[len(ours):]
    return path or "body"


# -- refusals and failures ------------------------------------------------------------

def failure(code: str, message: str, retry_after_s: float | None = None) -> OpenAIError:
    """A job's `error` event as the HTTP answer OpenAI's SDKs understand."""
    match code:
        case "bad_request":
            return OpenAIError(400, message, code=code, retry=False)
        case "context_length":
            return OpenAIError(400, message, param="messages", code="context_length_exceeded",
                               retry=False)
        case "forbidden":
            return OpenAIError(403, message, type="permission_error", code=code, retry=False)
        case "budget_exceeded":
            return OpenAIError(429, message, type="insufficient_quota",
                               code="insufficient_quota", retry=False)
        case "rate_limited" | "session_busy":
            return OpenAIError(429, message, type="rate_limit_error",
                               code="rate_limit_exceeded" if code == "rate_limited" else code,
                               retry_after_s=retry_after_s if retry_after_s is not None else 1.0)
        case "timeout" | "idle_timeout" | "first_token_timeout":
            return OpenAIError(504, message, type="timeout", code="timeout")
        case "provider_unavailable":
            return OpenAIError(503, message, type="server_error", code=code)
        case "cancelled":
            return OpenAIError(409, message, type="invalid_request_error", code=code, retry=False)
        case _:
            return OpenAIError(502 if code.startswith("provider") else 500, message,
                               type="server_error", code=code)


def refusal_of(fields: Mapping[str, str]) -> OpenAIError:
    """An `error` entry as its HTTP answer."""
    data = _data(fields)
    after = data.get("retryAfterS")
    return failure(str(data.get("code", "internal")), str(data.get("message", "refused")),
                   float(after) if isinstance(after, int | float) else None)


# -- the answer -----------------------------------------------------------------------

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _text(value: Any) -> str:
    return _encode(value).decode()


def _data(fields: Mapping[str, str]) -> dict[str, Any]:
    try:
        data = _decode(fields.get("data", "{}"))
    except (msgspec.DecodeError, RecursionError):
        return {}
    return cast(dict[str, Any], data) if isinstance(data, dict) else {}


def _int_of(fields: Mapping[str, str], name: str) -> int:
    return int_field(fields, name) or 0


FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
          "content_filter": "content_filter", "function_call": "tool_calls"}


def finish_reason(vendor: str) -> str:
    """`final.finishReason` as OpenAI names it (README's table); anything else is stop."""
    return FINISH.get(vendor, "stop")


def usage(final: Mapping[str, Any]) -> dict[str, Any]:
    raw = final.get("usage")
    used = cast(dict[str, Any], raw) if isinstance(raw, dict) else {}

    def n(name: str) -> int:
        value = used.get(name, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return {"prompt_tokens": n("promptTokens"), "completion_tokens": n("completionTokens"),
            "total_tokens": n("totalTokens"),
            "prompt_tokens_details": {"cached_tokens": n("cachedTokens")},
            "completion_tokens_details": {"reasoning_tokens": n("reasoningTokens")}}


class Chunks(NamedTuple):
    """What one streaming client has been sent, as a value: `frame` returns the lines for
    new entries and the state after them, kept only once they were written."""

    job_id: str
    model: str  # the alias the client named: every chunk's `model`
    created: int
    include_usage: bool
    sent: tuple[int, int] = (-1, -1)  # the (attempt, seq) of the last entry taken
    attempt: int = 1
    chars: int = 0  # characters of answer text sent (this attempt's view)
    anything: bool = False  # any answer text, reasoning or tool call sent
    tools: int = 0  # tool calls sent (the next one's index)
    fingerprint: str | None = None  # the answering alias, after a fallback
    done: bool = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        """One chunk's line, written out directly (a chunk per token: the hot path); the
        job id is an id of the contract, nothing in it needs escaping."""
        return (f'data: {{"id":"chatcmpl-{self.job_id}","object":"chat.completion.chunk",'
                f'"created":{self.created},"model":{_text(self.model)},'
                f'"system_fingerprint":{_text(self.fingerprint)},"choices":[{{"index":0,'
                f'"delta":{_text(delta)},"logprobs":null,"finish_reason":{_text(finish)}}}]}}'
                "\n\n")

    def _error(self, code: str, message: str) -> str:
        error = failure(code, message)
        return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"

    def frame(self, entries: Iterable[Entry]) -> tuple[bytes, Chunks, int]:
        """The lines for `entries` (this job's, each once), the state after them, and how
        many entries they carry."""
        state, lines, count = self, list[str](), 0
        for _, fields in entries:
            if state.done:
                break
            if fields.get("jobId") != state.job_id:
                continue
            position = (_int_of(fields, "attempt"), _int_of(fields, "seq"))
            if position <= state.sent:
                continue  # written twice (a Redis failover): sent already
            count += 1
            state, line = state._replace(sent=position)._event(
                fields.get("event", ""), _data(fields), position[0])
            lines.append(line)
        return "".join(lines).encode(), state, count

    def _event(self, event: str, data: dict[str, Any], attempt: int) -> tuple[Chunks, str]:
        match event:
            case "started":
                return self._started(data, attempt)
            case "token" | "reasoning":
                text = data.get("text")
                if not isinstance(text, str) or not text:
                    return self, ""
                key = "content" if event == "token" else "reasoning_content"
                chars = self.chars + len(text) if event == "token" else self.chars
                return (self._replace(chars=chars, anything=True),
                        self._chunk({key: text}))
            case "tool_call":
                call = {"index": self.tools, "id": str(data.get("id", "")), "type": "function",
                        "function": {"name": str(data.get("name", "")),
                                     "arguments": str(data.get("arguments", ""))}}
                return (self._replace(tools=self.tools + 1, anything=True),
                        self._chunk({"tool_calls": [call]}))
            case "provider":
                return self._replace(fingerprint=str(data.get("to", "")) or None), ""
            case "final":
                return self._final(data)
            case "error":
                return (self._replace(done=True),
                        self._error(str(data.get("code", "internal")),
                                    str(data.get("message", "the job failed"))))
            case "done":
                status = data.get("status")
                if status == "completed":
                    return self._replace(done=True), "data: [DONE]\n\n"
                why = ("the answer was cancelled" if status == "cancelled"
                       else f"the job ended {status}")
                return self._replace(done=True), self._error(
                    "cancelled" if status == "cancelled" else "internal", why)
            case _:
                return self, ""  # retrieval and event types we do not know

    def _started(self, data: dict[str, Any], attempt: int) -> tuple[Chunks, str]:
        if attempt <= 1 or self.attempt == attempt:
            return self._replace(attempt=attempt), self._chunk({"role": "assistant",
                                                                "content": ""})
        resumes: Any = data.get("resumes")
        kept: Any = cast(dict[str, Any], resumes).get("chars") if isinstance(resumes, dict) else None
        if not self.anything or (isinstance(kept, int) and kept == self.chars
                                 and self.tools == 0):
            # Nothing the client holds is taken back: the answer goes on.
            return self._replace(attempt=attempt), ""
        return self._replace(done=True), self._error(
            "answer_restarted", "the answer was restarted after a failure, and the text "
            "already sent is not part of it: ask again")

    def _final(self, data: dict[str, Any]) -> tuple[Chunks, str]:
        model = data.get("model")
        state = self._replace(fingerprint=model if isinstance(model, str) and model
                        and model != self.model else self.fingerprint)
        line = state._chunk({}, finish_reason(str(data.get("finishReason", "stop"))))
        if state.include_usage:
            body: dict[str, Any] = {
                "id": f"chatcmpl-{self.job_id}", "object": "chat.completion.chunk",
                "created": self.created, "model": self.model,
                "system_fingerprint": state.fingerprint, "choices": list[Any](),
                    "usage": usage(data)}
            line += f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
        return state, line


@dataclass(frozen=True)
class Outcome:
    """A non-streaming job's end, from its events: its `final` (None unless it
    completed) and its `error` as its HTTP answer."""

    final: dict[str, Any] | None
    error: OpenAIError | None
    reasoning: str
    status: str


def outcome(job_id: str, entries: Sequence[Entry]) -> Outcome | None:
    """How the job ended, or None while it has not (`done` not read yet)."""
    final: dict[str, Any] | None = None
    error: OpenAIError | None = None
    reasoning: list[str] = []
    attempt = 0
    for _, fields in entries:
        if fields.get("jobId") != job_id:
            continue
        event, data = fields.get("event"), _data(fields)
        if event == "started" and _int_of(fields, "attempt") != attempt:
            attempt = _int_of(fields, "attempt")
            reasoning = []  # each attempt reasons anew
        elif event == "reasoning" and isinstance(data.get("text"), str):
            reasoning.append(data["text"])
        elif event == "final":
            final = data
        elif event == "error":
            error = refusal_of(fields)
        elif event == "done":
            status = str(data.get("status", ""))
            return Outcome(final if status == "completed" else None, error,
                           "".join(reasoning), status)
    return None


def completion(job_id: str, model: str, created: int, ended: Outcome) -> dict[str, Any]:
    """The `chat.completion` of a completed job."""
    final = ended.final or {}
    calls = final.get("toolCalls")
    message: dict[str, Any] = {"role": "assistant", "content": final.get("text") or None,
                               "refusal": None}
    if ended.reasoning:
        message["reasoning_content"] = ended.reasoning
    if isinstance(calls, list) and calls:
        made = [cast(dict[str, Any], c) for c in cast(list[Any], calls) if isinstance(c, dict)]
        message["tool_calls"] = [
            {"id": str(c.get("id", "")), "type": "function",
             "function": {"name": str(c.get("name", "")), "arguments": str(c.get("arguments", ""))}}
            for c in made]
    answering = final.get("model")
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": created,
            "model": model,
            "system_fingerprint": answering if isinstance(answering, str) and answering
            and answering != model else None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(str(final.get("finishReason", "stop")))}],
            "usage": usage(final)}


def models(aliases: Iterable[str], created: int) -> dict[str, Any]:
    """GET /v1/models: every configured alias, in OpenAI's list shape."""
    return {"object": "list", "data": [
        {"id": alias, "object": "model", "created": created, "owned_by": "chat-actors"}
        for alias in sorted(aliases)]}
