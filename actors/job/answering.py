"""answering: the steps of a claimed job's work, from its request to the model's last token.

[retrieval (RAG mode)] -> the prompt within the token budget (`build_prompt`) ->
[the budget reservation, budget.reserve] -> the provider's stream (`stream`), each
token sent to the job's stream as it comes. Each step returns its value to the
conversation, which keeps them; the streaming answer stays in the provider's
`Draft`, so a cancel or a timeout at any point leaves the partial answer.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from actors.backoff import retry_transient
from actors.errors import PermanentError, RequestRefused
from actors.job.attempt import Attempt, Prompt
from actors.job.claim import check_fence
from actors.job.prompt import (
    build_messages,
    count_tools,
    fill_images,
    sources_message,
    stored_images,
)
from actors.job.provider import Answer, Draft, stream_answer
from actors.retriever import Retrieved
from actors.telemetry import Timeline
from actors.worker import Worker
from messages.images import ImageProblem, check_image
from messages.mailboxes import CallMade, ImageRef, JobRef, StoredImage, Turn
from messages.wire import (
    BadInput,
    ChatRequest,
    ProviderSwitched,
    Reasoning,
    RestartReason,
    Retrieval,
    RetrievalHit,
    Token,
    ToolCall,
    ToolChoiceName,
    request_images,
)

log = logging.getLogger("chat_actors.answering")

SNIPPET_CHARS = 200


def model_params(request: ChatRequest, answer_tokens: int) -> dict[str, Any]:
    """The request's sampling parameters, the answer capped at the alias's limit."""
    p = request.params
    params: dict[str, Any] = {"max_tokens": min(p.max_tokens or answer_tokens, answer_tokens)}
    if p.temperature is not None:
        params["temperature"] = p.temperature
    if p.top_p is not None:
        params["top_p"] = p.top_p
    if p.stop:
        params["stop"] = p.stop
    if p.seed is not None:
        params["seed"] = p.seed
    if p.reasoning_effort is not None:
        params["reasoning_effort"] = p.reasoning_effort
    # v3: LiteLLM drops each for a vendor that does not take it (drop_params)
    for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
        if (value := getattr(p, name)) is not None:
            params[name] = value
    if request.tools:  # OpenAI's form: LiteLLM maps it to every other vendor's
        params["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in request.tools]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceName):
        params["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        params["tool_choice"] = choice
    fmt = request.response_format
    if fmt is not None:
        params["response_format"] = {"type": fmt.type} if fmt.type != "json_schema" else {
            "type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema,
                **({"strict": fmt.strict} if fmt.strict is not None else {})}}
    return params


async def retrieve(request: ChatRequest, worker: Worker, job: JobRef) -> Retrieved:
    """Search the user's collections and tell the client each step, before any token."""
    if worker.retriever is None:
        raise PermanentError("RAG is not available on this worker", code="rag_unavailable")
    options = request.rag
    retriever = worker.retriever

    async def search() -> Retrieved:
        return await retriever.search(
            query=request.message, user_id=job.user_id,
            collection=options.collection if options else None,
            top_k=(options and options.top_k) or worker.config.rag.top_k,
            where=options.where if options else None)

    # A document store that is away (a Chroma server) is waited for, within the job's
    # deadline, and named in /readyz; it is never read as "no documents".
    retrieved = await retry_transient(search, what="retrieval", log=log, health=worker.health,
                                      dependency="chroma")
    for step in retrieved.steps:
        await worker.emit(job, Retrieval(step=step.step, query=step.query, hits=[
            RetrievalHit(id=h.id, score=round(h.score, 4), source=h.source,
                         snippet=h.text[:SNIPPET_CHARS]) for h in step.hits]))
    return retrieved


def pending_results(request: ChatRequest, history: Sequence[Turn]) -> list[Turn]:
    """The request's tool results as `tool` turns, once they are known to answer every
    call of the session's last assistant turn and nothing else (contract 2.1 v2). Checked
    here, not at intake: that turn may still have been running when this one arrived."""
    if not request.tool_results:
        return []
    last = history[-1] if history else None
    calls: set[str] = ({c.id for c in last.tool_calls or ()}
                       if last and last.role == "assistant" else set())
    answered = [r.tool_call_id for r in request.tool_results]
    if set(answered) != calls:
        raise RequestRefused(
            f"$.toolResults: they answer {', '.join(answered)}, but the session's pending tool "
            f"calls are {', '.join(sorted(calls)) or 'none'}", code="bad_request")
    return [Turn(role="tool", content=r.content, tool_call_id=r.tool_call_id)
            for r in request.tool_results]


def attached_images(request: ChatRequest,
                    worker: Worker) -> tuple[tuple[StoredImage, ...], dict[str, str]]:
    """The request's images as the history keeps them, and each data URL by its hash.
    Checked at intake; checked again here, since only the request crossed over."""
    limits = worker.config.limits
    try:
        checked = request_images(request, max_bytes=limits.max_attachment_bytes,
                                 url_hosts=limits.image_url_hosts)
    except BadInput as exc:  # the limits changed since intake (a rolling config change)
        raise RequestRefused(str(exc), code="bad_request") from None
    stored = tuple(
        StoredImage(ImageRef(tokens=i.tokens, url=i.url), b"") if not i.data else
        StoredImage(ImageRef(tokens=i.tokens, sha256=i.sha256, media_type=i.media_type), i.data)
        for i in checked)
    return stored, {i.sha256: i.url for i in checked if i.data}


