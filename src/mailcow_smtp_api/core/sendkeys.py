"""Send keys: least-privilege API keys of the sidecar's own, each bound to one mailbox login.

A mailcow API key is an admin key (it can delete domains through mailcow's API). A send key can
only send: as its login, with senders that login owns by mailcow's rule (and, when the key names
them, only those), from its networks, within its own rate and mailcow's. It needs no mailbox
password: the key proves who sends, and the sidecar submits on the plain internal path after its
own checks.

A key reads ``smtpapi-<id>-<secret>``: a 12-hex-digit public id (it names the key in listings,
logs and fail2ban lines) and 256 random bits as 64 hex digits. Only a keyed hash of the secret is
stored: HMAC-SHA256 under a random salt of the key's own row. It is compared in constant time.
Pure core: stdlib and attrs only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

import attrs

from .apikeys import ip_allowed
from .errors import API_AUTH_FAILED, ApiError, api_ip_denied
from .ratelimit import Limit, parse_limit

PREFIX = "smtpapi-"
_TOKEN = re.compile(r"smtpapi-([0-9a-f]{12})-([0-9a-f]{64})")
_ID = re.compile(r"[0-9a-f]{12}")
# A well-formed key whose id is unknown is still hashed once, against this salt, so that unknown
# and known ids cost about the same.
_DUMMY_SALT = bytes(16)


@attrs.frozen
class NewKey:
    """A key as it is shown once to the operator, and the row that stores its hash."""

    token: str = attrs.field(repr=False)
    key_id: str
    salt: str
    digest: str = attrs.field(repr=False)


@attrs.frozen
class SendKey:
    """A stored send key. ``senders`` empty means every sender the login owns."""

    key_id: str
    login: str
    salt: str = attrs.field(repr=False)
    digest: str = attrs.field(repr=False)
    senders: tuple[str, ...] = ()
    rate: str | None = None
    allow_from: str = ""
    expires_at: float | None = None
    disabled: bool = False
    created_at: float = 0.0

    @property
    def limit(self) -> Limit | None:
        """The key's own rate, if it has one."""
        return parse_limit(self.rate)

    def may_send_as(self, sender: str) -> bool:
        """True when the key's sender list allows ``sender`` (case-insensitively); no list allows all."""
        return not self.senders or sender.lower() in self.senders


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).hexdigest()


def new_key() -> NewKey:
    """A fresh key: its token (shown once) and what is stored of it."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_hex(32)
    salt = secrets.token_bytes(16)
    return NewKey(token=f"{PREFIX}{key_id}-{secret}", key_id=key_id, salt=salt.hex(), digest=_digest(salt, secret))


def looks_like_send_key(raw: str | None) -> bool:
    """True when a presented header is meant as a send key (it starts with ``smtpapi-``)."""
    return bool(raw) and raw.strip().lower().startswith(PREFIX)  # type: ignore[union-attr]


def parse_token(raw: str | None) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed send key, or None."""
    match = _TOKEN.fullmatch((raw or "").strip().lower())
    return None if match is None else (match.group(1), match.group(2))


def key_id_of(raw: str | None) -> str:
    """The public id of a presented key, for logs and fail2ban lines; ``invalid`` for junk.

    Only the id is ever shown: never the secret, and never text the caller chose freely.
    """
    text = (raw or "").strip().lower()[len(PREFIX) :]
    candidate = text[:12]
    return candidate if _ID.fullmatch(candidate) else "invalid"


def valid_id(text: str) -> bool:
    """True for a send key id (12 lower-case hex digits)."""
    return _ID.fullmatch(text) is not None


def secret_matches(key: SendKey | None, secret: str) -> bool:
    """Constant-time check of ``secret`` against the stored hash; a missing key costs one hash too."""
    salt = bytes.fromhex(key.salt) if key is not None else _DUMMY_SALT
    expected = key.digest if key is not None else "0" * 64
    same = hmac.compare_digest(_digest(salt, secret), expected)
    return same and key is not None


def check_key(key: SendKey | None, secret: str, client_ip: str, now: float) -> SendKey:
    """The key, if ``secret`` is its secret and it may be used now from ``client_ip``.

    Failures answer as mailcow answers API-key failures (401 ``authentication failed``, or
    ``api access denied for ip``), so clients handle both kinds of key alike.
    """
    if not secret_matches(key, secret):
        raise ApiError.mailcow(401, API_AUTH_FAILED)
    assert key is not None
    if key.disabled or (key.expires_at is not None and now >= key.expires_at):
        raise ApiError.mailcow(401, API_AUTH_FAILED)
    if key.allow_from and not ip_allowed(client_ip, key.allow_from):
        raise ApiError.mailcow(401, api_ip_denied(client_ip))
    return key


def normalise_senders(entries: Sequence[str]) -> tuple[str, ...]:
    """A key's sender list, lower-cased, without duplicates, in order."""
    out: list[str] = []
    for entry in entries:
        value = entry.strip().lower()
        if value and value not in out:
            out.append(value)
    return tuple(out)
