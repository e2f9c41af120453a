"""Errors are data: every failure a client can see has a stable code and an HTTP status.

This module also holds ``SmtpFailure`` (what went wrong talking to postfix) and the one table that
turns it into an ``ApiError``. Pure core: no Twisted.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

# code -> (HTTP status, message telling the caller what to fix)
CODES: dict[str, tuple[int, str]] = {
    # request shape
    "smtp_invalid_json": (400, "the request body is not a JSON object"),
    "smtp_unsupported_media_type": (415, "send the body as Content-Type: application/json"),
    "smtp_unknown_field": (400, "the request has a field this API does not know"),
    "smtp_invalid_field": (400, "a field has the wrong type or an invalid value"),
    "smtp_bad_http_request": (400, "the HTTP request is malformed (Content-Length, Transfer-Encoding or request line)"),
    "smtp_request_too_large": (413, "the request body is larger than the server accepts"),
    "smtp_request_timeout": (408, "the request did not arrive whole in time"),
    # send-api.md codes
    "smtp_invalid_from": (400, "'from' must be one valid email address"),
    "smtp_auth_required": (
        400,
        "credentials for the mailbox are required: 'password' (the mailbox's password), 'app_password' "
        "(a mailcow app password with SMTP access), or a send key bound to the mailbox as X-API-Key "
        "(smtpapi-admin sendkey add --login MAILBOX)",
    ),
    "smtp_unauthorized_sender": (403, "this mailbox may not send as the 'from' address"),
    "smtp_missing_recipients": (400, "'to' must list at least one recipient"),
    "smtp_invalid_recipient": (400, "a 'to' entry is not a valid email address"),
    "smtp_empty_subject": (400, "'subject' must not be empty"),
    "smtp_empty_body": (400, "'body' or 'html_body' must not be empty"),
    "smtp_invalid_cc": (400, "a 'cc' entry is not a valid email address"),
    "smtp_invalid_bcc": (400, "a 'bcc' entry is not a valid email address"),
    "smtp_invalid_reply_to": (400, "'reply_to' must be one valid email address"),
    "smtp_invalid_attachment": (400, "an attachment needs a safe file name, strict base64 content and a valid MIME type"),
    "smtp_error": (502, "the SMTP server did not accept the message"),
    # added by this service
    "smtp_invalid_subject": (400, "'subject' must not contain line breaks or control characters"),
    "smtp_invalid_smtp_user": (400, "'smtp_user' must be a mailbox address"),
    "smtp_too_many_recipients": (400, "too many recipients in one request"),
    "smtp_too_many_attachments": (400, "too many attachments in one request"),
    "smtp_host_not_allowed": (403, "this smtp_host/smtp_port is not in the server's allow list (--smtp-allow)"),
    "smtp_port25_unavailable": (403, "port 25 needs the server to verify mailbox passwords itself; use port 587 or 465"),
    "smtp_auth_failed": (403, "the mailbox login or password was refused"),
    "smtp_local_auth_unsupported": (403, "this mailbox cannot be verified locally; use port 587 or 465"),
    "smtp_partially_sent": (200, "some recipients were refused; the message went to the others"),
    "smtp_too_many_failures": (429, "too many failed attempts from this address; wait and try again"),
    "smtp_busy": (503, "too many password checks are in progress; try again shortly"),
    "smtp_db_unavailable": (503, "mailcow's database cannot be reached; try again shortly"),
    # inline images, custom headers, message ids (RFC 2392, RFC 5322 3.6, RFC 2369 / RFC 8058)
    "smtp_missing_inline_part": (400, "the HTML references a cid: URL that no attachment's content_id provides"),
    "smtp_unused_inline_part": (400, "an attachment has a content_id that the HTML body never references"),
    "smtp_invalid_header": (400, "a custom header needs a valid name and a single-line value"),
    "smtp_header_not_allowed": (400, "this header is written by the service and cannot be set in 'headers'"),
    "smtp_invalid_message_id": (400, "message ids must look like <left@right>: ASCII, no spaces"),
    "smtp_invalid_list_unsubscribe": (400, "list_unsubscribe needs an https URL and/or a mailto address"),
    # Idempotency-Key
    "smtp_invalid_idempotency_key": (400, "Idempotency-Key must be one header of 1-255 printable ASCII characters"),
    "smtp_idempotency_mismatch": (409, "this Idempotency-Key was already used with a different request body"),
    "smtp_idempotency_in_flight": (409, "a request with this Idempotency-Key is still in progress; retry shortly"),
    "smtp_idempotency_unavailable": (503, "the idempotency store cannot be reached; retry shortly"),
    # abuse controls: mailcow's rate limits, SMTP allow lists, fail2ban; send keys
    "smtp_rate_limited": (429, "the rate limit of this mailbox, domain or send key is reached; see Retry-After"),
    "smtp_ratelimit_unavailable": (503, "the rate-limit source (mailcow's Redis) cannot be reached; nothing was sent"),
    "smtp_access_denied": (403, "this mailbox may not use SMTP from the caller's address (mailcow's SMTP allow list)"),
    "smtp_no_plain_target": (
        403,
        "sending with a send key and no password needs a plain (port 25) target in --smtp-allow",
    ),
    # a caller's own message (POST /api/v1/send/raw), batches, dry runs
    "smtp_invalid_raw_message": (
        400,
        "'message' must be a base64 RFC 5322 message: one From header, header fields in ASCII, lines of at most 998 octets",
    ),
    "smtp_dry_run": (200, "every check passed; the message was built and not sent (dry_run)"),
    "smtp_too_many_messages": (400, "too many messages in one batch (--max-batch; Postmark's /email/batch: 500)"),
    # the outbox: accept now, deliver when postfix can (Prefer: respond-async), and status
    "smtp_outbox_full": (503, "the outbox is full (--outbox-max-messages / --outbox-max-bytes); retry after Retry-After"),
    "smtp_async_unavailable": (
        409,
        "Prefer: respond-async needs a plain (port 25) target in --smtp-allow to deliver on; send without it",
    ),
    "smtp_invalid_send_at": (400, "send_at must be an RFC 3339 time, not in the past, at most --max-schedule ahead"),
    "smtp_status_not_found": (404, "no message with this id for this key (or its status record has expired)"),
    "smtp_not_cancelable": (409, "the message was already handed to postfix (or ended) and cannot be canceled"),
    "smtp_internal_error": (500, "an unexpected error occurred; the request id is in the log"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "this route does not accept that method"),
}

# mailcow answers API-key failures with one bare object, not a list (mailcow.md section 3).
API_AUTH_FAILED = "authentication failed"
API_RW_DENIED = "API read/write access denied"


def api_ip_denied(ip: str) -> str:
    """mailcow's message for a key that may not be used from ``ip``."""
    return f"api access denied for ip {ip}"


