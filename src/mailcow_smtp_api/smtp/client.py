"""SMTP submission to postfix: plain (port 25), STARTTLS (587 and others) or implicit TLS (465).

The dialogue is a small client of its own on ``LineReceiver`` rather than a subclass of
``twisted.mail.smtp.ESMTPClient``. Making that client safe would mean overriding most of it:

- it dot-stuffs per 16 KiB chunk and rewrites every LF to CRLF, so a ``.`` line at a chunk boundary
  ends DATA early and CRLF input becomes CR CR LF (RFC 5321 4.5.2 needs the whole message stuffed);
- after a refused AUTH PLAIN it sends AUTH PLAIN a second time, and it prefers LOGIN over PLAIN;
  with dovecot each extra failure costs a delay and counts toward the client's penalty;
- it reads plaintext lines that arrived with the ``220`` to STARTTLS as the post-TLS EHLO reply
  (response injection; RFC 3207 4.2 says to discard everything learnt before TLS);
- its errors embed the session transcript, AUTH blob included, and its factory resends the message
  after a timeout or drop that came after the final dot.

This module keeps what Twisted does well (HostnameEndpoint, the transport's own ``startTLS`` for
both STARTTLS and implicit TLS, streaming producers, delayed calls on the reactor passed in) and
implements the few SMTP steps a submission needs: greeting, EHLO, STARTTLS, AUTH PLAIN/LOGIN,
MAIL, RCPT, DATA, RSET, NOOP, QUIT. Every step has a timeout, every failure is an
``errors.SmtpFailure`` whose text never holds what the client sent, and nothing is ever sent
twice: there is no reconnect and no retry.

The security mode comes from ``SmtpTarget.security`` (by default from the port: 25 plain, 465
implicit TLS, others STARTTLS). Certificates are checked twice over: OpenSSL verifies the chain
during the handshake, then service-identity checks the name before a single byte is sent over
TLS; a certificate without subjectAltName fails.

``SmtpSession`` is one connected (and possibly authenticated) session; it can send several
messages in sequence (``reset`` between them), which is what a session pool needs.
"""

from __future__ import annotations

import base64
import re
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import attrs
from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, platformTrust, trustRootFromCertificates
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from ..core.errors import SmtpFailure
from ..core.mime import crlf_only, normalise_crlf
from ..core.model import CleanPieces, Credentials, Envelope, MessageData, RecipientResult, Security, SmtpTarget, SubmitResult

_T = TypeVar("_T")

__all__ = [
    "Reply",
    "SmtpClientProtocol",
    "SmtpSession",
    "SmtpSubmitter",
    "TlsSettings",
    "data_payload",
    "load_ca_bundle",
    "normalize_line_ends",
    "parse_ehlo",
    "queue_id_of",
]


@attrs.frozen
class TlsSettings:
    """How the server's certificate is checked."""

    ca_file: str | None = None  # PEM bundle (every certificate in it is trusted); None: system CAs
    server_name: str | None = None  # name the certificate must carry; None: the target host
    verify: bool = True  # False only by explicit operator option


@attrs.frozen
class Reply:
    """One complete SMTP reply: its code and the text of each line (RFC 5321 4.2)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply text, one line per reply line."""
        return "\n".join(self.lines)


# --------------------------------------------------------------------------- wire helpers (pure)

_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
# Envelope addresses go inside <...> on a command line: printable ASCII only, no brackets, no
# whitespace (validation admits dot-atom local parts and A-label domains, RFC 5321 4.1.2).
_WIRE_ADDRESS = re.compile(r"[\x21-\x7e]+")
_HELO_NAME = re.compile(r"[A-Za-z0-9.\-\[\]:]+")
# RFC 5321 4.5.3.1.5 caps a reply line at 512 octets; postfix stays far below. Room for slack only.
_MAX_REPLY_LINE = 2048
_MAX_REPLY_LINES = 128
_CHUNK = 64 * 1024


def normalize_line_ends(message: bytes) -> bytes:
    """``message`` with every CRLF, bare CR and bare LF turned into one CRLF, ending in CRLF.

    RFC 5321 2.3.8 allows CR and LF only as a pair (postfix rejects or rewrites bare ones), and the
    DATA terminator is CRLF ``.`` CRLF (4.1.1.4), so the last line needs its line end.
    """
    # An empty message stays empty: its DATA payload is the terminator alone.
    return normalise_crlf(message) if message else b""


def message_pieces(message: MessageData) -> tuple[bytes, ...]:
    """The message as normalized pieces, each of whole CRLF-terminated lines.

    Pieces from ``mime.build_message_parts`` are used as they are; anything else is joined and
    normalized, so that no bare CR or LF can hide at the seam of two pieces.
    """
    if isinstance(message, CleanPieces):
        return message
    if isinstance(message, bytes):
        text = normalize_line_ends(message)
        return (text,) if text else ()
    if all(crlf_only(piece) and piece.endswith(b"\r\n") for piece in message if piece):
        return tuple(piece for piece in message if piece)
    return message_pieces(b"".join(message))


