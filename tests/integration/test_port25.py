"""Port 25 end to end: the sidecar verifies passwords and senders itself, postfix's plain port checks nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Sidecar, Testbed, hash_password
from .test_send_api import CURL_EXAMPLES, SENDER, example_body, post, run_curl

pytestmark = pytest.mark.integration

PLAIN = 10025


@pytest.fixture
def service(bed: Testbed, sidecar: Callable[..., Sidecar]) -> Sidecar:
    """A sidecar whose allow list has the bed's plain port as a plain target."""
    return sidecar()


def send25(service: Sidecar, **changes: Any) -> tuple[int, Any]:
    status, body, _ = post(service.url, example_body(smtp_port=PLAIN, **changes))
    return status, body


def test_right_password_is_sent_without_auth(service: Sidecar, bed: Testbed) -> None:
    """A verified login is submitted on the plain port, with no AUTH, and arrives."""
    status, body = send25(service, subject="via port 25")
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert message.mail_from == SENDER
    assert message.message["Subject"] == "via port 25"
    assert "sasl_username" not in bed.log_text("postfix").split(body[0]["queue_id"], 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SSHA256", "SSHA512", "PLAIN-MD5", "ARGON2ID", "CLEAR"])
def test_each_hash_scheme_verifies(service: Sidecar, bed: Testbed, scheme: str) -> None:
    """Mailboxes stored with each of mailcow's schemes log in with their password and not with another."""
    login = f"{scheme.lower().replace('-', '')}@example.com"
    bed.add_mailbox(login, f"pw-{scheme}", scheme)
    assert send25(service, **{"from": login, "password": f"pw-{scheme}"})[0] == 200
    status, body = send25(service, **{"from": login, "password": "not-it"})
    assert (status, body[0]["msg"]) == (403, "smtp_auth_failed")
    assert len(bed.wait_for_messages(1)) == 1


def test_wrong_password_and_foreign_sender_send_nothing(service: Sidecar, bed: Testbed) -> None:
    """A wrong password and a sender the mailbox does not own are refused before postfix is contacted."""
    before = bed.log_text("postfix").count("connect from")
    assert send25(service, password="wrong")[1][0]["msg"] == "smtp_auth_failed"
    assert send25(service, **{"from": "ceo@example.com", "smtp_user": SENDER})[1][0]["msg"] == "smtp_unauthorized_sender"
    assert send25(service, **{"from": "someone@elsewhere.example", "smtp_user": SENDER})[0] == 403
    assert bed.log_text("postfix").count("connect from") == before
    assert bed.messages() == []


def test_app_passwords_need_smtp_access(service: Sidecar, bed: Testbed) -> None:
    """An active app password with SMTP access works; without SMTP access or inactive it does not."""
    bed.add_app_password(SENDER, "app-ok")
    bed.add_app_password(SENDER, "app-no-smtp", smtp_access=0, name="imap only")
    bed.add_app_password(SENDER, "app-off", active=0, name="disabled")
    assert send25(service, password=None, app_password="app-ok")[0] == 200
    assert send25(service, password=None, app_password="app-no-smtp")[1][0]["msg"] == "smtp_auth_failed"
    assert send25(service, password=None, app_password="app-off")[1][0]["msg"] == "smtp_auth_failed"
    assert len(bed.wait_for_messages(1)) == 1


def test_inactive_mailbox_domain_and_resources_are_refused(service: Sidecar, bed: Testbed) -> None:
    """Receive-only, inactive, resource and no-SMTP mailboxes and inactive domains cannot send on 25."""
    bed.add_domain("dormant.example", active=0)
    cases = {
        "readonly@example.com": {"active": 2},
        "off@example.com": {"active": 0},
        "room@example.com": {"kind": "location"},
        "nosmtp@example.com": {"smtp_access": "0"},
        "user@dormant.example": {},
    }
    for login, options in cases.items():
        bed.add_mailbox(login, "pw-x", **options)
        status, body = send25(service, **{"from": login, "password": "pw-x"})
        assert (status, body[0]["msg"]) == (403, "smtp_auth_failed"), login
    assert bed.messages() == []


def test_changed_password_is_seen_at_once(service: Sidecar, bed: Testbed) -> None:
    """With --db-cache-ttl 0 (the fixture's), after a password change in the database the old password no longer works, the new one does."""
    assert send25(service)[0] == 200
    bed.execute("UPDATE mailbox SET password = %s WHERE username = %s", (hash_password("new-password"), SENDER))
    assert send25(service)[1][0]["msg"] == "smtp_auth_failed"
    assert send25(service, password="new-password")[0] == 200
    assert len(bed.wait_for_messages(2)) == 2


def test_with_a_cache_ttl_the_credential_row_is_read_once_per_ttl(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """With --db-cache-ttl 300 the row read at the first send serves the next ones: a password changed
    meanwhile takes effect only once the row expires (here: not within the test), as documented."""
    service = sidecar("--db-cache-ttl", "300")
    assert send25(service)[0] == 200
    bed.execute("UPDATE mailbox SET password = %s WHERE username = %s", (hash_password("new-password"), SENDER))
    assert send25(service)[0] == 200  # the cached row still holds the old hash
    assert send25(service, password="new-password")[1][0]["msg"] == "smtp_auth_failed"
    assert len(bed.wait_for_messages(2)) == 2


def test_identity_provider_mailbox_is_told_to_use_587(service: Sidecar, bed: Testbed) -> None:
    """A mailbox whose password lives with an identity provider cannot be verified locally."""
    bed.add_mailbox("sso@example.com", "idp-password", authsource="keycloak")
    status, body = send25(service, **{"from": "sso@example.com", "password": "idp-password"})
    assert (status, body[0]["msg"]) == (403, "smtp_local_auth_unsupported")
    assert "587" in body[0]["message"]


def test_no_password_mode_is_off_by_default(service: Sidecar, bed: Testbed) -> None:
    """Without --port25-no-password-from a request without password is refused on port 25 too."""
    status, body = send25(service, password=None)
    assert (status, body[0]["msg"]) == (400, "smtp_auth_required")


def test_basic_example_works_for_trusted_internal_callers(bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    """With port 25 as default and loopback trusted, the API document's unauthenticated example is delivered."""
    running = sidecar("--smtp-port", str(PLAIN), "--port25-no-password-from", "127.0.0.1/32")
    status, body = run_curl(CURL_EXAMPLES["basic"], running.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert message.mail_from == SENDER
    assert message.message["Subject"] == "Test Email"
    # Even trusted callers may only use local addresses, and only towards the plain port.
    status, answer, _ = post(running.url, example_body(password=None, **{"from": "x@foreign.example"}))
    assert (status, answer[0]["msg"]) == (403, "smtp_unauthorized_sender")
    status, answer, _ = post(running.url, example_body(password=None, smtp_port=10587))
    assert (status, answer[0]["msg"]) == (400, "smtp_auth_required")
    assert "may send on port 25 without a mailbox password" in running.log_text()
