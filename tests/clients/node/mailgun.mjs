// mailgun.js, as Ghost and most Node applications use it, pointed at another base URL.
// Job: {"url": base URL, "key": API key, "domain": sending domain, "data": messages.create's
// second argument, with "attachment" and "inline" as lists of {"filename", "contentType",
// "base64"}, and "message" (a raw MIME message) as base64 when given}.

import FormData from "form-data";
import Mailgun from "mailgun.js";
import { answer, bytes, readJob } from "./job.mjs";

const job = await readJob();
const client = new Mailgun(FormData).client({ username: "api", key: job.key, url: job.url });
const data = { ...job.data };
for (const field of ["attachment", "inline"]) {
  if (data[field]) {
    data[field] = data[field].map((file) => ({ filename: file.filename, contentType: file.contentType, data: bytes(file.base64) }));
  }
}
if (data.message) data.message = bytes(data.message);

await answer(
  () => client.messages.create(job.domain, data),
  // mailgun.js's APIError: the HTTP status, the answer's "message" as details.
  (error) => ({ type: error.type, status: error.status, message: error.message, details: error.details }),
);
