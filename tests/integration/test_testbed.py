"""The test bed behaves like mailcow's postfix: TLS and AUTH per port, dovecot's login rule, the sink.

These tests pin down what the service's integration tests rely on: 10587 wants STARTTLS before AUTH,
10465 is implicit TLS, 10025 relays for loopback without AUTH, logins and passwords come from the
bed's MariaDB as mailcow's dovecot reads them, a sender the login does not own gets 553 at RCPT,
and every accepted message reaches the sink with its envelope and without headers added by postfix.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from tests.integration.conftest import Testbed

pytestmark = pytest.mark.integration

DOMAIN = "example.org"
LOGIN = "alice@example.org"
PASSWORD = "alice-secret"
RECIPIENT = "someone@external.test"


@pytest.fixture
def bed(clean_testbed: Testbed) -> Testbed:
    """An empty bed with one active domain and one BLF-CRYPT mailbox (LOGIN / PASSWORD)."""
    clean_testbed.add_domain(DOMAIN)
    clean_testbed.add_mailbox(LOGIN, PASSWORD, "BLF-CRYPT")
    return clean_testbed


def tls_context(testbed: Testbed) -> ssl.SSLContext:
    """A client context that trusts only the bed's certificate and checks the host name."""
    return ssl.create_default_context(cafile=str(testbed.cert_path))


@pytest.fixture
def submission(bed: Testbed) -> Iterator[smtplib.SMTP]:
    """A session on 10587 after STARTTLS and EHLO, not yet authenticated."""
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        yield smtp


def authenticate(smtp: smtplib.SMTP, mechanism: str, login: str, password: str) -> int:
    """One AUTH attempt with exactly ``mechanism`` (smtplib's login() would retry with another)."""
    smtp.ehlo_or_helo_if_needed()
    smtp.user, smtp.password = login, password
    method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    try:
        return smtp.auth(mechanism, method)[0]
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code


def message(sender: str, token: str) -> EmailMessage:
    """A small message without Date: or Message-ID:, tagged with ``token`` in its subject."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = RECIPIENT
    msg["Subject"] = f"bed test {token}"
    msg.set_content(f"body {token}\n")
    return msg


def test_submission_requires_starttls_before_auth(bed: Testbed) -> None:
    """10587 offers no AUTH and refuses MAIL before STARTTLS, then offers AUTH PLAIN and LOGIN."""
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        code, text = smtp.mail(LOGIN)
        assert code == 530, text
        smtp.rset()
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert set(smtp.esmtp_features["auth"].upper().split()) == {"PLAIN", "LOGIN"}
        assert smtp.esmtp_features["size"] == str(100 * 1024 * 1024)
        assert not smtp.has_extn("smtputf8") and not smtp.has_extn("chunking")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "SHA512-CRYPT"])
def test_mailbox_password_authenticates(bed: Testbed, scheme: str, mechanism: str) -> None:
    """dovecot accepts the stored mailbox password hashed as mailcow stores it, with PLAIN and LOGIN."""
    login = f"user-{scheme.lower()}@{DOMAIN}"
    bed.add_mailbox(login, "pw-" + scheme, scheme)
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, mechanism, login, "pw-" + scheme) == 235


SCHEMES = [
    "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "SSHA256", "SSHA512", "SSHA",
    "PLAIN-MD5", "PLAIN", "CLEAR", "ARGON2I", "ARGON2ID",
]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_helper_scheme_is_accepted_by_dovecot(bed: Testbed, scheme: str) -> None:
    """Each {SCHEME} the bed's hash helper writes is one dovecot verifies, so a test may use any."""
    login = f"scheme-{scheme.lower()}@{DOMAIN}"
    bed.add_mailbox(login, "pw-" + scheme, scheme)
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        assert authenticate(smtp, "PLAIN", login, "pw-" + scheme) == 235


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_app_password_authenticates(bed: Testbed, mechanism: str) -> None:
    """Each of a mailbox's app passwords logs in as that mailbox, not only the first one."""
    bed.add_app_password(LOGIN, "app-one", "BLF-CRYPT", name="phone")
    bed.add_app_password(LOGIN, "app-two", "SHA512-CRYPT", name="laptop")
    for password in ("app-one", "app-two"):
        with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
            smtp.starttls(context=tls_context(bed))
            smtp.ehlo()
            assert authenticate(smtp, mechanism, LOGIN, password) == 235


