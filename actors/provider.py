"""provider: one answer from the model, through retries and fallbacks.

Runs inside the conversation's nursery (request/reply work that dies with the
job). Each try streams through the ChatModel port under its own stall watch
(first token, then idle gap). A transient failure (429 with its Retry-After,
5xx, a dropped connection, a stall) is retried with capped, jittered backoff;
then the alias's `fallbacks` are tried in order. A permanent failure (bad
request, auth, context length) ends it at once.

When a try breaks after tokens were sent, the next one continues the same
answer: the text so far goes to the model as the start of the assistant turn,
and only the new text is streamed on, so the client's text stays consistent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

import trio

from actors.adapters.llm import cost_usd, provider_of
from actors.backoff import Backoff
from actors.errors import PermanentError, TransientError
from actors.metrics import Metrics
from actors.ports import ChatModel
from config import Config, ModelAlias
from messages.mailboxes import ProviderChunk, StreamFinished, TokenDelta

log = logging.getLogger("chat_actors.provider")


class Stalled(TransientError):
    """The stream sent nothing for too long; `code` says which limit."""

    def __init__(self, code: str, limit_s: float) -> None:
        super().__init__(f"the model stream stalled for {limit_s:g} s ({code})", kind="stall")
        self.code = code


class ProviderExhausted(TransientError):
    """Every retry and fallback failed; `last` is the final failure."""

    def __init__(self, last: TransientError, tries: int) -> None:
        super().__init__(f"{tries} tries failed; last: {last}", retry_after=last.retry_after,
                         kind=last.kind)
        self.last = last


@dataclass
class Answer:
    """What the provider produced: text so far, usage and cost summed over every try."""

    parts: list[str] = field(default_factory=list)
    finished: StreamFinished | None = None
    alias: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    first_token_at: float | None = None
    tries: int = 0
    retries: int = 0  # tries again on the same alias
    fallbacks: int = 0  # switches to the next alias
    spend_cap: float | None = None  # USD the job reserved: no retry may take it past that
    reserved: bool = False  # a budget reservation waits to be settled

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def bill_failed_try(self, spec: ModelAlias, prompt_estimate: int, before: int,
                        count: Callable[[str], int]) -> None:
        """A try that failed is billed only if it streamed: a refused request costs nothing."""
        if len(self.parts) > before:
            self.bill(spec, prompt_estimate, count("".join(self.parts[before:])))

    def bill(self, spec: ModelAlias, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        cost = cost_usd(spec.model, prompt_tokens, completion_tokens,
                        spec.input_cost_per_token, spec.output_cost_per_token)
        if cost is None and spec.api_base:
            cost = 0.0  # a model we serve ourselves and LiteLLM does not price: free
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost


def worst_try_usd(spec: ModelAlias, prompt_tokens: int, answer_tokens: int) -> float:
    """The most one try on `spec` can cost (0 for a model without a price)."""
    return cost_usd(spec.model, prompt_tokens, answer_tokens, spec.input_cost_per_token,
                    spec.output_cost_per_token) or 0.0


def continuation(messages: list[dict[str, str]], partial: str) -> list[dict[str, str]]:
    """The request that continues `partial`: it is sent as the assistant turn's start."""
    if not partial:
        return messages
    return [*messages, {"role": "assistant", "content": partial}]


def _waiting(receive: trio.MemoryReceiveChannel[ProviderChunk]) -> list[ProviderChunk]:
    """Everything already in the mailbox, without a checkpoint."""
    ready: list[ProviderChunk] = []
    while True:
        try:
            ready.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return ready