def stuffed_chunks(pieces: tuple[bytes, ...], size: int = _CHUNK) -> Iterator[bytes]:
    """The bytes sent after ``354``, lazily: ``pieces`` dot-stuffed in chunks, then ``.`` CRLF.

    Every line that starts with ``.`` gets one more ``.`` (RFC 5321 4.5.2). Chunks are cut at line
    ends only (a line longer than ``size`` stays whole), so every chunk starts a line and no chunk
    boundary can hide a line's first dot.
    """
    for piece in pieces:
        offset, total = 0, len(piece)
        while offset < total:
            end = offset + size
            if end < total:
                cut = piece.rfind(b"\r\n", offset, end)
                end = cut + 2 if cut >= offset else piece.index(b"\r\n", end - 1) + 2
            chunk = piece[offset:end] if offset or end < total else piece
            if chunk.startswith(b"."):
                chunk = b"." + chunk
            yield chunk.replace(b"\r\n.", b"\r\n..")
            offset = end
    yield b".\r\n"


def data_payload(message: MessageData) -> bytes:
    """The bytes sent after ``354`` as one string (see ``stuffed_chunks``)."""
    return b"".join(stuffed_chunks(message_pieces(message)))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The EHLO keywords (upper case) and their parameters; the first line is the server's name.

    The pre-standard ``AUTH=PLAIN LOGIN`` form some servers still send is read as ``AUTH``.
    """
    keywords: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        word = word.upper()
        if word.startswith("AUTH="):
            word, params = "AUTH", f"{word[5:]} {params}".strip()
        if word:
            keywords[word] = params.strip()
    return keywords


def queue_id_of(text: str) -> str | None:
    """postfix's queue id from its reply to the final dot (``250 2.0.0 Ok: queued as 4XyZ1``)."""
    match = _QUEUED_AS.search(text)
    return match.group(1) if match else None


def _wire_address(address: str, what: str, allow_empty: bool = False) -> bytes:
    """``address`` as it goes between ``<`` and ``>``; ValueError for what cannot be sent."""
    if address == "" and allow_empty:
        return b""  # the null reverse-path, MAIL FROM:<> (RFC 5321 4.5.5)
    if len(address) > 256 or not _WIRE_ADDRESS.fullmatch(address) or "<" in address or ">" in address:
        # Non-ASCII needs SMTPUTF8, which postfix-mailcow does not offer; validation should have
        # turned the domain into A-labels and refused the local part.
        raise ValueError(f"{what} cannot be sent in an SMTP envelope: {address!r}")
    return address.encode("ascii")


def _mail_from(sender: bytes, size: int, eight_bit: bool, keywords: dict[str, str]) -> bytes:
    """MAIL FROM with SIZE (RFC 1870) and BODY=8BITMIME (RFC 6152) when the server offers them."""
    line = b"MAIL FROM:<" + sender + b">"
    if "SIZE" in keywords:
        line += b" SIZE=%d" % size
    if eight_bit and "8BITMIME" in keywords:
        line += b" BODY=8BITMIME"
    return line


def _no_recipient_accepted(results: Sequence[RecipientResult]) -> None:
    """Raise the first recipient's refusal when the server took none of them."""
    if not any(r.accepted for r in results):
        first = results[0]
        raise SmtpFailure(kind="reply", phase="rcpt", code=first.code, text=first.text, recipients=tuple(results))


def _closing(reply: Reply, phase: str, results: Sequence[RecipientResult], secrets: tuple[str, ...]) -> None:
    """Raise at once on ``421``: the server is closing the session (RFC 5321 3.8), nothing more comes."""
    if reply.code == 421:
        raise SmtpFailure(kind="reply", phase=phase, code=421, text=_redact(reply.text, secrets), recipients=tuple(results))


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every occurrence of a secret replaced, for a server that echoes them."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _expect(reply: Reply, ok: tuple[int, ...], phase: str, secrets: tuple[str, ...] = ()) -> Reply:
    """Return ``reply`` when its code is in ``ok``; raise the matching ``SmtpFailure`` otherwise."""
    if reply.code in ok:
        return reply
    text = _redact(reply.text, secrets)
    if reply.code >= 400:
        raise SmtpFailure(kind="reply", phase=phase, code=reply.code, text=text)
    raise SmtpFailure(kind="protocol", phase=phase, code=reply.code, text=text, reason="unexpected reply")


# --------------------------------------------------------------------------- TLS


def load_ca_bundle(path: str) -> list[Certificate]:
    """Every certificate in the PEM file at ``path`` (``Certificate.loadPEM`` reads only the first)."""
    with open(path, "rb") as handle:
        pem = handle.read()
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate found") from None
    return [Certificate(X509.from_cryptography(cert)) for cert in certificates]


