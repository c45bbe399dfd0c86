-- Contract v2 (contract 4): the history holds assistant tool calls and `tool` turns,
-- so the next turn's prompt is valid for the vendor.
ALTER TABLE llm_messages DROP CONSTRAINT IF EXISTS llm_messages_role_check;
ALTER TABLE llm_messages ADD CONSTRAINT llm_messages_role_check
    CHECK (role IN ('user', 'assistant', 'tool'));
ALTER TABLE llm_messages ADD COLUMN IF NOT EXISTS tool_calls jsonb;  -- [{id, name, arguments}]
ALTER TABLE llm_messages ADD COLUMN IF NOT EXISTS tool_call_id text;  -- a `tool` turn answers it
-- Signed reasoning before the calls (Anthropic's thinking blocks), sent back with them.
ALTER TABLE llm_messages ADD COLUMN IF NOT EXISTS thinking_blocks jsonb;
-- One row per role per job, and per answered call for `tool` rows.
ALTER TABLE llm_messages DROP CONSTRAINT IF EXISTS llm_messages_job_id_role_key;
CREATE UNIQUE INDEX IF NOT EXISTS llm_messages_once
    ON llm_messages (job_id, role, (coalesce(tool_call_id, '')));
