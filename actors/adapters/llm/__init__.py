"""Adapters of the model vendors: LiteLLM, the native OpenAI-wire stream, what a worker
knows of a model, its prices and its token counts."""