def _client_context(settings: TlsSettings) -> SSL.Context:
    """An OpenSSL context that verifies the chain against the configured CAs (or nothing at all)."""
    if not settings.verify:
        return CertificateOptions().getContext()
    if settings.ca_file is None:
        trust = platformTrust()
    else:
        trust = trustRootFromCertificates(load_ca_bundle(settings.ca_file))
    # TLS 1.2 is the floor (Twisted's default); the chain is verified by OpenSSL during the handshake.
    return CertificateOptions(trustRoot=trust).getContext()


def _is_ip(name: str) -> bool:
    return bool(isIPAddress(name) or isIPv6Address(name))


def _sni(name: str) -> bytes | None:
    """The SNI value for ``name``; none for IP addresses (RFC 6066 3)."""
    if _is_ip(name):
        return None
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTls:
    """Creates client TLS connections with SNI; the name check is done by the protocol afterwards."""

    def __init__(self, context: SSL.Context, server_name: str) -> None:
        self._context = context
        self._sni = _sni(server_name)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new client connection on the shared context."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _name_check(server_name: str) -> Callable[[X509 | None], str | None]:
    """A check of the peer certificate against ``server_name``: None when it matches, else why not.

    A certificate without subjectAltName fails here: service-identity raises CertificateError for it,
    which Twisted's own hostname check only logs (a CN-only certificate for another name passes there).
    """

    def check(certificate: X509 | None) -> str | None:
        if certificate is None:
            return "the server sent no certificate"
        cert = certificate.to_cryptography()
        try:
            if _is_ip(server_name):
                verify_certificate_ip_address(cert, server_name)
            else:
                verify_certificate_hostname(cert, server_name)
        except VerificationError:
            return f"the server certificate is not valid for {server_name}"
        except CertificateError:
            return f"the server certificate has no usable subjectAltName for {server_name}"
        return None

    return check


def _ssl_reason(exc: BaseException | None) -> str:
    """OpenSSL's reason strings (e.g. "certificate verify failed"), without anything we sent."""
    if exc is None:
        return "TLS handshake failed"
    details = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(item[2]) for item in details if isinstance(item, tuple) and len(item) == 3]
    return "TLS handshake failed: " + ("; ".join(reasons) if reasons else type(exc).__name__)


# --------------------------------------------------------------------------- the protocol


