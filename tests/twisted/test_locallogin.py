"""Port 25's local login check over fakes: every refusal, and one hash check per attempt."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.mailcow.locallogin import LocalLogin
from mailcow_smtp_api.core.model import LoginCredentials


@attrs.define
class Store:
    rows: dict[str, LoginCredentials]

    def login_credentials(self, login: str) -> Deferred[LoginCredentials]:
        return succeed(self.rows.get(login, LoginCredentials(login, f"login {login} is not a mailbox")))


@attrs.define
class Verifier:
    """Matches when the password equals the text after the scheme prefix; records every check."""

    calls: list[tuple[str, tuple[str, ...]]] = attrs.Factory(list)

    def verify_any(self, login: str, stored_hashes: Any, password: str) -> Deferred[bool]:
        hashes = tuple(stored_hashes)
        self.calls.append((login, hashes))
        return succeed(any(h == "{CLEAR}" + password for h in hashes))


ROWS = {
    "user@example.org": LoginCredentials("user@example.org", None, "{CLEAR}right", ("{CLEAR}app1",)),
    "off@example.org": LoginCredentials("off@example.org", "login off@example.org is inactive", "{CLEAR}right"),
    "sso@example.org": LoginCredentials("sso@example.org", None, None, ("{CLEAR}app-sso",), authsource="keycloak"),
    "bare@example.org": LoginCredentials("bare@example.org", None, None, (), authsource="ldap"),
}


class LocalLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.verifier = Verifier()
        self.login = LocalLogin(Store(dict(ROWS)), self.verifier)

    def check(self, login: str, password: str | None) -> Any:
        return ensureDeferred(self.login.check_login(login, password))

    def refused(self, login: str, password: str | None) -> ApiError:
        err = self.failureResultOf(self.check(login, password), ApiError).value
        assert isinstance(err, ApiError)
        return err

    def test_mailbox_password_and_app_password_pass(self) -> None:
        """The mailbox password or one of its app passwords is accepted."""
        self.successResultOf(self.check("user@example.org", "right"))
        self.successResultOf(self.check("user@example.org", "app1"))

    def test_wrong_password_is_auth_failed(self) -> None:
        """A wrong password is smtp_auth_failed (403)."""
        err = self.refused("user@example.org", "wrong")
        self.assertEqual((err.code, err.status), ("smtp_auth_failed", 403))

    def test_unknown_and_inactive_logins_look_like_wrong_passwords(self) -> None:
        """Unknown or inactive logins answer exactly like a wrong password, after one hash check."""
        for login in ("nobody@example.org", "off@example.org"):
            before = len(self.verifier.calls)
            err = self.refused(login, "right")
            self.assertEqual((err.code, err.message), ("smtp_auth_failed", "the mailbox login or password was refused"))
            self.assertEqual(len(self.verifier.calls), before + 1)

    def test_external_identity_provider_accepts_app_passwords_only(self) -> None:
        """An SSO mailbox can use an app password on port 25; its main password cannot be checked here."""
        self.successResultOf(self.check("sso@example.org", "app-sso"))
        err = self.refused("sso@example.org", "the-idp-password")
        self.assertEqual(err.code, "smtp_local_auth_unsupported")
        self.assertIn("587", err.message)
        err = self.refused("bare@example.org", "anything")
        self.assertEqual(err.code, "smtp_local_auth_unsupported")

    def test_missing_password_is_auth_required(self) -> None:
        """No password at all is smtp_auth_required, without touching the database."""
        self.assertEqual(self.refused("user@example.org", None).code, "smtp_auth_required")
        self.assertEqual(self.verifier.calls, [])
