// postmark.js (the "postmark" package), its ServerClient pointed at another host over plain HTTP.
// Job: {"host": "127.0.0.1:PORT", "token": server token, "call": "sendEmail" or
// "sendEmailBatch", "message": the call's argument (Postmark's JSON fields)}.

import postmark from "postmark";
import { answer, readJob } from "./job.mjs";

const job = await readJob();
const client = new postmark.ServerClient(job.token, { requestHost: job.host, useHttps: false, timeout: 60 });
if (!["sendEmail", "sendEmailBatch"].includes(job.call)) throw new Error(`unknown call ${job.call}`);

await answer(
  () => client[job.call](job.message),
  // postmark.js's errors: all PostmarkError, with the answer's ErrorCode and the HTTP status.
  (error) => ({
    postmarkError: error instanceof postmark.Errors.PostmarkError,
    message: error.message,
    code: error.code,
    statusCode: error.statusCode,
  }),
);