def test_stored_smtp_access_as_number_authenticates(bed: Testbed) -> None:
    """attributes.smtp_access stored as the JSON number 1 counts like the string "1"."""
    bed.add_mailbox(f"numeric@{DOMAIN}", "pw-numeric", "SHA512-CRYPT", smtp_access=1)
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, "PLAIN", f"numeric@{DOMAIN}", "pw-numeric") == 235


def test_wrong_password_is_535(submission: smtplib.SMTP) -> None:
    """A wrong password gets 535 5.7.8."""
    submission.user, submission.password = LOGIN, "not-the-password"
    with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
        submission.auth("PLAIN", submission.auth_plain)
    assert failure.value.smtp_code == 535
    error = failure.value.smtp_error
    assert isinstance(error, bytes) and error.startswith(b"5.7.8")


LOCKED_OUT: dict[str, dict[str, Any]] = {
    "mailbox_inactive": {"active": 0},
    "mailbox_receive_only": {"active": 2},
    "resource_location": {"kind": "location"},
    "resource_thing": {"kind": "thing"},
    "resource_group": {"kind": "group"},
    "smtp_access_off": {"smtp_access": "0"},
    "external_identity_provider": {"authsource": "keycloak"},
}


@pytest.mark.parametrize("changes", LOCKED_OUT.values(), ids=list(LOCKED_OUT))
def test_mailbox_outside_mailcows_login_rule_is_535(bed: Testbed, changes: dict[str, Any]) -> None:
    """The right password is refused unless the mailbox is active, not a resource, has SMTP access
    and is verified by mailcow itself."""
    login = f"locked@{DOMAIN}"
    bed.add_mailbox(login, "right-password", "SHA512-CRYPT", **changes)
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, "PLAIN", login, "right-password") == 535


def test_mailbox_in_inactive_domain_is_535(bed: Testbed) -> None:
    """A mailbox whose domain is inactive cannot log in, even with its right password."""
    bed.add_domain("off.test", active=0)
    bed.add_mailbox("user@off.test", "right-password", "SHA512-CRYPT")
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, "PLAIN", "user@off.test", "right-password") == 535


@pytest.mark.parametrize("changes", [{"active": 0}, {"smtp_access": 0}], ids=["inactive", "no_smtp_access"])
def test_app_password_without_smtp_access_is_535(bed: Testbed, changes: dict[str, Any]) -> None:
    """An app password that is inactive or lacks SMTP access does not log in."""
    bed.add_app_password(LOGIN, "app-secret", "SHA512-CRYPT", **changes)
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, "PLAIN", LOGIN, "app-secret") == 535


def test_own_address_is_delivered_to_sink(bed: Testbed, submission: smtplib.SMTP) -> None:
    """An owned sender is accepted and reaches the sink unchanged: envelope, headers, body, and no
    Date: or Message-ID: added by postfix."""
    token = uuid.uuid4().hex
    assert authenticate(submission, "PLAIN", LOGIN, PASSWORD) == 235
    submission.send_message(message(LOGIN, token))
    [delivered] = bed.wait_for_messages(1)
    assert delivered.mail_from == LOGIN
    assert delivered.rcpt_to == (RECIPIENT,)
    assert delivered.message["Subject"] == f"bed test {token}"
    assert delivered.message.get_content() == f"body {token}\n"
    assert f"Authenticated sender: {LOGIN}" in str(delivered.message["Received"])
    assert "Date" not in delivered.message and "Message-ID" not in delivered.message


def test_foreign_sender_is_553_at_rcpt(bed: Testbed, submission: smtplib.SMTP) -> None:
    """MAIL FROM an address the login does not own is accepted, then every RCPT gets 553 "not owned"."""
    bed.add_mailbox(f"bob@{DOMAIN}", "bob-secret")
    assert authenticate(submission, "PLAIN", LOGIN, PASSWORD) == 235
    assert submission.mail(f"bob@{DOMAIN}")[0] == 250
    code, text = submission.rcpt(RECIPIENT)
    assert code == 553
    assert text.startswith(b"5.7.1") and f"not owned by user {LOGIN}".encode() in text


