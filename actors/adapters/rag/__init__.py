"""Adapters of retrieval: embeddings, the vector and keyword indexes, ingestion and users' uploads."""
