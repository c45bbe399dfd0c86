-- RAG jobs record how long retrieval took and how many chunks reached the prompt.
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS retrieval_ms integer;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS retrieval_hits integer;
