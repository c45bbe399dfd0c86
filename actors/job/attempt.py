"""attempt: one claimed attempt of a job, and what its steps return, as frozen values.

`Attempt` is built once after the claim: the request, the job as this attempt runs
it, the alias chain resolved (each with its token counter and capabilities), the
history and the takeover plan. Each step takes what it needs and returns a value:
the prompt (`Prompt`), the budget reservation (budget.Reservation), the answer
(provider.Answer), the outcome (outcome.Outcome). `Answered` is the attempt's work as
its terminal writes see it, wherever it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from actors.aliases import Alias
from actors.errors import PermanentError, TransientError
from actors.job.budget import Reservation
from actors.job.provider import Answer
from actors.job.takeover import Plan
from actors.retriever import Retrieved
from messages.mailboxes import JobRef, StoredImage, Turn
from messages.wire import ChatRequest


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job, as claimed."""

    request: ChatRequest
    job: JobRef  # the attempt it runs as: the next one once its answer starts over
    chain: tuple[Alias, ...]  # the alias asked for and its fallbacks, resolved
    history: Sequence[Turn]  # the session's turns before this one
    plan: Plan | None = None  # what it carries on from an earlier attempt (takeover)

    @property
    def alias(self) -> Alias:
        """The alias asked for: the chain's first."""
        return self.chain[0]

    def taking_over(self, plan: Plan) -> Attempt:
        return replace(self, plan=plan)

    def started_over(self, job: JobRef) -> Attempt:
        """The same attempt as the job's next one (its answer starts over)."""
        return replace(self, job=job)


class Prompt(NamedTuple):
    """What goes to the model, and what the job's records say of how it was made."""

    messages: list[dict[str, Any]]
    estimate: int  # its tokens, tools and response schema included
    retrieved: Retrieved | None  # RAG mode's search
    sources_used: list[str]  # the chunk ids it holds


@dataclass(frozen=True)
class Answered:
    """What an attempt did, at whatever point it stopped: the values its steps returned."""

    attempt: Attempt
    answer: Answer
    images: Sequence[StoredImage] = ()  # the request's, as the history keeps them
    prompt: Prompt | None = None  # None: it stopped before its prompt was made
    params: dict[str, Any] | None = None  # the request's sampling parameters
    reservation: Reservation = field(default_factory=Reservation)
    failure: TransientError | PermanentError | None = None  # what ended it early

    @property
    def prompt_estimate(self) -> int:
        return self.prompt.estimate if self.prompt is not None else 0

    @property
    def sources_used(self) -> list[str]:
        return self.prompt.sources_used if self.prompt is not None else []
