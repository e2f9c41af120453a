"""SMTP outcome -> API answer, and the shape of every response body."""

from __future__ import annotations

import json

import pytest

from mailcow_smtp_api.core.errors import CODES, ApiError, SmtpFailure, smtp_failure_to_api_error
from mailcow_smtp_api.core.model import RecipientResult, SubmitResult
from mailcow_smtp_api.core.responses import error_body, success_body
from mailcow_smtp_api.core.validate import parse_request

NOT_OWNED = "5.7.1 <x@example.org>: Sender address rejected: not owned by user user1@example.org"


@pytest.mark.parametrize(
    ("failure", "code", "status"),
    [
        (SmtpFailure("reply", "auth", 535, "5.7.8 Error: authentication failed: bad"), "smtp_auth_failed", 403),
        (SmtpFailure("reply", "rcpt", 553, NOT_OWNED), "smtp_unauthorized_sender", 403),
        (SmtpFailure("reply", "rcpt", 554, "5.7.1 <a@b>: Relay access denied"), "smtp_error", 502),
        (SmtpFailure("reply", "mail", 550, "5.1.0 bad sender"), "smtp_error", 502),
        (SmtpFailure("reply", "message", 554, "5.7.0 rejected by policy"), "smtp_error", 502),
        (SmtpFailure("reply", "greeting", 421, "4.3.2 busy"), "smtp_error", 503),
        (SmtpFailure("reply", "mail", 451, "4.3.0 try later"), "smtp_error", 503),
        (SmtpFailure("reply", "rcpt", 452, "4.5.3 too many"), "smtp_error", 503),
        (SmtpFailure("connect", "connect", reason="connection refused"), "smtp_error", 503),
        (SmtpFailure("dropped", "rcpt"), "smtp_error", 503),
        (SmtpFailure("timeout", "greeting"), "smtp_error", 504),
        (SmtpFailure("timeout", "message"), "smtp_error", 504),
        (SmtpFailure("dropped", "message"), "smtp_error", 504),
        (SmtpFailure("tls", "starttls", reason="certificate verify failed"), "smtp_error", 502),
        (SmtpFailure("protocol", "ehlo"), "smtp_error", 502),
    ],
)
def test_smtp_failures_map_to_codes_and_statuses(failure: SmtpFailure, code: str, status: int) -> None:
    """Each SMTP outcome has its code and HTTP status; the reply is kept in detail."""
    err = smtp_failure_to_api_error(failure)
    assert (err.code, err.status) == (code, status)
    assert err.detail is not None and err.detail["phase"] == failure.phase
    if failure.code is not None:
        assert err.detail["smtp_code"] == failure.code
        assert err.detail["smtp_text"] == failure.text
    if status == 503:
        assert err.retry_after is not None and err.retry_after > 0


def test_ambiguous_outcome_is_flagged() -> None:
    """No reply after the final dot says the message may have been delivered."""
    err = smtp_failure_to_api_error(SmtpFailure("timeout", "message"))
    assert err.detail is not None and err.detail["outcome_unknown"] is True
    assert "may have been delivered" in err.message


def test_sender_mismatch_found_in_recipient_replies() -> None:
    """All recipients refused as 'not owned' is an unauthorized sender, with each recipient listed."""
    rcpts = (RecipientResult("a@example.org", 553, NOT_OWNED), RecipientResult("b@example.org", 553, NOT_OWNED))
    err = smtp_failure_to_api_error(SmtpFailure("reply", "rcpt", 553, NOT_OWNED, recipients=rcpts))
    assert err.code == "smtp_unauthorized_sender"
    assert err.detail is not None and [r["address"] for r in err.detail["recipients"]] == ["a@example.org", "b@example.org"]


def test_smtp_failure_str_has_no_transcript() -> None:
    """str() of a failure names kind, phase and code only."""
    assert str(SmtpFailure("reply", "auth", 535, "secret-looking text")) == "SmtpFailure(reply at auth 535)"


def test_every_code_has_a_status_and_message() -> None:
    """The code table is complete: status in range, message non-empty."""
    for code, (status, message) in CODES.items():
        assert 200 <= status < 600 and message, code


def req() -> object:
    return parse_request(
        {
            "from": "sender@example.com",
            "to": ["a@example.com", "b@example.com"],
            "bcc": ["c@example.com"],
            "subject": "s",
            "body": "b",
            "password": "hunter2-secret",
        }
    )


def test_success_body_in_mailcow_shape() -> None:
    """Success is a list of one object with type, log and msg [code, from, 'to1, to2']."""
    result = SubmitResult(
        250,
        "2.0.0 Ok: queued as 4AbC",
        tuple(RecipientResult(a, 250, "2.1.5 Ok") for a in ("a@example.com", "b@example.com", "c@example.com")),
        "4AbC",
    )
    body = success_body(req(), result, "<id@example.com>", "rid1")
    assert body[0]["type"] == "success"
    assert body[0]["msg"] == ["smtp_mail_sent", "sender@example.com", "a@example.com, b@example.com"]
    assert body[0]["log"][:2] == ["smtp_api", "send"]
    assert body[0]["queue_id"] == "4AbC"
    assert body[0]["message_id"] == "<id@example.com>"
    text = json.dumps(body)
    assert "hunter2-secret" not in text


def test_partial_acceptance_names_the_refused() -> None:
    """Refused recipients are never reported as sent."""
    result = SubmitResult(
        250,
        "ok",
        (RecipientResult("a@example.com", 250, "ok"), RecipientResult("b@example.com", 550, "5.1.1 unknown")),
        "Q1",
    )
    body = success_body(req(), result, "<id@example.com>", "rid")
    assert body[0]["msg"] == ["smtp_partially_sent", "sender@example.com", "a@example.com", "b@example.com"]
    assert body[0]["refused"] == ["b@example.com"]
    assert body[0]["type"] == "danger"


def test_error_body_shapes() -> None:
    """Coded errors are a list with msg = code; mailcow key errors are one bare object."""
    listed = error_body(ApiError.of("smtp_empty_subject", field="subject"), req(), "r")
    assert listed[0]["type"] == "error" and listed[0]["msg"] == "smtp_empty_subject"
    assert listed[0]["field"] == "subject"
    assert listed[0]["log"][2]["password"] == "*"
    assert "hunter2-secret" not in json.dumps(listed)
    bare = error_body(ApiError.mailcow(401, "authentication failed"), None, "r")
    assert bare == {"type": "error", "msg": "authentication failed"}


def test_rspamd_ratelimit_reply_is_429_rate_limited() -> None:
    """postfix's 451 4.7.1 Ratelimit (rspamd's soft reject) is the rate-limit answer, not a generic 503."""
    after_data = SmtpFailure("reply", "message", 451, '4.7.1 Ratelimit "mailcow" exceeded')
    err = smtp_failure_to_api_error(after_data)
    assert (err.code, err.status, err.retry_after) == ("smtp_rate_limited", 429, 60)
    at_rcpt = SmtpFailure("reply", "rcpt", 451, "4.7.1 all refused", recipients=(RecipientResult("a@b.example", 451, '4.7.1 Ratelimit "mailcow" exceeded'),))
    assert smtp_failure_to_api_error(at_rcpt).code == "smtp_rate_limited"
    other = SmtpFailure("reply", "message", 451, "4.3.0 try again later")
    assert (smtp_failure_to_api_error(other).code, smtp_failure_to_api_error(other).status) == ("smtp_error", 503)
