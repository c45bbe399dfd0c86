-- Cost and provider telemetry per job, and the budget / rate-limit ledger (issue 7).
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS retries integer;
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS fallbacks integer;
-- What the job has reserved and not yet settled: [[scope, kind, window_start, amount], ...].
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS budget_holds jsonb;
CREATE INDEX IF NOT EXISTS llm_jobs_finished ON llm_jobs (finished_at, user_id);

-- One row per limited scope (user:<id> / tenant:<name>), kind (usd, requests,
-- tokens) and window (the period for usd, the minute for requests and tokens).
-- A reservation is one conditional UPDATE: used + reserved + amount <= limit.
CREATE TABLE IF NOT EXISTS llm_budget_ledger (
    scope        text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('usd', 'requests', 'tokens')),
    window_start timestamptz NOT NULL,
    reserved     numeric(24, 10) NOT NULL DEFAULT 0,
    used         numeric(24, 10) NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, kind, window_start)
);
