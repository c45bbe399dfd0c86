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