def carried_history(request: ChatRequest, worker: Worker) -> list[Turn]:
    """v3: the history the request carries, as turns (a developer message is a system
    one to every vendor); its images checked again, as the request's attachments are."""
    limits = worker.config.limits
    turns: list[Turn] = []
    for n, message in enumerate(request.history or ()):
        try:
            images = [check_image(url, max_bytes=limits.max_attachment_bytes,
                                  url_hosts=limits.image_url_hosts) for url in message.images()]
        except ImageProblem as exc:  # the limits changed since intake
            raise RequestRefused(f"$.history[{n}]: {exc}", code="bad_request") from None
        turns.append(Turn(
            role="system" if message.role == "developer" else message.role,
            content=message.text(),
            images=[ImageRef(tokens=i.tokens, url=i.url) for i in images] or None,
            tool_calls=[CallMade(c.id, c.name, c.arguments) for c in message.tool_calls]
            if message.tool_calls else None,
            tool_call_id=message.tool_call_id))
    return turns


async def build_prompt(worker: Worker, attempt: Attempt, *, params: dict[str, Any],
                       images: Sequence[StoredImage], urls: dict[str, str],
                       timeline: Timeline) -> Prompt:
    """[retrieval] -> the prompt within the alias's token budget, its images filled in."""
    request, job, alias = attempt.request, attempt.job, attempt.alias
    history = carried_history(request, worker) if request.carried else attempt.history
    config, spec, count = worker.config, alias.spec, alias.count
    results = pending_results(request, history)
    # The tools and the response schema go with every prompt and count in it (contract
    # 2.1). Up to a megabyte of JSON: counted off the event loop.
    tools_tokens = (await trio.to_thread.run_sync(count_tools, params, count)
                    if "tools" in params or "response_format" in params else 0)
    context, retrieved, sources_used = "", None, list[str]()
    if request.mode == "rag":
        with timeline.step("retrieval"):
            retrieved = await retrieve(request, worker, job)
        budget = int(config.rag.context_share
                     * max(spec.context_window - spec.max_tokens - tools_tokens, 0))
        context, kept = sources_message([(h.source, h.text) for h in retrieved.hits],
                                        budget_tokens=budget, count=count)
        sources_used = [h.id for h in retrieved.hits[:kept]]
    # v3's carried history is the client's whole conversation: sent as it is, without
    # the configured system prompt, never trimmed (over the window: context_length).
    messages, estimate = build_messages(
        system_prompt="" if request.carried else config.llm.system_prompt, history=history,
        whole=request.carried,
        user_message=request.message, context_window=spec.context_window,
        answer_tokens=spec.max_tokens, count=count, context=context,
        tool_results=results, user_images=[i.ref for i in images],
        vision=bool(alias.capabilities.vision),
        tools_tokens=tools_tokens)
    if wanted := stored_images(messages) - urls.keys():
        # History images, read only for the turns the prompt kept.
        found = await retry_transient(
            lambda: worker.store.images(user_id=job.user_id, hashes=wanted),
            what="history images", log=log, health=worker.health, dependency="postgres")
        urls = urls | {sha: f"data:{kind};base64,{base64.b64encode(data).decode()}"
                       for sha, (kind, data) in found.items()}
    fill_images(messages, urls)
    if config.log.content:
        log.debug("prompt: %s", messages)
    return Prompt(messages, estimate, retrieved, sources_used)


async def stream(worker: Worker, attempt: Attempt, prompt: Prompt, params: dict[str, Any], *,
                 draft: Draft, spend_cap: float | None,
                 restart: Callable[[str, RestartReason], Awaitable[JobRef]]) -> Answer:
    """The provider's answer, each token, reasoning run, tool call and switch sent to the
    job's stream as it comes; `restart` makes the job's next attempt when the answer
    starts over, and every event from then on is that attempt's. The partial answer
    stays in `draft` when this raises or is cancelled."""
    job = attempt.job

    def on_token(text: str) -> Awaitable[None]:
        # Hands back emit's coroutine: no extra frame per token on the hot path.
        return worker.emit(job, Token(text=text))

    def on_reasoning(text: str) -> Awaitable[None]:
        return worker.emit(job, Reasoning(text=text))

    def on_tool_call(call: ToolCall) -> Awaitable[None]:
        return worker.emit(job, call)

    async def on_switch(old: str, new: str, why: str) -> None:
        await worker.emit(job, ProviderSwitched(from_=old, to=new, reason=worker.scrub(why)))

    async def on_restart(alias: str, reason: RestartReason) -> None:
        nonlocal job  # every listener above writes as the new attempt from here on
        job = await restart(alias, reason)

    def before_try() -> Awaitable[None]:
        return check_fence(worker, job)

    return await stream_answer(
        chat=worker.chat, pricing=worker.pricing, config=worker.config, chain=attempt.chain,
        messages=prompt.messages, params=params, count=attempt.alias.count,
        prompt_estimate=prompt.estimate, draft=draft, spend_cap=spend_cap, on_token=on_token,
        on_switch=on_switch, metrics=worker.metrics, on_reasoning=on_reasoning,
        on_tool_call=on_tool_call, on_restart=on_restart, before_try=before_try,
        refused=worker.prefill_refused)
