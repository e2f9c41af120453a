"""Errors that say what to fix: the SMTP target tried, a login that is no mailbox, what counts as
credentials, and why /readyz is unhappy."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.errors import CODES, ApiError, SmtpFailure
from mailcow_smtp_api.core.readiness import reason, smtp_reason
from mailcow_smtp_api.core.senders import not_a_mailbox
from mailcow_smtp_api.core.validate import parse_request

from .fakes import Decision
from .test_service import make, request


class NotAMailbox:
    """A sender check for a database where no login is a mailbox (an alias, a typo)."""

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        return succeed(Decision(False, not_a_mailbox(login)))

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        return succeed(False)


class HelpfulErrorTests(SynchronousTestCase):
    def failure_of(self, coro: Any) -> ApiError:
        err = self.failureResultOf(ensureDeferred(coro), ApiError).value
        assert isinstance(err, ApiError)
        return err

    def test_smtp_errors_name_the_target_they_tried(self) -> None:
        """Every answer made from an SMTP failure says which host:port it was, and nothing secret."""
        for failure in (
            SmtpFailure(kind="connect", phase="connect", reason="connection refused"),
            SmtpFailure(kind="reply", phase="data", code=554, text="5.7.1 rejected"),
            SmtpFailure(kind="reply", phase="auth", code=535, text="5.7.8 failed"),
        ):
            service, _, _, submitter, _ = make()
            submitter.failure = failure
            err = self.failure_of(service.send(request(smtp_port=10465), "192.0.2.1"))
            assert err.detail is not None
            self.assertEqual(err.detail["target"], "127.0.0.1:10465")
            self.assertNotIn("pw1", repr(err.detail))

    def test_an_ipv6_target_is_written_in_brackets(self) -> None:
        """[::1]:587, so the port cannot be read as part of the address."""
        service, _, _, submitter, _ = make(**{"smtp-host": "::1", "smtp-port": "587", "smtp-allow": "[::1]:587"})
        submitter.failure = SmtpFailure(kind="connect", phase="connect", reason="connection refused")
        err = self.failure_of(service.send(request(), "192.0.2.1"))
        assert err.detail is not None
        self.assertEqual(err.detail["target"], "[::1]:587")

    def test_a_from_that_is_no_mailbox_points_to_smtp_user(self) -> None:
        """Without smtp_user the login is 'from'; when that is an alias the 403 says so and names
        smtp_user, instead of "X may not send as X"."""
        service, _, _, submitter, _ = make()
        service.senders = NotAMailbox()
        err = self.failure_of(service.send(request(**{"from": "info@example.org"}), "192.0.2.1"))
        self.assertEqual((err.code, err.status, err.field), ("smtp_unauthorized_sender", 403, "smtp_user"))
        self.assertIn("info@example.org is not a mailbox", err.message)
        self.assertIn("set smtp_user to the mailbox that may send as info@example.org", err.message)
        self.assertFalse(err.message.startswith("info@example.org may not send as"))
        self.assertEqual(submitter.sent, [])

    def test_an_smtp_user_that_is_no_mailbox_says_so(self) -> None:
        """A given smtp_user that is no mailbox is named as such."""
        service, _, _, _, _ = make()
        service.senders = NotAMailbox()
        err = self.failure_of(service.send(request(smtp_user="shared@example.org"), "192.0.2.1"))
        self.assertEqual(err.field, "smtp_user")
        self.assertEqual(err.message, "smtp_user shared@example.org is not a mailbox: smtp_user must be a mailbox's login")


def test_auth_required_says_what_counts_as_credentials() -> None:
    """smtp_auth_required names password, app_password and a send key bound to the mailbox."""
    with pytest.raises(ApiError) as refused:
        parse_request({"from": "a@example.org", "to": ["b@example.org"], "subject": "s", "body": "b"})
    assert refused.value.code == "smtp_auth_required"
    message = refused.value.message
    for word in ("'password'", "'app_password'", "send key bound to the mailbox", "smtpapi-admin sendkey add --login"):
        assert word in message, message
    assert CODES["smtp_auth_required"][1] == message


@pytest.mark.parametrize(
    ("failure", "wanted"),
    [
        (SmtpFailure(kind="connect", phase="connect", reason="connection refused"), "connection refused"),
        (
            SmtpFailure(kind="tls", phase="tls", reason="the server certificate is not valid for mail.example.org"),
            "TLS name mismatch",
        ),
        (
            SmtpFailure(kind="tls", phase="tls", reason="TLS handshake failed: certificate verify failed"),
            "certificate not trusted",
        ),
        (SmtpFailure(kind="timeout", phase="greeting", reason="no answer within 30 s"), "no answer from postfix"),
    ],
)
def test_readiness_reasons_name_the_trouble_and_the_option(failure: SmtpFailure, wanted: str) -> None:
    """Each SMTP trouble reads as what it is, without host names (readyz needs no key)."""
    text = reason(failure)
    assert text == smtp_reason(failure)
    assert text.startswith(wanted)
    assert "mail.example.org" not in text
