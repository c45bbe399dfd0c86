"""answering: a claimed job's work, from its request to the model's last token.

[retrieval (RAG mode)] -> the prompt within the token budget -> the budget
reservation -> the provider's stream, each token sent to the job's stream as
it comes. Everything it produced is kept in a `JobRun`, so a cancel or a
timeout at any point leaves the partial answer for the outcome.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

from actors.aliases import Alias
from actors.backoff import retry_transient
from actors.errors import PermanentError, RequestRefused, TransientError
from actors.job.budget import reserve
from actors.job.claim import check_fence, start_over
from actors.job.prompt import (
    build_messages,
    count_tools,
    fill_images,
    sources_message,
    stored_images,
)
from actors.job.provider import Answer, stream_answer
from actors.job.spend import Spend
from actors.job.takeover import Plan
from actors.retriever import Retrieved
from actors.telemetry import Timeline
from actors.worker import Worker
from messages.mailboxes import ImageRef, JobRef, StoredImage, Turn
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


@dataclass
class JobRun:
    """What one attempt of a job has produced so far."""

    answer: Answer
    job: JobRef  # the attempt it runs as: the next one once its answer starts over
    chain: tuple[Alias, ...]  # the alias asked for and its fallbacks, resolved
    prompt_estimate: int = 0
    retrieved: Retrieved | None = None
    sources_used: list[str] = field(default_factory=list[str])  # chunk ids the prompt held
    images: list[StoredImage] = field(default_factory=list[StoredImage])  # the request's
    failure: TransientError | PermanentError | None = None
    done_sent: bool = False  # its `done` is in Redis: nothing more may be said
    timeline: Timeline = field(default_factory=Timeline)  # its steps, for its trace
    messages: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])  # the prompt
    params: dict[str, Any] = field(default_factory=dict[str, Any])  # sent with it
    model_started: float | None = None  # the model call's Trio times
    model_ended: float | None = None
    status: str | None = None  # its done status, once decided
    plan: Plan | None = None  # what it carries on from an earlier attempt (takeover)
    # What the earlier attempts used (takeover's plan), once finish has counted it.
    earlier: Spend = field(default_factory=Spend)
    counted: bool = False  # the cut try and the earlier attempts are in the totals


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


def pending_results(request: ChatRequest, history: list[Turn]) -> list[Turn]:
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


def attached_images(request: ChatRequest, worker: Worker) -> tuple[list[StoredImage], dict[str, str]]:
    """The request's images as the history keeps them, and each data URL by its hash.
    Checked at intake; checked again here, since only the request crossed over."""
    limits = worker.config.limits
    try:
        checked = request_images(request, max_bytes=limits.max_attachment_bytes,
                                 url_hosts=limits.image_url_hosts)
    except BadInput as exc:  # the limits changed since intake (a rolling config change)
        raise RequestRefused(str(exc), code="bad_request") from None
    stored = [StoredImage(ImageRef(tokens=i.tokens, url=i.url), b"") if not i.data else
              StoredImage(ImageRef(tokens=i.tokens, sha256=i.sha256, media_type=i.media_type),
                          i.data) for i in checked]
    return stored, {i.sha256: i.url for i in checked if i.data}


class Prompt(NamedTuple):
    """What goes to the model, and what the job's records say of how it was made."""

    messages: list[dict[str, Any]]
    estimate: int  # its tokens, tools and response schema included
    retrieved: Retrieved | None  # RAG mode's search
    sources_used: list[str]  # the chunk ids it holds


async def build_prompt(request: ChatRequest, worker: Worker, job: JobRef, history: list[Turn],
                       *, alias: Alias, params: dict[str, Any], images: list[StoredImage],
                       urls: dict[str, str], timeline: Timeline) -> Prompt:
    """[retrieval] -> the prompt within the alias's token budget, its images filled in."""
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
    messages, estimate = build_messages(
        system_prompt=config.llm.system_prompt, history=history,
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


async def answer(request: ChatRequest, worker: Worker, job: JobRef, history: list[Turn],
                 run: JobRun) -> None:
    """Fill `run`; raise TransientError / PermanentError when the job cannot be answered."""
    alias = run.chain[0]
    count = alias.count
    run.images, urls = attached_images(request, worker)
    params = model_params(request, alias.spec.max_tokens)
    prompt = await build_prompt(request, worker, job, history, alias=alias, params=params,
                                images=run.images, urls=urls, timeline=run.timeline)
    run.retrieved, run.sources_used = prompt.retrieved, prompt.sources_used
    run.messages, run.prompt_estimate = prompt.messages, prompt.estimate
    # A continuation (actors/job/takeover.py) sends the answer so far as the assistant turn's
    # start: the prompt holds it, and the answer only has the rest of its budget left.
    carried = count(run.answer.carried) if run.answer.kept else 0
    run.answer.spend_cap, run.answer.reserved = await reserve(worker, job, run.chain,
                                                              prompt.estimate + carried)
    run.params = params
    if carried:
        run.params = params | {"max_tokens": max(1, params["max_tokens"] - carried)}
    await _stream(request, worker, job, run, count, answer_tokens=params["max_tokens"])


async def _stream(request: ChatRequest, worker: Worker, job: JobRef, run: JobRun,
                  count: Callable[[str], int], *, answer_tokens: int) -> None:
    """The provider's stream, each token, reasoning run, tool call and switch sent to the
    job's stream as it comes; a restart goes on as the job's next attempt."""

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
        job = run.job = await start_over(worker, job, alias=alias, mode=request.mode,
                                         reason=reason)
        run.params["max_tokens"] = answer_tokens  # nothing carried: the whole budget

    def before_try() -> Awaitable[None]:
        return check_fence(worker, job)

    run.model_started = trio.current_time()
    try:
        await stream_answer(
            chat=worker.chat, pricing=worker.pricing, config=worker.config,
            chain=run.chain, messages=run.messages, params=run.params, count=count,
            prompt_estimate=run.prompt_estimate, answer=run.answer, on_token=on_token,
            on_switch=on_switch, metrics=worker.metrics, on_reasoning=on_reasoning,
            on_tool_call=on_tool_call, on_restart=on_restart, before_try=before_try,
            refused=worker.prefill_refused)
    finally:
        run.model_ended = trio.current_time()