def test_unauthenticated_submission_is_refused(submission: smtplib.SMTP) -> None:
    """Without AUTH, 10587 refuses the recipient (554), as mailcow's 587 does."""
    assert submission.mail(LOGIN)[0] == 250
    assert submission.rcpt(RECIPIENT)[0] == 554


def test_implicit_tls_port_authenticates_checks_and_delivers(bed: Testbed) -> None:
    """10465 speaks TLS at once (certificate valid for 127.0.0.1), applies the same sender check,
    and delivers an owned sender's message."""
    bed.add_mailbox(f"bob@{DOMAIN}", "bob-secret")
    token = uuid.uuid4().hex
    with smtplib.SMTP_SSL(bed.host, bed.smtps_port, context=tls_context(bed), timeout=10) as smtp:
        assert authenticate(smtp, "LOGIN", LOGIN, PASSWORD) == 235
        assert smtp.mail(f"bob@{DOMAIN}")[0] == 250
        assert smtp.rcpt(RECIPIENT)[0] == 553
        smtp.rset()
        smtp.send_message(message(LOGIN, token))
    [delivered] = bed.wait_for_messages(1)
    assert delivered.message["Subject"] == f"bed test {token}"


def test_certificate_is_valid_for_localhost(bed: Testbed) -> None:
    """The bed's certificate verifies for the name localhost, as the service's --smtp-tls-name uses it."""
    with (
        socket.create_connection((bed.host, bed.smtps_port), timeout=10) as raw,
        tls_context(bed).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(512).startswith(b"220 ")


def test_plain_port_relays_any_sender_without_auth(bed: Testbed) -> None:
    """10025 offers no AUTH and relays any sender for loopback clients, like mailcow's port 25."""
    token = uuid.uuid4().hex
    with smtplib.SMTP(bed.host, bed.plain_port, timeout=10) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.send_message(message("stranger@elsewhere.test", token), to_addrs=["x@one.test", "y@two.test"])
    [delivered] = bed.wait_for_messages(1)
    assert delivered.mail_from == "stranger@elsewhere.test"
    assert delivered.rcpt_to == ("x@one.test", "y@two.test")
    assert delivered.message["Subject"] == f"bed test {token}"


def test_messages_skips_a_capture_still_being_written(bed: Testbed) -> None:
    """A message the sink is still receiving is not listed until its final dot."""
    with smtplib.SMTP(bed.host, bed.sink_port, timeout=10) as sink:
        sink.ehlo()
        assert sink.mail("direct@example.org")[0] == 250
        assert sink.rcpt(RECIPIENT)[0] == 250
        sink.putcmd("data")
        assert sink.getreply()[0] == 354
        sink.send(b"Subject: half\r\n\r\nfirst line\r\n")
        assert bed.messages() == []
        sink.send(b"..dot-stuffed line\r\n.\r\n")
        assert sink.getreply()[0] == 250
    [delivered] = bed.wait_for_messages(1)
    assert delivered.raw.endswith(b"first line\n.dot-stuffed line\n")


def test_postfix_stops_and_starts_again(bed: Testbed) -> None:
    """stop_postfix closes the submission port; start_postfix brings it back with the same data."""
    bed.stop_postfix()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((bed.host, bed.submission_port), timeout=5).close()
    finally:
        bed.start_postfix()
    with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(bed))
        smtp.ehlo()
        assert authenticate(smtp, "PLAIN", LOGIN, PASSWORD) == 235


def test_postfix_starts_again_over_a_half_written_queue_file(bed: Testbed) -> None:
    """A stop in the middle of a submission leaves a temporary file in incoming/; postsuper only warns.

    "postfix start" runs postsuper, which logs that file itself while postlogd is down; with a log
    it could not open, the warning became a failed start (seen in a restart under load).
    """
    bed.stop_postfix()
    leftover = bed.directory / "queue" / "incoming" / "737797.4242"
    try:
        leftover.write_bytes(b"half a message")
        shutil.chown(leftover, "postfix")
    finally:
        bed.start_postfix()
    try:
        with smtplib.SMTP(bed.host, bed.submission_port, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
        assert "bogus file name: incoming/737797.4242" in bed.log_text("postfix")
    finally:
        leftover.unlink(missing_ok=True)  # postfix never touches a file of that name