@attrs.define(auto_exc=True, eq=False)
class ApiError(Exception):
    """A failure with a stable code, an HTTP status and a message for the caller.

    ``bare`` errors render as mailcow's single ``{"type": "error", "msg": ...}`` object (API-key
    failures); all others render as mailcow's list of ``{"type", "log", "msg"}`` objects.
    """

    code: str
    status: int
    message: str
    field: str | None = None
    detail: dict[str, Any] | None = None
    retry_after: int | None = None
    bare: bool = False

    @classmethod
    def of(
        cls,
        code: str,
        message: str | None = None,
        *,
        field: str | None = None,
        detail: dict[str, Any] | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> ApiError:
        """Build an error for a known ``code``; the table gives the status and default message."""
        default_status, default_message = CODES[code]
        return cls(
            code=code,
            status=status if status is not None else default_status,
            message=message if message is not None else default_message,
            field=field,
            detail=detail,
            retry_after=retry_after,
        )

    @classmethod
    def mailcow(cls, status: int, msg: str) -> ApiError:
        """An API-key failure worded and shaped exactly as mailcow's.

        ``code`` is a stable name for logs and metrics (mailcow's message can hold the client's IP).
        """
        if msg == API_RW_DENIED:
            code = "api_read_write_denied"
        elif msg.startswith("api access denied for ip"):
            code = "api_ip_denied"
        else:
            code = "api_authentication_failed"
        return cls(code=code, status=status, message=msg, bare=True)


# --------------------------------------------------------------------------- SMTP outcomes

PHASES = ("connect", "greeting", "ehlo", "starttls", "tls", "auth", "mail", "rcpt", "data", "message", "quit")


@attrs.define(auto_exc=True, eq=False)
class SmtpFailure(Exception):
    """What went wrong while submitting.

    kind:
      - ``reply``: the server answered an error reply (``code``/``text``) in ``phase``
      - ``connect``: no TCP connection (refused, unreachable, name not found)
      - ``tls``: TLS handshake or certificate verification failed, or STARTTLS not offered
      - ``timeout``: no answer within the timeout in ``phase``
      - ``dropped``: the server closed the connection in ``phase``
      - ``protocol``: the server said something that is not SMTP
    phase is one of ``PHASES``; ``message`` means after the final ``.`` was sent.
    ``recipients`` holds per-recipient replies when the failure is "all recipients refused".
    ``text`` never contains anything the client sent (no AUTH data).
    """

    kind: str
    phase: str
    code: int | None = None
    text: str = ""
    reason: str = ""
    recipients: tuple[Any, ...] = ()

    @property
    def outcome_unknown(self) -> bool:
        """True when the message may have been accepted: no reply to the final ``.``."""
        return self.phase == "message" and self.kind in ("timeout", "dropped", "protocol")

    @property
    def refused_for_now(self) -> bool:
        """True for a 4xx reply: the server asks to try again later."""
        return self.kind == "reply" and self.code is not None and 400 <= self.code < 500

    def __str__(self) -> str:  # never the session transcript
        code = f" {self.code}" if self.code is not None else ""
        return f"SmtpFailure({self.kind} at {self.phase}{code})"


_NOT_OWNED = re.compile(r"not owned by user|sender address rejected", re.IGNORECASE)
# rspamd's soft reject for mailcow's rate limit, as postfix relays it: 451 4.7.1 Ratelimit "mailcow" exceeded
_RATELIMIT = re.compile(r"\bratelimit\b", re.IGNORECASE)
RETRY_AFTER_SECONDS = 60


def _detail(f: SmtpFailure) -> dict[str, Any]:
    detail: dict[str, Any] = {"phase": f.phase, "kind": f.kind, "reason": f.reason or f.kind}
    if f.code is not None:
        detail["smtp_code"] = f.code
        detail["smtp_text"] = f.text
    if f.recipients:
        detail["recipients"] = [
            {"address": r.address, "smtp_code": r.code, "smtp_text": r.text} for r in f.recipients
        ]
    return detail


def _is_sender_mismatch(f: SmtpFailure) -> bool:
    """postfix refuses a sender the login does not own with 553/554 5.7.1 at RCPT (smtpd_delay_reject)."""
    if f.phase not in ("mail", "rcpt") or f.code not in (553, 554):
        return False
    texts = [f.text] + [getattr(r, "text", "") for r in f.recipients]
    return any(_NOT_OWNED.search(t or "") for t in texts)


def smtp_failure_to_api_error(f: SmtpFailure, target: str | None = None) -> ApiError:
    """Map an SMTP failure to the API's answer (issue: 535 -> 403, sender mismatch -> 403, ...).

    ``target`` (``host:port``) says in ``detail`` which server was tried.
    """
    detail = _detail(f)
    if target is not None:
        detail["target"] = target
    if f.kind == "reply" and f.code is not None:
        if f.phase == "auth" and f.code >= 500:
            return ApiError.of("smtp_auth_failed", detail=detail)
        if _is_sender_mismatch(f):
            return ApiError.of("smtp_unauthorized_sender", detail=detail)
        if f.code == 451 and any(_RATELIMIT.search(t or "") for t in [f.text, *(r.text for r in f.recipients)]):
            return ApiError.of(
                "smtp_rate_limited",
                "mailcow's rate limit for this mailbox or domain is reached (postfix: 451 Ratelimit); retry later",
                detail=detail,
                retry_after=RETRY_AFTER_SECONDS,
            )
        if f.refused_for_now:
            return ApiError.of(
                "smtp_error",
                "the SMTP server refused the message for now; retry later",
                status=503,
                detail=detail,
                retry_after=RETRY_AFTER_SECONDS,
            )
        return ApiError.of("smtp_error", "the SMTP server refused the message", status=502, detail=detail)
    if f.outcome_unknown:
        detail["outcome_unknown"] = True
        return ApiError.of(
            "smtp_error",
            "no reply after the message was sent: it may have been delivered; check before sending again",
            status=504,
            detail=detail,
        )
    if f.kind == "timeout":
        return ApiError.of("smtp_error", "the SMTP server did not answer in time", status=504, detail=detail)
    if f.kind == "tls":
        return ApiError.of(
            "smtp_error",
            "TLS with the SMTP server failed (certificate or name mismatch?); see --smtp-ca and --smtp-tls-name",
            status=502,
            detail=detail,
        )
    if f.kind == "protocol" and f.phase == "auth":
        return ApiError.of(
            "smtp_error", "the SMTP server offers no AUTH mechanism this service supports (PLAIN or LOGIN)", detail=detail
        )
    if f.kind == "protocol":
        return ApiError.of("smtp_error", "the SMTP server answered something that is not SMTP", status=502, detail=detail)
    return ApiError.of(
        "smtp_error",
        "the SMTP server cannot be reached; retry later",
        status=503,
        detail=detail,
        retry_after=RETRY_AFTER_SECONDS,
    )