async def _one_try(chat: ChatModel, spec: ModelAlias, messages: list[dict[str, str]],
                   params: dict[str, Any], config: Config, answer: Answer,
                   on_token: Callable[[str], Awaitable[None]]) -> StreamFinished:
    send, receive = trio.open_memory_channel[ProviderChunk](64)
    failure: TransientError | PermanentError | None = None
    finished: StreamFinished | None = None
    got_token = False

    async def pump() -> None:
        nonlocal failure
        try:
            await chat.stream(model=spec.model, api_base=spec.api_base,
                              api_key_env=spec.api_key_env, messages=messages,
                              params=params, out=send, stream_path=spec.stream_path)
        except (TransientError, PermanentError) as exc:
            failure = exc

    jobs = config.jobs
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        with trio.CancelScope(deadline=trio.current_time() + jobs.first_token_timeout_s) as stall:
            async with receive:
                async for first in receive:
                    # Tokens that queued up while we were busy become one event.
                    texts: list[str] = []
                    for chunk in (first, *_waiting(receive)):
                        match chunk:
                            case TokenDelta(text=text):
                                texts.append(text)
                            case StreamFinished():
                                finished = chunk
                            case _:
                                assert_never(chunk)
                    if texts:
                        got_token = True
                        if answer.first_token_at is None:
                            answer.first_token_at = trio.current_time()
                        stall.deadline = trio.current_time() + jobs.idle_timeout_s
                        text = "".join(texts)
                        answer.parts.append(text)
                        await on_token(text)
        if stall.cancelled_caught:
            nursery.cancel_scope.cancel()  # hang up on the stalled vendor
            failure = (Stalled("idle_timeout", jobs.idle_timeout_s) if got_token
                       else Stalled("first_token_timeout", jobs.first_token_timeout_s))
    if failure is not None:
        raise failure
    if finished is None:
        raise TransientError("the model stream ended without finishing", kind="protocol")
    return finished


async def stream_answer(*, chat: ChatModel, config: Config, alias_name: str,
                        messages: list[dict[str, str]], params: dict[str, Any],
                        count: Callable[[str], int], prompt_estimate: int,
                        on_token: Callable[[str], Awaitable[None]],
                        on_switch: Callable[[str, str, str], Awaitable[None]],
                        answer: Answer, backoff: Backoff | None = None,
                        metrics: Metrics | None = None) -> Answer:
    """Fill `answer` from the alias, its retries and fallbacks; raise PermanentError or
    ProviderExhausted. `answer` keeps the partial text if this is cancelled."""
    llm = config.llm
    backoff = backoff or Backoff(base_s=llm.retry_backoff_s, cap_s=llm.retry_backoff_cap_s)
    chain = [alias_name, *config.llm.models[alias_name].fallbacks]
    last: TransientError | None = None
    for position, name in enumerate(chain):
        spec = config.llm.models[name]
        for retry in range(llm.retries + 1):
            if answer.tries and answer.spend_cap is not None and answer.cost_usd is not None:
                # The answer may run to what the request asks (the first alias's limit)
                # even on a fallback whose own limit is lower: take the larger.
                answer_tokens = max(spec.max_tokens, params.get("max_tokens", 0))
                worst = worst_try_usd(spec, prompt_estimate + count(answer.text), answer_tokens)
                if answer.cost_usd + worst > answer.spend_cap * (1 + 1e-9):
                    log.warning("%s: no retry, the job's budget reservation would not cover it",
                                name)
                    break
            answer.tries += 1
            answer.alias = name
            before = len(answer.parts)
            request = continuation(messages, answer.text)
            try:
                finished = await _one_try(chat, spec, request, params, config, answer, on_token)
            except PermanentError as exc:
                answer.bill_failed_try(spec, prompt_estimate, before, count)
                if metrics is not None:
                    metrics.provider_failed(provider_of(spec.model), exc)
                raise
            except TransientError as exc:
                last = exc
                answer.bill_failed_try(spec, prompt_estimate, before, count)
                vendor = provider_of(spec.model)
                if metrics is not None:
                    metrics.provider_failed(vendor, exc)
                if retry < llm.retries:
                    wait = backoff.delay(retry + 1, exc.retry_after)
                    log.warning("%s failed (%s); retry %d in %.2fs", name, exc, retry + 1, wait)
                    answer.retries += 1
                    if metrics is not None:
                        metrics.provider_retries.labels(vendor=vendor).inc()
                    await on_switch(name, name, str(exc))
                    await trio.sleep(wait)
                    continue
                if position + 1 < len(chain):
                    log.warning("%s failed (%s); falling back to %s", name, exc,
                                chain[position + 1])
                    answer.fallbacks += 1
                    if metrics is not None:
                        metrics.provider_fallbacks.labels(
                            from_vendor=vendor,
                            to_vendor=provider_of(config.llm.models[chain[position + 1]].model)).inc()
                    await on_switch(name, chain[position + 1], str(exc))
                break
            else:
                new_text = "".join(answer.parts[before:])
                answer.bill(spec, finished.prompt_tokens if finished.prompt_tokens else
                            prompt_estimate + count(answer.text) - count(new_text),
                            finished.completion_tokens if finished.completion_tokens is not None
                            else count(new_text))
                answer.finished = finished
                return answer
    assert last is not None  # the first try is never held back
    raise ProviderExhausted(last, answer.tries)
