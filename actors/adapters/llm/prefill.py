"""prefill: a vendor's refusal of a request that ends in an assistant turn, recognised.

A vendor the config or LiteLLM's map believes continues an answer may still refuse
the prefill that continues it (a self-served model, a map that lags a vendor
change). That refusal is a 400 like any other; this tells it apart, for both stream
paths, so the provider restarts the answer instead of failing the job.
"""

from __future__ import annotations

import re
from typing import Any

from actors.errors import PermanentError, PrefillRefused, TransientError

# How vendors refuse a request that ends in an assistant turn (a prefill), as their
# 400's text says it (LiteLLM keeps the vendor's text in its exception):
# - Anthropic, and Claude on Vertex and Bedrock, for every 4.6+ model: "This model
#   does not support assistant message prefill. The conversation must end with a
#   user message.";
# - Mistral without `prefix: true`: "Expected last role User or Tool (or Assistant
#   with prefix True) for serving but got assistant" (code 3230);
# - DeepSeek's reasoner: "The last message of deepseek-reasoner must be a user
#   message, or an assistant message with prefix mode on";
# - Gemini: "Requests ending with a model turn are not supported", earlier "Please
#   ensure that multiturn requests ends with a user role or a function response".
_PREFILL_REFUSED = re.compile(
    r"does not support (assistant )?(message )?prefill|prefill(ing)? (is )?not supported"
    r"|assistant with prefix|last role (should|must) be (user|tool)"
    r"|(conversation|messages?|last message) must end with a user"
    r"|last message (should|must) be (a |from the )?user"
    r"|must be a user message|ending with a model turn|ends? with a user role",
    re.IGNORECASE)


def refused_prefill(error: TransientError | PermanentError,
                    messages: list[dict[str, Any]]) -> TransientError | PermanentError:
    """`error` as PrefillRefused when the request ended in an assistant turn and the
    vendor's refusal says that was why; else unchanged."""
    if (isinstance(error, PermanentError) and messages
            and messages[-1].get("role") == "assistant"
            and error.code in ("bad_request", "provider_error")
            and _PREFILL_REFUSED.search(str(error))):
        return PrefillRefused(str(error))
    return error
