"""Port 25's login check: the sidecar verifies the mailbox password itself, because postfix will not.

postfix-mailcow accepts any sender from mailcow's network on port 25 without AUTH (mailcow.md
section 5), so a request for port 25 is only sent after this module has found the login valid and
the password (or an app password) right. Never falls back to sending unverified.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..core.errors import ApiError
from ..core.model import LoginCredentials

log = Logger(namespace="smtpapi.locallogin")

# Checked when the login does not exist, so that an unknown login costs as much as a wrong password
# and response times do not tell which mailboxes exist. A bcrypt hash of a random throwaway string.
_DUMMY_HASH = "{BLF-CRYPT}$2y$10$DmIqyJYYPY9deWmrUuKKkuWV/SrgpeghJzS2fliZM0w4E1ZB5mPmW"


class CredentialStore(Protocol):
    """The database side: a login's validity and its password hashes."""

    def login_credentials(self, login: str) -> Deferred[LoginCredentials]:
        """Fire with the login's credentials; fail with ``ApiError`` when the database is down."""


class PasswordVerifier(Protocol):
    """Checks a password against stored hashes off the reactor thread."""

    def verify_any(self, login: str, stored_hashes: Any, password: str) -> Deferred[bool]:
        """Fire True when any hash matches; fail with ``ApiError`` for unsupported schemes or overload."""


def _refused() -> ApiError:
    # One answer for "no such login", "inactive" and "wrong password": callers learn nothing more.
    return ApiError.of("smtp_auth_failed", "the mailbox login or password was refused", field="password")


@attrs.define
class LocalLogin:
    """Verifies ``login`` + ``password`` against mailcow's database for submissions without AUTH."""

    store: CredentialStore
    verifier: PasswordVerifier

    async def check_login(self, login: str, password: str | None) -> None:
        """Return when the login may submit with this password; raise ``ApiError`` otherwise."""
        if not password:
            raise ApiError.of("smtp_auth_required", field="password")
        creds = await self.store.login_credentials(login)
        hashes = tuple(h for h in (creds.password_hash, *creds.app_hashes) if h)
        # Always spend one verification, even for unknown or disabled logins, so that response
        # times do not tell which mailboxes exist.
        matched = await self._verify(login, hashes or (_DUMMY_HASH,), password)
        if creds.problem is not None:
            log.info("local login refused for {login}: {problem}", login=login, problem=creds.problem)
            raise _refused()
        if matched and hashes:
            return
        if creds.password_hash is None:
            # The mailbox password lives with an identity provider; only postfix (via dovecot) can check it.
            raise ApiError.of(
                "smtp_local_auth_unsupported",
                f"{login} signs in through an external identity provider ({creds.authsource}); use port 587 or 465",
                field="smtp_port",
            )
        raise _refused()

    async def _verify(self, login: str, hashes: tuple[str, ...], password: str) -> bool:
        result = await self.verifier.verify_any(login, hashes, password)
        return bool(result)