@implementer(IHandshakeListener)
class SmtpClientProtocol(LineReceiver):
    """The client side of one SMTP connection: commands out, whole replies in, each with a timeout.

    At most one thing is awaited at a time (a reply, the TLS handshake, or the transfer of the
    message and the reply to its final dot). The first failure (timeout, drop, TLS, protocol) is
    final: the transport is aborted and every later call fails with the same ``SmtpFailure``.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = _MAX_REPLY_LINE

    def __init__(
        self,
        clock: Any,
        timeout: float,
        tls_check: Callable[[X509 | None], str | None] | None,
        implicit_tls: Any = None,
    ) -> None:
        self._clock = clock
        self._implicit_tls = implicit_tls
        self._timeout = timeout
        self._tls_check = tls_check
        self.phase = "greeting"
        self._code: int | None = None
        self._lines: list[str] = []
        self._queued: Reply | None = None  # a reply nobody asked for (a greeting, a 421)
        self._owed = 0  # replies due for commands written
        self._backlog: deque[Reply] = deque()  # replies due that came before they were read
        self._waiter: Deferred[Any] | None = None
        self._waiting_for = ""  # "reply" or "tls"
        self._timer: Any = None  # the IDelayedCall of what is awaited (see _arm)
        self._timed_phase: str | None = None  # the phase whose timeout runs; None: nothing is awaited
        self._failure: SmtpFailure | None = None
        self._tls_done = False
        self._discard_after_reply = False
        self._writer: _PayloadWriter | None = None
        # What this connection sent that must never come back out (AUTH data): a server that
        # quotes it in any later reply gets it replaced before the text reaches an SmtpFailure.
        self.secrets: tuple[str, ...] = ()
        self.closed: Deferred[None] = Deferred()
        self.is_connected = False

    def connectionMade(self) -> None:
        """Start implicit TLS at once (RFC 8314 3.3); otherwise wait: the server speaks first."""
        self.is_connected = True
        if self._implicit_tls is not None:
            # startTLS on the fresh TCP transport is what wrapClientTLS would do, but keeps the TLS
            # layer on the connection's own transport, exactly as after STARTTLS.
            self.phase = "tls"
            self.transport.startTLS(self._implicit_tls)  # type: ignore[union-attr]

    # -- state

    @property
    def failure(self) -> SmtpFailure | None:
        """The failure that ended this connection, if any."""
        return self._failure

    # -- receiving

    def lineReceived(self, line: bytes) -> None:
        """Collect reply lines (RFC 5321 4.2.1: ``ddd-`` continues, ``ddd `` or ``ddd`` ends)."""
        if self._failure is not None:
            return
        code_text, sep = line[:3], line[3:4]
        if len(code_text) != 3 or not code_text.isdigit() or code_text[:1] not in b"2345" or sep not in (b"", b" ", b"-"):
            self._fail(SmtpFailure(kind="protocol", phase=self.phase, reason="the server sent a line that is not an SMTP reply"))
            return
        code = int(code_text)
        if self._code is not None and code != self._code:
            self._fail(SmtpFailure(kind="protocol", phase=self.phase, reason="reply lines with different codes"))
            return
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > _MAX_REPLY_LINES:
            self._fail(SmtpFailure(kind="protocol", phase=self.phase, reason="reply has too many lines"))
            return
        if sep == b"-":
            return
        reply = Reply(code=code, lines=tuple(self._lines))
        self._code, self._lines = None, []
        if self._discard_after_reply:
            # Anything the server sent after its reply to STARTTLS and before the handshake is
            # plaintext a third party may have injected; RFC 3207 4.2: discard it unread.
            self._discard_after_reply = False
            self.clearLineBuffer()
        self._deliver(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A reply line beyond any sane length ends the connection."""
        self._fail(SmtpFailure(kind="protocol", phase=self.phase, reason="reply line too long"))

    def _deliver(self, reply: Reply) -> None:
        solicited = self._owed > 0
        if solicited:
            self._owed -= 1
        waiter = self._waiter
        if waiter is not None and self._waiting_for == "reply":
            self._waiter = None
            self._timed_phase = None  # the timer stays scheduled for the next step (see _arm)
            waiter.callback(reply)
            return
        if self._waiting_for == "data" or (not solicited and self._queued is not None):
            self._fail(SmtpFailure(kind="protocol", phase=self.phase, reason="the server replied out of turn"))
            return
        if solicited:
            self._backlog.append(reply)  # pipelined: the reader asks for it next
        else:
            # The greeting may arrive before anyone asks for it (implicit TLS waits for the handshake first).
            self._queued = reply

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: check the certificate's name before anything is sent over it."""
        self._ack_tickets_at_once()
        problem = self._tls_check(self.transport.getPeerCertificate()) if self._tls_check else None  # type: ignore[union-attr]
        if problem is not None:
            self._fail(SmtpFailure(kind="tls", phase="tls", reason=problem))
            return
        self._tls_done = True
        waiter = self._waiter
        if waiter is not None and self._waiting_for == "tls":
            self._waiter = None
            self._disarm()
            waiter.callback(None)

    def _ack_tickets_at_once(self) -> None:
        """Acknowledge the server's TLS 1.3 session tickets at once rather than after ~40 ms.

        After the handshake the server writes its session tickets, then the greeting (implicit TLS)
        or the EHLO reply (STARTTLS) as a second small segment, which its Nagle algorithm holds until
        the first is acknowledged. Linux delays that ACK by 40 ms because this side has just sent
        its Finished (the exchange looks interactive). TCP_QUICKACK ends that mode and sends a held
        ACK, but sending re-enters it, so it is set after the reactor has written the Finished
        that is still buffered now: at the start of the turn after next.
        """
        sock = _tcp_socket(self.transport)
        if sock is not None:
            self._clock.callLater(0, self._clock.callLater, 0, _quick_ack, sock)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail whatever is awaited; the reason says whether TLS or the peer ended the connection."""
        self.is_connected = False
        self._disarm()
        if self._writer is not None:
            self._writer.stopProducing()
        if self._failure is None:
            self._failure = self._lost(reason)
            self._fire_failure()
        if not self.closed.called:
            self.closed.callback(None)

    def _lost(self, reason: Failure) -> SmtpFailure:
        if reason.check(SSL.Error):
            return SmtpFailure(kind="tls", phase=self.phase, reason=_ssl_reason(reason.value))
        if self.phase == "tls" and not self._tls_done:
            return SmtpFailure(kind="tls", phase="tls", reason="connection closed during the TLS handshake")
        if reason.check(net_error.ConnectionDone):
            return SmtpFailure(kind="dropped", phase=self.phase, reason="the server closed the connection")
        return SmtpFailure(kind="dropped", phase=self.phase, reason=f"connection lost ({type(reason.value).__name__})")

    # -- failing

    def _fail(self, failure: SmtpFailure) -> None:
        """Record the first failure, abort the connection, and fail what is awaited."""
        if self._failure is None:
            self._failure = failure
        self._disarm()
        if self._writer is not None:
            self._writer.stopProducing()
        if self.transport is not None and self.is_connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._fire_failure()

    def _fire_failure(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._failure is not None:
            waiter.errback(self._failure)

    def _timed_out(self) -> None:
        self._timer = None
        phase, self._timed_phase = self._timed_phase, None
        if phase is not None:
            self._fail(SmtpFailure(kind="timeout", phase=phase, reason=f"no answer within {self._timeout:g} s"))

    def _arm(self, phase: str) -> None:
        """Give what is awaited now ``timeout`` seconds, counted from now.

        One timer serves every step of a session: a reply only marks that nothing is awaited,
        and the next step moves the same timer on (``reset`` costs far less than a new
        ``callLater`` and a cancelled one per step). A timer that runs out while nothing is
        awaited, e.g. on a pooled session, ends quietly.
        """
        self._timed_phase = phase
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _disarm(self) -> None:
        self._timed_phase = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _wait(self, what: str, phase: str) -> Deferred[Any]:
        self.phase = phase
        self._waiting_for = what
        waiter: Deferred[Any] = Deferred(self._cancel)
        self._waiter = waiter
        self._arm(phase)
        return waiter

    def _cancel(self, waiter: Deferred[Any]) -> None:
        """The caller gave up: end the connection; the Deferred fails with CancelledError."""
        self._waiter = None
        self._fail(SmtpFailure(kind="dropped", phase=self.phase, reason="cancelled by the caller"))

    @property
    def in_step(self) -> bool:
        """True when every reply due for a written command has been read."""
        return self._owed == 0 and not self._backlog

    # -- the calls a session makes

    def read_reply(self, phase: str) -> Deferred[Reply]:
        """The next reply: to a command written earlier, or the greeting."""
        if self._failure is not None:
            return fail(self._failure)
        if self._backlog:
            self.phase = phase
            return succeed(self._backlog.popleft())
        if self._queued is not None:
            reply, self._queued = self._queued, None
            self.phase = phase
            return succeed(reply)
        return self._wait("reply", phase)

    def command(self, line: bytes, phase: str) -> Deferred[Reply]:
        """Send one command line and wait for its reply."""
        self._discard_after_reply = line == b"STARTTLS"
        failed = self.write_commands((line,), phase)
        return failed if failed is not None else self.read_reply(phase)

    def write_commands(self, lines: Sequence[bytes], phase: str) -> Deferred[Reply] | None:
        """Write command lines in one go (RFC 2920 pipelining when there are several).

        Their replies are then read in order with ``read_reply``. Returns a failed Deferred when
        the connection has already failed, or when the server said something nobody asked for.
        """
        if self._failure is not None:
            return fail(self._failure)
        if self._queued is not None:
            # Unasked-for reply, e.g. postfix's "421 timeout exceeded" on an idle session.
            reply, self._queued = self._queued, None
            kind = "dropped" if reply.code == 421 else "protocol"
            text = _redact(reply.text, self.secrets)
            self._fail(SmtpFailure(kind=kind, phase=phase, code=reply.code, text=text, reason="the server replied out of turn"))
            return fail(self._failure)
        self.phase = phase
        self._owed += len(lines)
        self.transport.write(b"".join(line + self.delimiter for line in lines))  # type: ignore[union-attr]
        return None

    def start_tls(self, creator: Any) -> Deferred[None]:
        """Start TLS on this connection (after ``220`` to STARTTLS); fire when the name is verified."""
        if self._failure is not None:
            return fail(self._failure)
        self.clearLineBuffer()
        waiter = self._wait("tls", "tls")
        try:
            self.transport.startTLS(creator)  # type: ignore[union-attr]
        except Exception:
            self._fail(SmtpFailure(kind="tls", phase="tls", reason="the connection cannot start TLS"))
        return waiter

    def tls_established(self) -> Deferred[None]:
        """Fire when implicit TLS has completed its handshake and name check."""
        if self._failure is not None:
            return fail(self._failure)
        if self._tls_done:
            return succeed(None)
        return self._wait("tls", "tls")

    def send_payload(self, payload: Iterator[bytes]) -> Deferred[Reply]:
        """Write the DATA payload (as streamed by ``_PayloadWriter``); fire with the reply to the final dot.

        The timeout restarts whenever the transport takes another chunk, so a large message on a slow
        link is not cut off, but a server that stops reading is. Once the final dot is handed to the
        transport the phase is ``message``: from then on the message may have been accepted.
        """
        if self._failure is not None:
            return fail(self._failure)
        waiter = self._wait("data", "data")
        self._writer = _PayloadWriter(self, payload)
        self._writer.start()
        return waiter

    def _progress(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)

    def _payload_written(self) -> None:
        self._writer = None
        self._waiting_for = "reply"
        self._arm("message")
        self.phase = "message"

    def close(self) -> None:
        """Close the connection after pending writes (used after QUIT)."""
        self._disarm()
        transport: Any = self.transport
        if transport is not None and self.is_connected:
            transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now."""
        self._fail(SmtpFailure(kind="dropped", phase=self.phase, reason="closed by the client"))


