"""aliases: each configured model alias resolved once per worker, and a job's chain.

An `Alias` is what a job needs of one alias without going back to the config, the
price list or the tokenizer: its settings, its vendor, its token counter and what it
takes besides text. A job's chain is the alias it asks for and that alias's
fallbacks, in order (contract 2.1); the intake checks a request against it, and the
job wing is handed it, never a name to look up again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from actors.capabilities import capabilities_of
from actors.ports import Pricing, TokenCounting
from config import Config, ModelAlias
from messages.ports import Capabilities
from messages.wire import BadInput, ChatRequest


@dataclass(frozen=True, slots=True)
class Alias:
    """One model alias, resolved."""

    name: str
    spec: ModelAlias
    provider: str  # LiteLLM's name of its vendor
    count: Callable[[str], int]  # its tokenizer's count of a text
    capabilities: Capabilities


@dataclass(frozen=True, slots=True)
class Aliases:
    """Every alias of a worker's config, resolved once."""

    by_name: Mapping[str, Alias]
    default: str  # the alias of a request that names none

    @classmethod
    def resolve(cls, config: Config, pricing: Pricing, tokens: TokenCounting) -> Aliases:
        return cls({name: Alias(name=name, spec=spec, provider=pricing.provider_of(spec.model),
                                count=tokens.counter(spec.model),
                                capabilities=capabilities_of(config, pricing, name))
                    for name, spec in config.llm.models.items()}, config.llm.default_model)

    def __getitem__(self, name: str) -> Alias:
        return self.by_name[name]

    def chain(self, asked: str | None) -> tuple[Alias, ...]:
        """The alias a request asks for (None: the default) and its fallbacks, in the
        order they are tried."""
        alias = self.by_name[asked or self.default]
        return (alias, *(self.by_name[name] for name in alias.spec.fallbacks))


def check_capabilities(request: ChatRequest, chain: Sequence[Alias]) -> None:
    """Raise BadInput when the request needs what an alias of its chain (the alias it
    asks for and its fallbacks) does not take."""
    needs: list[tuple[str, str, str]] = []  # (capability, field, what)
    if request.tools or request.tool_results or request.tool_choice is not None:
        field = "$.tools" if request.tools else (
            "$.toolResults" if request.tool_results else "$.toolChoice")
        needs.append(("tools", field, "takes no tools"))
    if request.attachments:
        needs.append(("vision", "$.attachments", "takes no images"))
    if request.params.reasoning_effort is not None:
        needs.append(("reasoning", "$.params.reasoningEffort", "is not a reasoning model"))
    for capability, field, what in needs:
        for alias in chain:
            if not getattr(alias.capabilities, capability):
                name = alias.name
                raise BadInput(field, f"model alias {name!r} {what} (set llm.models.{name}."
                               f"{capability} = true if it does)", job_id=request.job_id,
                               user_id=request.user_id, session_id=request.session_id)
