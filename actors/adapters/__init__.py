"""The only code that imports confluent_kafka, redis, psycopg, litellm, chromadb or asyncio.

Each adapter maps its library's errors to TransientError / PermanentError once.
"""

import os

# trio-asyncio patches asyncio.get_running_loop() when imported. anyio's asyncio
# backend (used by the openai SDK under LiteLLM) binds that function at its own
# import, so trio-asyncio must come first or streams die at their end with
# "no running event loop". Importing it here puts it before any adapter.
import trio_asyncio  # noqa: F401

# Before any adapter imports LiteLLM: otherwise LiteLLM fetches its price list from
# the network at import (no network at run time). Set in the package itself, so no import order
# inside an adapter can get ahead of it.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from actors.ports import Telemetry
from actors.telemetry import NoTelemetry
from config import Config


def telemetry_of(config: Config, service: str) -> Telemetry:
    """OpenTelemetry when otel.endpoint is set; else nothing at all (its SDK is not even
    imported)."""
    if not config.otel.endpoint:
        return NoTelemetry()
    from actors.adapters.telemetry import OtelTelemetry

    return OtelTelemetry(config.otel, service=service)
