"""Response bodies in mailcow's shape: a JSON list of ``{"type", "log", "msg"}`` objects.

``log`` never holds a password, a body or attachment content (mailcow masks keys containing
``pass``; this service leaves them out entirely). Pure core.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs

from .errors import ApiError
from .model import SendRequest, SubmitResult


def request_log(request: SendRequest | None, request_id: str, key: str = "") -> list[Any]:
    """mailcow's ``log`` triple: function, action, and a summary of the request without secrets.

    ``key`` says which kind of key authenticated the request (``api_key``, or ``send_key:<id>``),
    never the key itself.
    """
    summary: dict[str, Any] = {"request_id": request_id}
    if key:
        summary["key"] = key
    if request is not None:
        summary.update(
            {
                "from": request.sender.wire,
                "to": [a.wire for a in request.to],
                "cc": [a.wire for a in request.cc],
                "bcc_count": len(request.bcc),
                "smtp_user": request.login,
                "attachments": len(request.attachments),
            }
        )
        if request.password is not None:
            summary["password"] = "*"
    return ["smtp_api", "send", summary]


def _recipient_rows(result: SubmitResult) -> list[dict[str, Any]]:
    return [{"address": r.address, "smtp_code": r.code, "smtp_text": r.text} for r in result.recipients]


def success_body(
    request: SendRequest, result: SubmitResult, message_id: str, request_id: str, key: str = ""
) -> list[dict[str, Any]]:
    """200 body: ``msg`` is ``["smtp_mail_sent", from, "to1, to2"]``; partial acceptance says so."""
    accepted = {r.address.lower() for r in result.accepted}
    to_sent = ", ".join(a.wire for a in request.to if a.wire.lower() in accepted)
    entry: dict[str, Any] = {
        "type": "success",
        "log": request_log(request, request_id, key),
        "msg": ["smtp_mail_sent", request.sender.wire, to_sent],
        "message_id": message_id,
        "queue_id": result.queue_id,
        "recipients": _recipient_rows(result),
    }
    if result.refused:
        entry["type"] = "danger"
        entry["msg"] = [
            "smtp_partially_sent",
            request.sender.wire,
            ", ".join(r.address for r in result.accepted),
            ", ".join(r.address for r in result.refused),
        ]
        entry["refused"] = [r.address for r in result.refused]
    return [entry]


def dry_run_body(prepared: Any, request_id: str, key: str = "") -> list[dict[str, Any]]:
    """200 body of a dry run: the envelope and the exact message bytes (base64) that a send would
    hand to the SMTP server, line ends CRLF, before dot-stuffing. ``prepared`` is the service's
    ``Prepared``."""
    request: SendRequest = prepared.request
    message = prepared.message
    data = message if isinstance(message, bytes) else b"".join(message)
    return [
        {
            "type": "success",
            "log": request_log(request, request_id, key),
            "msg": ["smtp_dry_run", request.sender.wire, ", ".join(a.wire for a in request.to)],
            "message_id": prepared.message_id,
            "target": str(prepared.target),
            "envelope": {"from": prepared.envelope.sender, "to": list(prepared.envelope.recipients)},
            "message": base64.b64encode(data).decode("ascii"),
        }
    ]


def error_body(err: ApiError, request: SendRequest | None, request_id: str, key: str = "") -> Any:
    """The body for an ``ApiError``: mailcow's bare object for key failures, else a one-item list."""
    if err.bare:
        return {"type": "error", "msg": err.message}
    entry: dict[str, Any] = {
        "type": "error",
        "log": request_log(request, request_id, key),
        "msg": err.code,
        "message": err.message,
    }
    if err.field is not None:
        entry["field"] = err.field
    if err.detail:
        entry["detail"] = err.detail
    return [entry]


@attrs.frozen
class ItemResult:
    """One message's outcome in the native pipeline's terms, for a front end that answers in
    another shape (a batch item, a Mailgun or Postmark answer).

    ``status`` and ``code`` are the native answer's (200 ``smtp_mail_sent``, 202
    ``smtp_mail_accepted``, 200 ``smtp_dry_run``, or an error's); ``field`` is the native field
    an error names; ``message_id`` is the ``<left@right>`` id of a message that was sent, queued
    or built; ``status_id`` its status record's id, when one was written; ``recipients`` the
    envelope recipients; ``refused`` those postfix refused when the message went to the others
    (``smtp_partially_sent``).
    """

    status: int
    code: str
    message: str = ""
    field: str | None = None
    message_id: str | None = None
    status_id: str | None = None
    recipients: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    retry_after: int | None = None
    # A dry run's message: {"envelope": {"from", "to"}, "message": base64 of the exact bytes}.
    dry_run: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True when the message was sent, queued or (dry run) built."""
        return self.status in (200, 202)
