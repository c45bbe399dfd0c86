"""Building the messages sent to the model, within its context window.

Budget = context_window - answer budget. The system prompt and the new user
message are always kept; history turns are added newest first until the next
one would not fit, so the oldest turns are dropped first. A history that would
start with an assistant turn loses that turn too (a reply to nothing).

Tool calls (contract v2): an assistant turn that called tools and the `tool`
turns answering it are one group, kept or dropped whole; so is the pending call
that the request's tool results answer, which is always kept with them.

Everything else sent with the messages counts too (contract 2.1): the tools (name,
description, parameters) and the response schema, as their JSON, before any history,
so a request whose tools alone do not fit is refused like a message that does not.

Images (contract v2): a user turn's images go as content parts after its text,
each counted at its estimate. A history image is kept by content hash; its part
names the hash (IMAGE_REF) until `fill_images` puts in the bytes, read only for
the turns the prompt kept. For a model without vision they are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import msgspec

from actors.errors import PermanentError
from messages.mailboxes import ImageRef, Turn

# Chat formats wrap every message in a few tokens of markup (OpenAI: ~4), and
# prime the reply with ~3. Counted so the budget holds on real servers.
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
_json = msgspec.json.Encoder().encode
IMAGE_REF = "chat-actors:sha256:"  # a history image's part before fill_images
MISSING_IMAGE = "[an image that is no longer stored]"


def sources_message(sources: Sequence[tuple[str, str]], *, budget_tokens: int,
                    count: Callable[[str], int]) -> tuple[str, int]:
    """The retrieved chunks as one system message, best first, within `budget_tokens`.

    Returns the text and how many sources it holds; each is tagged [n] (source).
    """
    text = "Answer from these sources when they are relevant, and cite them as [n].\n"
    kept = 0
    for label, chunk in sources:
        block = f"\n[{kept + 1}] ({label})\n{chunk}\n"
        if count(text + block) > budget_tokens:
            break
        text += block
        kept += 1
    return (text if kept else ""), kept


def count_tools(params: Mapping[str, Any], count: Callable[[str], int]) -> int:
    """The tokens of what goes to the model besides its messages: each tool (name,
    description, parameters) and the response format, counted as the JSON they are sent
    as, one tool at a time (each is at most limits.max_schema_bytes and a description)."""
    parts = [*params.get("tools", ()), *filter(None, [params.get("response_format")])]
    return sum(count(_json(part).decode()) for part in parts)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _message(turn: Turn) -> dict[str, Any]:
    """A history turn in OpenAI's chat format (LiteLLM maps it to other vendors')."""
    if turn.images:  # (no empty text part: some vendors refuse one)
        return {"role": turn.role, "content": [
            *([{"type": "text", "text": turn.content}] if turn.content else []),
            *(image_part(ref.url or IMAGE_REF + ref.sha256) for ref in turn.images)]}
    if turn.role == "tool":
        return {"role": "tool", "tool_call_id": turn.tool_call_id, "content": turn.content}
    if turn.tool_calls:
        message: dict[str, Any] = {"role": "assistant", "content": turn.content or None,
                                   "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls]}
        if turn.thinking_blocks:  # Anthropic needs its signed thinking back with the calls
            message["thinking_blocks"] = turn.thinking_blocks
        return message
    return {"role": turn.role, "content": turn.content}


def _cost(turn: Turn, count: Callable[[str], int]) -> int:
    calls = sum(count(c.name) + count(c.arguments) for c in turn.tool_calls or ())
    images = sum(ref.tokens for ref in turn.images or ())
    return count(turn.content) + calls + images + PER_MESSAGE_TOKENS


def _history_images(messages: list[dict[str, Any]]) -> Iterator[tuple[list[Any], int, str]]:
    """(content, index, hash) of each image part that still names a history image."""
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = cast(list[dict[str, Any]], content)
            for n, part in enumerate(parts):
                url: str = part["image_url"]["url"] if part["type"] == "image_url" else ""
                if url.startswith(IMAGE_REF):
                    yield parts, n, url[len(IMAGE_REF):]


def stored_images(messages: list[dict[str, Any]]) -> set[str]:
    """The content hashes of the history images these messages still need."""
    return {sha for _, _, sha in _history_images(messages)}


def fill_images(messages: list[dict[str, Any]], urls: Mapping[str, str]) -> None:
    """Put each history image's data URL (by hash) into its part; an image no longer
    stored becomes a line of text saying so."""
    for content, n, sha in list(_history_images(messages)):
        found = urls.get(sha)
        content[n] = (image_part(found) if found is not None
                      else {"type": "text", "text": MISSING_IMAGE})


def _groups(history: Sequence[Turn]) -> list[list[Turn]]:
    """Turns grouped so that `tool` turns stay with the call they answer."""
    groups: list[list[Turn]] = []
    for turn in history:
        if turn.role == "tool" and groups and groups[-1][0].tool_calls:
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def _complete(group: list[Turn]) -> bool:
    """A group the vendor accepts: not tool turns alone, and every call answered."""
    first = group[0]
    if first.role == "tool":
        return False
    answered = {t.tool_call_id for t in group[1:]}
    return all(c.id in answered for c in first.tool_calls or ())


def build_messages(*, system_prompt: str, history: Sequence[Turn], user_message: str,
                   context_window: int, answer_tokens: int, count: Callable[[str], int],
                   context: str = "", tool_results: Sequence[Turn] = (),
                   user_images: Sequence[ImageRef] = (), vision: bool = True,
                   tools_tokens: int = 0, whole: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Return (messages, prompt token estimate); raise PermanentError if what must be
    sent alone overflows. With `tool_results`, history's last group is the pending call
    they answer (checked by the caller) and is sent with them whatever its size.
    History images are left out when the model has no `vision`. `tools_tokens`: what
    goes with the messages (tools, response schema: count_tools). `whole` (a carried
    history, contract v3): every turn is sent as given, or none (context_length)."""
    budget = context_window - answer_tokens - REPLY_PRIMING_TOKENS
    head: list[dict[str, Any]] = []
    used = tools_tokens
    for text in (system_prompt, context):  # context: retrieved sources, in RAG mode
        if text:
            head.append({"role": "system", "content": text})
            used += count(text) + PER_MESSAGE_TOKENS
    if not vision:
        history = [msgspec.structs.replace(t, images=None) if t.images else t for t in history]
    groups = _groups(history)
    tail: list[Turn] = []
    if whole:
        tail, groups = list(history), []
        tail += tool_results
    elif tool_results:
        tail = [*groups.pop(), *tool_results]
    if user_message or user_images:
        tail.append(Turn(role="user", content=user_message, images=list(user_images) or None))
    used += sum(_cost(t, count) for t in tail)
    if used > budget:
        raise PermanentError(
            f"{'the conversation' if whole else 'the message'} needs {used} tokens "
            f"{'as sent' if whole else 'with the system prompt'}"
            f"{f' and the tools ({tools_tokens})' if tools_tokens else ''}; the model's "
            f"window leaves {budget} after reserving {answer_tokens} for the answer",
            code="context_length")
    kept: list[tuple[list[Turn], int]] = []
    for group in reversed(groups):
        if not _complete(group):
            continue  # a call cut from its results (or results cut from their call)
        cost = sum(_cost(t, count) for t in group)
        if used + cost > budget:
            break
        used += cost
        kept.append((group, cost))
    kept.reverse()
    while kept and kept[0][0][0].role != "user":  # never a reply to nothing
        used -= kept.pop(0)[1]
    messages = head + [_message(t) for group, _ in kept for t in group]
    messages += [_message(t) for t in tail]
    return messages, used + REPLY_PRIMING_TOKENS
