"""capabilities: what each model alias takes besides text (contract 2.1, version 2),
and the intake's check that a request asks only for that.

An alias's flags come from LiteLLM's model map unless its config sets them (a model
we serve ourselves is unknown to the map). A request is checked against its alias
and every fallback, since any of them may end up answering it.
"""

from __future__ import annotations

from actors.ports import Pricing
from config import Config
from messages.ports import Capabilities
from messages.wire import BadInput, ChatRequest


def alias_capabilities(config: Config, pricing: Pricing) -> dict[str, Capabilities]:
    return {name: capabilities_of(config, pricing, name) for name in config.llm.models}


def capabilities_of(config: Config, pricing: Pricing, alias: str) -> Capabilities:
    spec = config.llm.models[alias]
    mapped = pricing.capabilities(spec.model)
    return Capabilities(
        vision=mapped.vision if spec.vision is None else spec.vision,
        tools=mapped.tools if spec.tools is None else spec.tools,
        reasoning=mapped.reasoning if spec.reasoning is None else spec.reasoning,
        # A model the map does not know, at an api_base, is one a team serves itself
        # (llama.cpp, vLLM, Ollama): those continue a trailing assistant turn.
        continues=spec.continues if spec.continues is not None else (
            mapped.continues if mapped.continues is not None else spec.api_base is not None))


def check_capabilities(request: ChatRequest, config: Config,
                       capabilities: dict[str, Capabilities]) -> None:
    """Raise BadInput when the request needs what an alias of its chain does not take."""
    first, _ = config.alias(request.model)
    chain = [first, *config.llm.models[first].fallbacks]
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
        for name in chain:
            if not getattr(capabilities[name], capability):
                raise BadInput(field, f"model alias {name!r} {what} (set llm.models.{name}."
                               f"{capability} = true if it does)", job_id=request.job_id,
                               user_id=request.user_id, session_id=request.session_id)
