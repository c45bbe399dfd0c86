// The Vercel AI SDK (`ai` 7 with `@ai-sdk/openai`) streaming from an OpenAI-compatible
// server through its Chat Completions model (openai.chat).
//
// Job (JSON, argv[2] or stdin): {"baseURL", "apiKey", "model", "messages", "extra": {...
// merged into streamText's options, e.g. maxOutputTokens, maxRetries}, "expect": "text"}.
// `stream` is ignored (streamText always streams). System messages may be in `messages`
// (allowSystemInMessages; AI SDK 7 refuses them there by default). No retries unless
// extra.maxRetries says so (the SDK's own default is 2).
// Prints one JSON object (the last line of stdout) and exits 0, an API error included:
//   {ok, text (the textStream parts joined), parts, finish_reason, raw_finish_reason,
//    usage ({inputTokens, outputTokens, totalTokens, ...} summed over steps, or null),
//    tool_calls, response_model, errors: [{class, name, message, status, is_retryable,
//    response_body, x_should_retry, retry_after}, ...] (each distinct error once: what
//    onError got, then e.g. the NoOutputGeneratedError the result promises reject with)}
// ok is false when an error reached onError or a promise rejected.
// Exits non-zero only for a bug in this script (or a job that is not JSON).
import { createOpenAI } from '@ai-sdk/openai';
import { streamText } from 'ai';
import { emit, header, readJob } from './job_io.mjs';

function describe(error) {
  const last = error?.lastError ?? error; // a RetryError wraps the attempts' errors
  return {
    class: error?.constructor?.name ?? typeof error,
    name: error?.name ?? null,
    message: String(error?.message ?? error),
    status: last?.statusCode ?? null,
    is_retryable: last?.isRetryable ?? null,
    response_body: last?.responseBody ?? null,
    x_should_retry: header(last?.responseHeaders, 'x-should-retry'),
    retry_after: header(last?.responseHeaders, 'retry-after'),
  };
}

// Each error once: after a failed call every result promise rejects with the same
// NoOutputGeneratedError.
function note(errors, error) {
  const described = describe(error);
  const text = JSON.stringify(described);
  if (!errors.some((seen) => JSON.stringify(seen) === text)) errors.push(described);
}

async function settled(promise, errors) {
  try {
    return await promise;
  } catch (error) {
    note(errors, error);
    return null;
  }
}

const job = readJob();
const openai = createOpenAI({ baseURL: job.baseURL, apiKey: job.apiKey });
const errors = [];
const parts = [];
const result = streamText({
  model: openai.chat(job.model),
  messages: job.messages,
  allowSystemInMessages: true,
  maxRetries: 0,
  onError: ({ error }) => { note(errors, error); },
  ...(job.extra ?? {}),
});
try {
  for await (const part of result.textStream) parts.push(part);
} catch (error) {
  note(errors, error);
}
const finishReason = await settled(result.finishReason, errors);
const rawFinishReason = await settled(result.rawFinishReason, errors);
const usage = await settled(result.usage, errors);
const toolCalls = await settled(result.toolCalls, errors);
const response = await settled(result.response, errors);
emit({
  ok: errors.length === 0,
  text: parts.join(''),
  parts,
  finish_reason: finishReason,
  raw_finish_reason: rawFinishReason ?? null,
  usage: usage ?? null,
  tool_calls: (toolCalls ?? []).map((call) => ({
    id: call.toolCallId, name: call.toolName, input: call.input ?? null,
  })),
  response_model: response?.modelId ?? null,
  errors,
});
