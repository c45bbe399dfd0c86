-- llm_jobs: one row per job (contract 4).
CREATE TABLE IF NOT EXISTS llm_jobs (
    job_id            text PRIMARY KEY,
    user_id           text NOT NULL,
    session_id        text NOT NULL,
    trace_id          text,
    mode              text NOT NULL DEFAULT 'gen',
    model             text,
    provider          text,
    status            text NOT NULL CHECK (status IN
                        ('queued', 'running', 'completed', 'cancelled', 'timeout', 'failed', 'rejected')),
    attempt           integer NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_until       timestamptz,
    prompt_tokens     integer,
    completion_tokens integer,
    cost_usd          numeric(18, 10),
    ttft_ms           integer,
    latency_ms        integer,
    error             text,
    partial           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz
);
CREATE INDEX IF NOT EXISTS llm_jobs_session ON llm_jobs (user_id, session_id, created_at);

-- llm_messages: the chat history, read by (user_id, session_id).
CREATE TABLE IF NOT EXISTS llm_messages (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    session_id  text NOT NULL,
    user_id     text NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'assistant')),
    content     text NOT NULL,
    tokens      integer,
    partial     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, role)
);
CREATE INDEX IF NOT EXISTS llm_messages_history ON llm_messages (user_id, session_id, id);
