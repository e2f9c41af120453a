// The programs beside this file each read one job, a JSON object, on standard input, make the
// library call it names and print one JSON line: {"result": <what the library returned>} or
// {"error": <the error it raised, described>}. The exit status is 0 either way; anything else
// (a crash, a bad job) exits non-zero with the reason on standard error.

import { Buffer } from "node:buffer";

export async function readJob() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

// Bytes given in a job as base64.
export function bytes(base64) {
  return Buffer.from(base64, "base64");
}

// Run `call`; print what it returned or how it failed. `describe` turns the library's error into
// plain data (its own fields); the error's class name is always added.
export async function answer(call, describe) {
  let line;
  try {
    line = { result: await call() };
  } catch (error) {
    line = { error: { class: error?.constructor?.name ?? typeof error, ...describe(error) } };
  }
  process.stdout.write(JSON.stringify(line) + "\n");
}
