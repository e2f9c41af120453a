"""django-anymail's Mailgun or Postmark backend in a Django configured here, as an application has it.

Reads one job (JSON) on standard input and prints one JSON line: ``{"result": ...}`` with what
anymail reported, or ``{"error": ...}`` with the exception it raised. A crash or a bad job exits
non-zero. The job::

    {"esp": "mailgun" | "postmark", "api_url": base URL, "key": API key or server token,
     "message": {"from_email", "to", "cc", "bcc", "subject", "body", "html", "headers",
                 "attachments": [{"filename", "mimetype", "base64"}],
                 "inline": [{"filename", "base64"}], "tags", "metadata",
                 "merge_data", "merge_headers", "merge_metadata", "esp_extra"}}

Each inline image is attached with anymail's ``attach_inline_image``; ``{inline0}``, ``{inline1}``...
in ``html`` become their Content-IDs (without the angle brackets), which the result lists too.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import django  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]

BACKENDS = {"mailgun": "anymail.backends.mailgun.EmailBackend", "postmark": "anymail.backends.postmark.EmailBackend"}


def configure(job: dict[str, Any]) -> None:
    """Django's settings with only what anymail needs: the backend, the key and the base URL."""
    esp = job["esp"]
    anymail = (
        {"MAILGUN_API_KEY": job["key"], "MAILGUN_API_URL": job["api_url"]}
        if esp == "mailgun"
        else {"POSTMARK_SERVER_TOKEN": job["key"], "POSTMARK_API_URL": job["api_url"]}
    )
    settings.configure(EMAIL_BACKEND=BACKENDS[esp], ANYMAIL=anymail, DEFAULT_CHARSET="utf-8")
    django.setup()


def build(fields: dict[str, Any]) -> tuple[Any, list[str]]:
    """The AnymailMessage of the job, and the Content-IDs of its inline images."""
    from anymail.message import AnymailMessage  # type: ignore[import-untyped]

    message = AnymailMessage(
        subject=fields.get("subject", ""),
        body=fields.get("body", ""),
        from_email=fields["from_email"],
        to=fields.get("to"),
        cc=fields.get("cc"),
        bcc=fields.get("bcc"),
        headers=fields.get("headers"),
    )
    cids = [
        message.attach_inline_image(base64.b64decode(image["base64"]), filename=image["filename"], domain="inline.test")
        for image in fields.get("inline", [])
    ]
    html = fields.get("html")
    if html is not None:
        for index, cid in enumerate(cids):
            html = html.replace(f"{{inline{index}}}", cid)
        message.attach_alternative(html, "text/html")
    for attachment in fields.get("attachments", []):
        message.attach(attachment["filename"], base64.b64decode(attachment["base64"]), attachment["mimetype"])
    for name in ("tags", "metadata", "merge_data", "merge_headers", "merge_metadata", "esp_extra"):
        if name in fields:
            setattr(message, name, fields[name])
    return message, cids


def main() -> None:
    job = json.load(sys.stdin)
    configure(job)
    from anymail.exceptions import AnymailError, AnymailRequestsAPIError  # type: ignore[import-untyped]

    message, cids = build(job["message"])
    try:
        sent = message.send()
    except AnymailError as error:
        response = getattr(error, "response", None)
        described = {
            "class": type(error).__name__,
            "api_error": isinstance(error, AnymailRequestsAPIError),
            "status_code": getattr(error, "status_code", None),
            "text": str(error),
            "response": response.text if response is not None else None,
        }
        print(json.dumps({"error": described}))
        return
    status = message.anymail_status
    recipients = {address: {"status": s.status, "message_id": s.message_id} for address, s in status.recipients.items()}
    # One id for the message, or a set of them when recipients got different ones (a batch).
    message_id = sorted(status.message_id) if isinstance(status.message_id, set) else status.message_id
    result = {
        "sent": sent, "message_id": message_id, "status": sorted(status.status or []), "recipients": recipients, "cids": cids,
    }  # fmt: skip
    print(json.dumps({"result": result}))


if __name__ == "__main__":
    main()
