// What the client scripts share: the job in (JSON, from argv[2] or stdin) and the result
// out (exactly one JSON object, the last line of stdout). Anything a package logs goes to
// stderr, so stdout holds only the result.
import { readFileSync } from 'node:fs';

console.log = console.error;
console.info = console.error;

export function readJob() {
  const text = process.argv[2] ?? readFileSync(0, 'utf8');
  const job = JSON.parse(text);
  if (job === null || typeof job !== 'object' || Array.isArray(job)) {
    throw new TypeError(`the job must be a JSON object, not ${text.slice(0, 80)}`);
  }
  return job;
}

// Prints the result and exits 0 once stdout has it (a kept-alive socket must not hold the
// process open).
export function emit(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}

// Header lookup on a fetch Headers object or a plain record, null when absent.
export function header(headers, name) {
  if (!headers) return null;
  if (typeof headers.get === 'function') return headers.get(name);
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name);
  return key === undefined ? null : headers[key];
}