def _tcp_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under ``transport`` (its getHandle() is the TLS connection once TLS is on)."""
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


def _quick_ack(sock: socket.socket) -> None:
    """Leave delayed-ACK (interactive) mode and send any ACK being held; best effort, Linux only."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)
    except OSError:
        pass  # the connection is already gone


@implementer(IPushProducer)
class _PayloadWriter:
    """Streams the DATA payload in chunks while the transport keeps up (a streaming producer)."""

    def __init__(self, protocol: SmtpClientProtocol, payload: Iterator[bytes]) -> None:
        self._protocol = protocol
        self._payload = payload
        self._paused = False
        self._stopped = False
        self._writing = False

    def start(self) -> None:
        """Register with the transport and write until paused or done."""
        self._protocol.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """The transport has room again: write more."""
        self._paused = False
        if self._writing:
            return
        self._writing = True
        try:
            self._write_while_unpaused()
        finally:
            self._writing = False

    def _write_while_unpaused(self) -> None:
        transport: Any = self._protocol.transport
        while not self._paused and not self._stopped:
            chunk = next(self._payload, None)
            if chunk is None:
                self._stopped = True
                transport.unregisterProducer()
                self._protocol._payload_written()
                return
            transport.write(chunk)
            self._protocol._progress()

    def pauseProducing(self) -> None:
        """The transport's buffer is full."""
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is gone or failed: write nothing more (the transport drops its producer)."""
        self._stopped = True


class _ProtocolFactory(Factory):
    """Builds exactly one protocol for one connection attempt."""

    noisy = False  # no "Starting factory" log line for every submission

    def __init__(self, build: Callable[[], SmtpClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> SmtpClientProtocol:
        """The protocol for this connection."""
        return self._build()


# --------------------------------------------------------------------------- the session


class SmtpSession:
    """One greeted SMTP session, secured and authenticated as the target requires.

    ``send`` runs one mail transaction; after a failed transaction call ``reset`` before the next one.
    """

    def __init__(self, protocol: SmtpClientProtocol, helo_name: bytes) -> None:
        self.protocol = protocol
        self._helo_name = helo_name
        self.keywords: dict[str, str] = {}

    @property
    def usable(self) -> bool:
        """True while the connection is up and in step with the server (no reply still due)."""
        return self.protocol.failure is None and self.protocol.is_connected and self.protocol.in_step

    async def greet(self) -> None:
        """Wait for the ``220`` greeting (RFC 5321 3.1; a ``421``/``554`` greeting refuses service)."""
        _expect(await self.protocol.read_reply("greeting"), (220,), "greeting")

    async def hello(self) -> None:
        """EHLO, remembering the extensions offered (sent again after STARTTLS, RFC 3207 4.2)."""
        reply = _expect(await self.protocol.command(b"EHLO " + self._helo_name, "ehlo"), (250,), "ehlo")
        self.keywords = parse_ehlo(reply)

    async def starttls(self, creator: Any) -> None:
        """Upgrade to TLS and say EHLO again; never continue in plaintext."""
        if "STARTTLS" not in self.keywords:
            raise SmtpFailure(kind="tls", phase="starttls", reason="the server does not offer STARTTLS")
        _expect(await self.protocol.command(b"STARTTLS", "starttls"), (220,), "starttls")
        await self.protocol.start_tls(creator)
        self.keywords = {}
        await self.hello()

    async def authenticate(self, credentials: Credentials) -> None:
        """AUTH PLAIN (RFC 4616, preferred) or LOGIN; one attempt, never a second mechanism."""
        offered = set(self.keywords.get("AUTH", "").upper().split())
        login = credentials.login.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in offered:
            blob = _b64(b"\0" + login + b"\0" + password)
            secrets: tuple[str, ...] = (blob, credentials.password, _b64(password))
            self.protocol.secrets = secrets
            reply = await self.protocol.command(b"AUTH PLAIN " + blob.encode("ascii"), "auth")
            _expect(reply, (235,), "auth", secrets)
        elif "LOGIN" in offered:
            user, secret = _b64(login), _b64(password)
            secrets = (secret, credentials.password)
            self.protocol.secrets = secrets
            _expect(await self.protocol.command(b"AUTH LOGIN", "auth"), (334,), "auth", secrets)
            _expect(await self.protocol.command(user.encode("ascii"), "auth"), (334,), "auth", secrets)
            _expect(await self.protocol.command(secret.encode("ascii"), "auth"), (235,), "auth", secrets)
        else:
            shown = " ".join(sorted(offered)) or "none"
            raise SmtpFailure(kind="protocol", phase="auth", reason=f"no AUTH mechanism in common (server offers: {shown})")

    async def send(self, envelope: Envelope, message: MessageData) -> SubmitResult:
        """One transaction: MAIL, RCPT for each recipient, DATA, the message; the server's verdict.

        Refused recipients are listed in the result and the message goes to the others; when every
        recipient is refused the transaction ends before DATA with a ``rcpt`` failure.
        """
        sender = _wire_address(envelope.sender, "sender", allow_empty=True)
        recipients = [_wire_address(r, "recipient") for r in envelope.recipients]
        pieces = message_pieces(message)
        # SIZE counts the message with its CRLFs but without stuffing dots (RFC 1870 3).
        size = sum(len(piece) for piece in pieces)
        mail = _mail_from(sender, size, not all(piece.isascii() for piece in pieces), self.keywords)
        hidden = self.protocol.secrets  # a server may quote the AUTH line in any later reply
        if "PIPELINING" in self.keywords:
            results = await self._envelope_pipelined(mail, envelope.recipients, recipients, hidden)
        else:
            results = await self._envelope_in_step(mail, envelope.recipients, recipients, hidden)
        final = _expect(await self.protocol.send_payload(stuffed_chunks(pieces)), (250,), "message", hidden)
        return SubmitResult(code=final.code, text=_redact(final.text, hidden), recipients=tuple(results), queue_id=queue_id_of(final.text))

    async def _envelope_in_step(
        self, mail: bytes, addresses: tuple[str, ...], wires: list[bytes], hidden: tuple[str, ...]
    ) -> tuple[RecipientResult, ...]:
        """MAIL, each RCPT, DATA, each after the reply to the one before; the recipients' results."""
        _expect(await self.protocol.command(mail, "mail"), (250,), "mail", hidden)
        results: list[RecipientResult] = []
        for address, wire in zip(addresses, wires):
            reply = await self.protocol.command(b"RCPT TO:<" + wire + b">", "rcpt")
            _closing(reply, "rcpt", results, hidden)
            results.append(RecipientResult(address=address, code=reply.code, text=_redact(reply.text, hidden)))
        _no_recipient_accepted(results)
        _expect(await self.protocol.command(b"DATA", "data"), (354,), "data", hidden)
        return tuple(results)

    async def _envelope_pipelined(
        self, mail: bytes, addresses: tuple[str, ...], wires: list[bytes], hidden: tuple[str, ...]
    ) -> tuple[RecipientResult, ...]:
        """MAIL, every RCPT and DATA in one write (RFC 2920), then their replies in order.

        Every reply is read before any failure is raised, so the session stays in step for the
        pool. A ``354`` to a DATA that must not go on (the sender or every recipient refused) is
        answered by dropping the connection: the server then discards the transaction, where an
        empty message ended with ``.`` could still reach a recipient it took.
        """
        rcpts = [b"RCPT TO:<" + wire + b">" for wire in wires]
        failed = self.protocol.write_commands([mail, *rcpts, b"DATA"], "mail")
        if failed is not None:
            await failed
        try:
            mail_reply = await self.protocol.read_reply("mail")
            _closing(mail_reply, "mail", (), hidden)
            results: list[RecipientResult] = []
            for address in addresses:
                reply = await self.protocol.read_reply("rcpt")
                _closing(reply, "rcpt", results, hidden)
                results.append(RecipientResult(address=address, code=reply.code, text=_redact(reply.text, hidden)))
            data_reply = await self.protocol.read_reply("data")
            _closing(data_reply, "data", results, hidden)
        except SmtpFailure:
            # The server is closing (421) with replies still due: this session can never be in step again.
            self.protocol.abort()
            raise
        try:
            _expect(mail_reply, (250,), "mail", hidden)
            _no_recipient_accepted(results)
        except SmtpFailure:
            if data_reply.code == 354:
                self.protocol.abort()
            raise
        _expect(data_reply, (354,), "data", hidden)
        return tuple(results)

    async def reset(self) -> None:
        """RSET: abandon the current transaction (before reusing the session)."""
        _expect(await self.protocol.command(b"RSET", "mail"), (250,), "mail", self.protocol.secrets)

    async def noop(self) -> None:
        """NOOP: check that an idle session is still alive."""
        _expect(await self.protocol.command(b"NOOP", "ehlo"), (250,), "ehlo", self.protocol.secrets)

    def quit(self) -> Deferred[None]:
        """Say QUIT and close; never fails (the message, if any, is already accepted)."""
        if not self.usable:
            self.protocol.abort()
            return succeed(None)
        done: Deferred[Any] = self.protocol.command(b"QUIT", "quit")
        done.addBoth(lambda _: self.protocol.close())
        return done

    def abort(self) -> None:
        """Drop the connection without a word."""
        self.protocol.abort()


