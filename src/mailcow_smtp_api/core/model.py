"""Frozen values that flow through a send: the parsed request, the envelope, the SMTP outcome.

Pure core: stdlib and attrs only.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeAlias

import attrs

# A message ready for DATA: one string, or consecutive pieces of whole CRLF-terminated lines
# (mime.build_message_parts), sent one after the other without being joined.
MessageData: TypeAlias = bytes | tuple[bytes, ...]


class CleanPieces(tuple[bytes, ...]):
    """Message pieces made clean by construction: each is whole lines ending in CRLF, with no bare
    CR or LF. The SMTP client sends them without checking each again (mime.build_message_parts)."""

    __slots__ = ()


@attrs.frozen
class Address:
    """One mailbox address: ASCII local part, domain as the caller wrote it (Unicode allowed).

    ``domain_ascii`` is the IDNA A-label form used on the wire (postfix offers no SMTPUTF8).
    """

    local: str
    domain: str
    domain_ascii: str
    display_name: str = ""

    @property
    def addr_spec(self) -> str:
        """The address as written in headers, with the Unicode domain."""
        return f"{self.local}@{self.domain}"

    @property
    def wire(self) -> str:
        """The address as sent in MAIL FROM / RCPT TO: ASCII only."""
        return f"{self.local}@{self.domain_ascii}"


@attrs.frozen
class Attachment:
    """A decoded attachment: a safe file name, its bytes and a ``type/subtype`` MIME type.

    ``content_id`` (without angle brackets) makes it an inline part that the HTML body shows
    through a ``cid:`` URL (RFC 2392); such a part has ``disposition`` ``inline``.
    """

    filename: str
    content: bytes = attrs.field(repr=False)
    content_type: str = "application/octet-stream"
    content_id: str | None = None
    disposition: str = "attachment"

    @property
    def inline(self) -> bool:
        """True for a part the HTML references by its Content-ID."""
        return self.content_id is not None


@attrs.frozen
class ListUnsubscribe:
    """Where a recipient unsubscribes (RFC 2369): an https URL for RFC 8058 one-click, and/or a mailbox."""

    url: str | None = None
    mailto: str | None = None


class Security(str, Enum):
    """How the SMTP connection is protected; chosen from the port."""

    PLAIN = "plain"  # port 25: no TLS, no AUTH; the sidecar is the only gate
    STARTTLS = "starttls"  # 587, 588 and any other port: STARTTLS required before AUTH
    TLS = "tls"  # 465: implicit TLS from the first byte

    @classmethod
    def for_port(cls, port: int) -> Security:
        """Pick the security mode mailcow's postfix uses on ``port``."""
        if port == 25:
            return cls.PLAIN
        if port == 465:
            return cls.TLS
        return cls.STARTTLS


def _security_from_port(target: SmtpTarget) -> Security:
    return Security.for_port(target.port)


@attrs.frozen
class SmtpTarget:
    """Where a message is submitted, and how the connection is secured.

    ``security`` defaults to what mailcow's postfix does on ``port`` (25 plain, 465 implicit TLS,
    anything else STARTTLS); an operator's allow-list entry can name it explicitly.
    """

    host: str
    port: int
    security: Security = attrs.field(default=attrs.Factory(_security_from_port, takes_self=True))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 address in brackets (``[::1]:587``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class Credentials:
    """A mailbox login and its password (or app password). The password never appears in repr."""

    login: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class RawMessage:
    """A caller's own message, checked and normalised (``rawmime.parse_raw_message``).

    ``data`` is the whole message, CRLF line ends, without ``Bcc``; ``message_id`` is its own
    Message-ID when it has one; ``subject`` is its Subject as written (for logs).
    """

    header_from: Address
    data: bytes = attrs.field(repr=False)
    message_id: str | None = None
    has_date: bool = False
    subject: str = ""


@attrs.frozen
class SendRequest:
    """A validated send request. Built only by ``validate.parse_request``.

    ``headers`` are the caller's extra header fields in order, none of them one the sidecar writes
    itself. ``message_id``, ``in_reply_to`` and ``references`` are full ``<left@right>`` ids.
    """

    sender: Address
    to: tuple[Address, ...]
    subject: str
    body: str
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: Address | None = None
    html_body: str = ""
    attachments: tuple[Attachment, ...] = ()
    smtp_host: str | None = None
    smtp_port: int | None = None
    login: str = ""
    password: str | None = attrs.field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    list_unsubscribe: ListUnsubscribe | None = None
    send_at: float | None = None  # unix seconds; only with Prefer: respond-async
    dry_run: bool = False  # every check, then the message back instead of sending it
    raw: RawMessage | None = None  # the caller's own message (POST /api/v1/send/raw); the fields above are its envelope

    def recipients(self) -> tuple[Address, ...]:
        """Every to/cc/bcc address once, first occurrence wins, compared case-insensitively."""
        seen: set[str] = set()
        out: list[Address] = []
        for address in (*self.to, *self.cc, *self.bcc):
            key = address.wire.lower()
            if key not in seen:
                seen.add(key)
                out.append(address)
        return tuple(out)


@attrs.frozen
class Envelope:
    """The SMTP envelope: MAIL FROM and RCPT TO addresses, ASCII only."""

    sender: str
    recipients: tuple[str, ...]


@attrs.frozen
class RecipientResult:
    """What the server answered to one RCPT TO."""

    address: str
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        """True for a 2xx reply."""
        return 200 <= self.code < 300


@attrs.frozen
class SubmitResult:
    """A message the server accepted (its reply to the final ``.``) and each recipient's reply."""

    code: int
    text: str
    recipients: tuple[RecipientResult, ...]
    queue_id: str | None = None

    @property
    def accepted(self) -> tuple[RecipientResult, ...]:
        """Recipients the server took."""
        return tuple(r for r in self.recipients if r.accepted)

    @property
    def refused(self) -> tuple[RecipientResult, ...]:
        """Recipients the server refused; the message was not sent to them."""
        return tuple(r for r in self.recipients if not r.accepted)


@attrs.frozen
class LoginCredentials:
    """What the database knows about a login's passwords (for local verification on port 25).

    ``problem`` says why the login may not submit at all (None when it may). ``password_hash`` is the
    mailbox's ``{SCHEME}hash`` when mailcow checks it itself (authsource ``mailcow``), else None.
    ``app_hashes`` are the hashes of its active app passwords with SMTP access.
    """

    login: str
    problem: str | None
    password_hash: str | None = attrs.field(default=None, repr=False)
    app_hashes: tuple[str, ...] = attrs.field(default=(), repr=False)
    authsource: str = "mailcow"
