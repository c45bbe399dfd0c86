-- API keys (issue 40, contract 4.5): a key is `cak_` + 43 base64url characters (256
-- random bits), accepted by the gateway wherever a JWT is. Only the SHA-256 of the
-- whole key is kept, so a copy of this table lets nobody in; `shown` is all of a key
-- that is ever shown again: its prefix and last 4 characters (`cak_…AbCd`).
CREATE TABLE IF NOT EXISTS llm_api_keys (
    id            text PRIMARY KEY,        -- key_ + 24 hex digits
    user_id       text NOT NULL,           -- the user every request made with it is
    name          text,
    secret_sha256 text NOT NULL UNIQUE CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    shown         text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,             -- touched at most once a minute per gateway
    revoked_at    timestamptz              -- a revoked key stays listed, and is refused
);
CREATE INDEX IF NOT EXISTS llm_api_keys_user ON llm_api_keys (user_id, created_at);

-- What a job was asked with (written by the worker): the key that authenticated it
-- (NULL: a JWT), the end user and metadata an OpenAI client named. None of them
-- changes whose job it is.
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS api_key_id text;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS end_user text;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS metadata jsonb;