# --------------------------------------------------------------------------- the submitter


class SmtpSubmitter:
    """Submits one message per call over a new connection to the target; never resends."""

    def __init__(self, reactor: Any, tls: TlsSettings, timeout: float = 30.0, helo_name: str = "localhost") -> None:
        if not _HELO_NAME.fullmatch(helo_name):
            raise ValueError(f"helo_name must be a host name or address literal: {helo_name!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout
        self._helo_name = helo_name.encode("ascii")
        self._context = _client_context(tls)

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> Deferred[SubmitResult]:
        """Connect, secure, authenticate, send ``message`` to ``envelope``; fail with ``SmtpFailure`` only.

        A caller bug (credentials for the plain port, an envelope address that cannot be sent, NUL
        in the credentials) raises ValueError at once, before any connection is made.
        """
        _check_request(target, credentials, envelope)
        return Deferred.fromCoroutine(self._submit(target, credentials, envelope, message))

    async def _submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> SubmitResult:
        session = await self.open_session(target, credentials)
        result = await _ending_on_failure(session, session.send(envelope, message))
        session.quit()
        return result

    def open_session(self, target: SmtpTarget, credentials: Credentials | None) -> Deferred[SmtpSession]:
        """A session that is greeted, secured as ``target.security`` demands and authenticated."""
        return Deferred.fromCoroutine(self._open(target, credentials))

    async def _open(self, target: SmtpTarget, credentials: Credentials | None) -> SmtpSession:
        security = target.security
        server_name = self._tls.server_name or target.host
        check = _name_check(server_name) if self._tls.verify else None
        creator = _ClientTls(self._context, server_name)
        protocol = await self._connect(target, security, creator, check)
        session = SmtpSession(protocol, self._helo_name)
        await _ending_on_failure(session, _set_up(session, security, creator, credentials))
        return session

    async def _connect(
        self,
        target: SmtpTarget,
        security: Security,
        creator: _ClientTls,
        check: Callable[[X509 | None], str | None] | None,
    ) -> SmtpClientProtocol:
        """A connected protocol, or SmtpFailure(connect/timeout); the whole attempt has one deadline."""
        endpoint = HostnameEndpoint(self._reactor, target.host, target.port, timeout=self._timeout)
        implicit = creator if security is Security.TLS else None
        factory = _ProtocolFactory(lambda: SmtpClientProtocol(self._reactor, self._timeout, check, implicit))
        attempt: Deferred[Any] = endpoint.connect(factory)  # type: ignore[arg-type]
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            attempt.cancel()

        timer = self._reactor.callLater(self._timeout, give_up)
        try:
            return await attempt
        except Exception as exc:
            if timed_out:
                raise SmtpFailure(kind="timeout", phase="connect", reason=f"no connection within {self._timeout:g} s") from None
            if isinstance(exc, (CancelledError, net_error.ConnectingCancelledError)):
                raise  # the caller cancelled
            raise _connect_failure(exc) from None
        finally:
            if timer.active():
                timer.cancel()


def _connect_failure(exc: Exception) -> SmtpFailure:
    """Name the reason a connection could not be made (no message text: it may carry addresses)."""
    if isinstance(exc, net_error.DNSLookupError):
        return SmtpFailure(kind="connect", phase="connect", reason="host name not found")
    if isinstance(exc, net_error.ConnectionRefusedError):
        return SmtpFailure(kind="connect", phase="connect", reason="connection refused")
    if isinstance(exc, net_error.TimeoutError):
        return SmtpFailure(kind="timeout", phase="connect", reason="no connection within the timeout")
    return SmtpFailure(kind="connect", phase="connect", reason=f"cannot connect ({type(exc).__name__})")


def _check_request(target: SmtpTarget, credentials: Credentials | None, envelope: Envelope) -> None:
    """Refuse what the caller must never ask for, before a connection exists."""
    if credentials is not None and target.security is Security.PLAIN:
        # Port 25 has no TLS here: AUTH would put the password on the wire in clear.
        raise ValueError("no credentials may be sent to a plain (port 25) target")
    if credentials is not None and ("\0" in credentials.login or "\0" in credentials.password):
        raise ValueError("credentials must not contain NUL (RFC 4616 separates fields with it)")
    if not envelope.recipients:
        raise ValueError("the envelope has no recipients")
    _wire_address(envelope.sender, "sender", allow_empty=True)
    for recipient in envelope.recipients:
        _wire_address(recipient, "recipient")


async def _set_up(session: SmtpSession, security: Security, creator: Any, credentials: Credentials | None) -> None:
    """Greeting, EHLO, TLS as ``security`` demands (never AUTH before it), then AUTH if asked."""
    if security is Security.TLS:
        await session.protocol.tls_established()
    await session.greet()
    await session.hello()
    if security is Security.STARTTLS:
        await session.starttls(creator)
    if credentials is not None:
        await session.authenticate(credentials)


async def _ending_on_failure(session: SmtpSession, step: Coroutine[Any, Any, _T]) -> _T:
    """Run ``step``; on failure end the session: QUIT after a refusal (still in step), else abort."""
    try:
        return await step
    except SmtpFailure as failure:
        if failure.kind == "reply":
            session.quit()
        else:
            session.abort()
        raise
    except Exception:  # CancelledError; GeneratorExit must pass untouched
        session.abort()
        raise
