// The official `openai` package against an OpenAI-compatible server.
//
// Job (JSON, argv[2] or stdin):
//   {"baseURL", "apiKey", "model", "messages", "stream": bool, "extra": {...merged into the
//    request body}, "expect": "text"}   -> chat.completions.create
//   {"op": "models", "baseURL", "apiKey"} -> models.list()
// Prints one JSON object (the last line of stdout) and exits 0, an API error included:
//   chat, streamed:  {ok, op: "chat", stream: true, text, tool_calls, finish_reason, usage,
//                     models (every chunk's model), ids (distinct chunk ids), chunks, role}
//   chat, whole:     {ok, op: "chat", stream: false, message, text, tool_calls,
//                     finish_reason, usage, model, id}
//   models:          {ok, op: "models", ids, models}
//   an error:        {ok: false, ..., error: {class, status, code, type, param, message,
//                     x_should_retry, retry_after, request_id}} (a stream's partial result
//                     is kept alongside)
// Exits non-zero only for a bug in this script (or a job that is not JSON).
import OpenAI, { APIError } from 'openai';
import { emit, header, readJob } from './job_io.mjs';

function describe(error) {
  const api = error instanceof APIError;
  return {
    class: error?.constructor?.name ?? typeof error,
    status: api ? (error.status ?? null) : null,
    code: api ? (error.code ?? null) : null,
    type: api ? (error.type ?? null) : null,
    param: api ? (error.param ?? null) : null,
    message: String(error?.message ?? error),
    x_should_retry: api ? header(error.headers, 'x-should-retry') : null,
    retry_after: api ? header(error.headers, 'retry-after') : null,
    request_id: api ? (error.requestID ?? null) : null,
  };
}

async function streamed(client, request) {
  const out = {
    ok: true, op: 'chat', stream: true, text: '', tool_calls: [], finish_reason: null,
    usage: null, models: [], ids: [], chunks: 0, role: null,
  };
  const calls = new Map();
  try {
    const stream = await client.chat.completions.create({ ...request, stream: true });
    for await (const chunk of stream) {
      out.chunks += 1;
      out.models.push(chunk.model);
      if (!out.ids.includes(chunk.id)) out.ids.push(chunk.id);
      if (chunk.usage) out.usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        const delta = choice.delta ?? {};
        if (delta.role && out.role === null) out.role = delta.role;
        if (typeof delta.content === 'string') out.text += delta.content;
        for (const part of delta.tool_calls ?? []) {
          const call = calls.get(part.index)
            ?? { index: part.index, id: null, type: null, function: { name: '', arguments: '' } };
          calls.set(part.index, call);
          if (part.id) call.id = part.id;
          if (part.type) call.type = part.type;
          call.function.name += part.function?.name ?? '';
          call.function.arguments += part.function?.arguments ?? '';
        }
        if (choice.finish_reason) out.finish_reason = choice.finish_reason;
      }
    }
  } catch (error) {
    out.ok = false;
    out.error = describe(error);
  }
  out.tool_calls = [...calls.values()].sort((a, b) => a.index - b.index);
  return out;
}

async function whole(client, request) {
  try {
    const completion = await client.chat.completions.create({ ...request, stream: false });
    const choice = completion.choices?.[0] ?? {};
    return {
      ok: true, op: 'chat', stream: false, message: choice.message ?? null,
      text: choice.message?.content ?? null, tool_calls: choice.message?.tool_calls ?? [],
      finish_reason: choice.finish_reason ?? null, usage: completion.usage ?? null,
      model: completion.model ?? null, id: completion.id ?? null,
    };
  } catch (error) {
    return { ok: false, op: 'chat', stream: false, error: describe(error) };
  }
}

async function models(client) {
  try {
    const listed = [];
    for await (const model of client.models.list()) listed.push(model);
    return { ok: true, op: 'models', ids: listed.map((model) => model.id), models: listed };
  } catch (error) {
    return { ok: false, op: 'models', error: describe(error) };
  }
}

const job = readJob();
const client = new OpenAI({ baseURL: job.baseURL, apiKey: job.apiKey, maxRetries: 0 });
if (job.op === 'models') {
  emit(await models(client));
} else {
  const request = { model: job.model, messages: job.messages, ...(job.extra ?? {}) };
  emit(await (job.stream ? streamed(client, request) : whole(client, request)));
}
