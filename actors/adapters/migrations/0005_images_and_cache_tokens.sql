-- Contract v2 (contract 3, 1.5): the parts of a job's usage priced at their own rates,
-- under the one accounting rule (cached and cache-write tokens are parts of
-- prompt_tokens, reasoning tokens part of completion_tokens).
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS cached_tokens integer NOT NULL DEFAULT 0;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS cache_write_tokens integer NOT NULL DEFAULT 0;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS reasoning_tokens integer NOT NULL DEFAULT 0;

-- Images a user attached: the bytes once per user and content hash, however many
-- turns refer to them. A history row holds references only:
-- llm_messages.attachments = [{"sha256", "mediaType", "tokens"} | {"url", "tokens"}].
CREATE TABLE IF NOT EXISTS llm_attachments (
    user_id    text NOT NULL,
    sha256     text NOT NULL,
    media_type text NOT NULL,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, sha256)
);
ALTER TABLE llm_messages ADD COLUMN IF NOT EXISTS attachments jsonb;
