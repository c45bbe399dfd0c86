-- What an attempt stopped before its end (a drain past shutdown.grace_s) handed back
-- with its lease: {attempt, text, reason, usage, costUsd}. The next attempt continues
-- that text (contract 3.3) and counts that usage; the terminal write clears it.
ALTER TABLE llm_jobs ADD COLUMN IF NOT EXISTS handed jsonb;
