"""In-memory kit for the SMTP client tests: a throwaway PKI, a scripted connection, a TLS-capable
in-memory pipe and a small postfix-like server. Nothing here touches the network or the reactor."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from mailcow_smtp_api.core.model import Credentials, Envelope, SmtpTarget
from mailcow_smtp_api.smtp.client import SmtpSubmitter, TlsSettings

TIMEOUT = 10.0
HELO = b"client.test"
PASSWORD = "s3cr\u00e9t-pw"  # non-ASCII on purpose: sent as UTF-8
CREDENTIALS = Credentials("user1@example.org", PASSWORD)
PLAIN_BLOB = base64.b64encode(b"\0user1@example.org\0" + PASSWORD.encode("utf-8"))
LOGIN_USER = base64.b64encode(b"user1@example.org")
LOGIN_SECRET = base64.b64encode(PASSWORD.encode("utf-8"))
SECRETS = (PASSWORD, PLAIN_BLOB.decode(), LOGIN_SECRET.decode())
ENVELOPE = Envelope(sender="user1@example.org", recipients=("a@example.net", "b@example.net"))
MESSAGE = b"Subject: hi\r\nFrom: user1@example.org\r\n\r\nHello.\r\n"
# No PIPELINING: the scripted conversations check the one-command-at-a-time exchange.
EHLO_PLAIN = (b"250-mail.test", b"250 ENHANCEDSTATUSCODES")
EHLO_PIPELINING = (b"250-mail.test", b"250-PIPELINING", b"250 ENHANCEDSTATUSCODES")


# --------------------------------------------------------------------------- PKI


class Pki:
    """A throwaway CA and certificates made for the tests (EC keys: fast)."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_key, self.ca = self._ca("Test CA")
        self.other_ca_key, self.other_ca = self._ca("Unrelated CA")
        self.good = self.issue(dns=("localhost",), ips=("127.0.0.1",))
        self.wrong_name = self.issue(dns=("evil.example",))
        self.no_san = self.issue(cn="localhost", dns=(), ips=())
        self.untrusted = self.issue(dns=("localhost",), ips=("127.0.0.1",), ca=(self.other_ca_key, self.other_ca))

    def _ca(self, name: str) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(days=1))
            .not_valid_after(self.now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(
        self, *, cn: str = "server", dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), ca: Any = None
    ) -> tuple[Any, x509.Certificate]:
        """A server key and certificate signed by ``ca`` (default: the test CA)."""
        ca_key, ca_cert = ca or (self.ca_key, self.ca)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(days=1))
            .not_valid_after(self.now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    @staticmethod
    def pem(*certs: x509.Certificate) -> bytes:
        """The certificates as one PEM bundle, in order."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    @staticmethod
    def server_options(pair: tuple[Any, x509.Certificate]) -> ServerTls:
        """Server-side TLS settings presenting ``pair``."""
        return ServerTls(*pair)

    @staticmethod
    def x509(pair: tuple[Any, x509.Certificate]) -> X509:
        """The certificate as pyOpenSSL's X509 (what a TLS transport's getPeerCertificate returns)."""
        return X509.from_cryptography(pair[1])


@implementer(IOpenSSLContextFactory)
class ServerTls:
    """A server context factory (IOpenSSLContextFactory's getContext) presenting one key and certificate."""

    def __init__(self, key: Any, certificate: x509.Certificate) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.use_certificate(certificate)
        self._context.use_privatekey(key)

    def getContext(self) -> SSL.Context:
        return self._context


_PKI: Pki | None = None


def pki() -> Pki:
    """One PKI per test run."""
    global _PKI
    if _PKI is None:
        _PKI = Pki()
    return _PKI


# --------------------------------------------------------------------------- scripted connection


class ScriptedTransport(StringTransport):
    """A StringTransport that records STARTTLS and hands out a chosen peer certificate."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_creator: Any = None
        self.peer_certificate: X509 | None = None
        self.aborted = False
        self.pause_after_writes: int | None = None
        self.writes = 0

    def startTLS(self, creator: Any) -> None:
        self.tls_creator = creator

    def getPeerCertificate(self) -> X509 | None:
        return self.peer_certificate

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        # Simulate a full socket buffer: pause the registered streaming producer.
        if self.pause_after_writes is not None and self.writes >= self.pause_after_writes and self.producer:
            self.producer.pauseProducing()


class Conversation:
    """One submit() driven by hand: the test plays the server line by line over a StringTransport."""

    def __init__(
        self,
        port: int = 25,
        credentials: Credentials | None = None,
        envelope: Envelope = ENVELOPE,
        message: bytes = MESSAGE,
        tls: TlsSettings | None = None,
        host: str = "localhost",
        open_only: bool = False,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.submitter = SmtpSubmitter(self.reactor, tls or TlsSettings(verify=False), timeout=TIMEOUT, helo_name="client.test")
        self.target = SmtpTarget(host, port)
        if open_only:  # a session without a message, as a pool would hold it
            self.result: Any = self.submitter.open_session(self.target, credentials)
        else:
            self.result = self.submitter.submit(self.target, credentials, envelope, message)
        self.transport = ScriptedTransport()
        self._read = 0
        self.protocol: Any = None

    def connect(self) -> None:
        """Complete the TCP connection the client asked the reactor for."""
        _host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.protocol = _build(factory, port)
        self.protocol.makeConnection(self.transport)

    def server(self, *lines: bytes) -> None:
        """The server sends these reply lines in one segment."""
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def sent(self) -> bytes:
        """What the client wrote since the last call."""
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return new

    def expect(self, *lines: bytes) -> None:
        """The client wrote exactly these command lines since the last check."""
        assert self.sent() == b"".join(line + b"\r\n" for line in lines)

    def dialogue(self, *steps: tuple[bytes, bytes]) -> None:
        """For each step the client sent exactly that command line, and the server answers one line."""
        for command, reply in steps:
            self.expect(command)
            self.server(reply)

    def handshake(self, certificate: X509 | None = None) -> None:
        """The TLS layer reports a completed handshake with ``certificate`` as the peer's."""
        self.transport.peer_certificate = certificate
        self.protocol.handshakeCompleted()

    def lose(self, reason: Any = None) -> None:
        """The connection goes away under the client."""
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def greet_and_ehlo(self, *ehlo: bytes) -> None:
        """Greeting, then the client's EHLO and the given EHLO reply."""
        self.connect()
        self.server(b"220 mail.test ESMTP")
        self.expect(b"EHLO " + HELO)
        self.server(*(ehlo or EHLO_PLAIN))


# --------------------------------------------------------------------------- in-memory pipe with real TLS


class PipeEnd:
    """One end of an in-memory connection; ``startTLS`` inserts a real TLSMemoryBIO layer."""

    def __init__(self, protocol: Any, is_client: bool, clock: Any) -> None:
        self.clock = clock  # the TLS layer batches small writes with callLater(0) on it
        self.protocol = protocol  # receives what arrives from the wire
        self._app = protocol
        self.is_client = is_client
        self.out = bytearray()
        self.tls: Any = None
        self.disconnecting = False
        self.aborted = False
        self.lost = False
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        if self.lost:
            return
        if self.tls is not None:
            self.tls.write(data)
        else:
            self.out += data

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            self.write(data)

    def loseConnection(self) -> None:
        if self.tls is not None:
            self.tls.loseConnection()
        else:
            self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = self.disconnecting = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 25 if self.is_client else 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000 if self.is_client else 25)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.tls is not None:
            self.tls.registerProducer(producer, streaming)
        else:
            self.producer = producer

    def unregisterProducer(self) -> None:
        if self.tls is not None:
            self.tls.unregisterProducer()
        else:
            self.producer = None

    def startTLS(self, creator: Any) -> None:
        factory = TLSMemoryBIOFactory(creator, self.is_client, None, clock=self.clock)  # type: ignore[arg-type]
        self.tls = factory.protocol(factory, self._app, False)
        self.protocol = self.tls
        self.tls.makeConnection(_RawSide(self))

    def getPeerCertificate(self) -> Any:
        return self.tls.getPeerCertificate()


class _RawSide:
    """The wire below a TLS layer started on a PipeEnd."""

    def __init__(self, end: PipeEnd) -> None:
        self._end = end

    def write(self, data: bytes) -> None:
        if not self._end.lost:
            self._end.out += data

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            self.write(data)

    def loseConnection(self) -> None:
        self._end.disconnecting = True

    def abortConnection(self) -> None:
        self._end.aborted = self._end.disconnecting = True

    def getPeer(self) -> IPv4Address:
        return self._end.getPeer()

    def getHost(self) -> IPv4Address:
        return self._end.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._end.producer = producer

    def unregisterProducer(self) -> None:
        self._end.producer = None


def pump(client: PipeEnd, server: PipeEnd, limit: int = 500) -> None:
    """Move bytes both ways until nothing moves; deliver connection loss once a side has closed."""
    for _ in range(limit):
        client.clock.advance(0)  # flush the TLS layers' batched writes
        moved = bool(client.out or server.out)
        for src, dst in ((client, server), (server, client)):
            if src.aborted:
                src.out.clear()
            if src.out and not dst.lost:
                data = bytes(src.out)
                src.out.clear()
                dst.protocol.dataReceived(data)
                moved = True
        for end, peer in ((client, server), (server, client)):
            if end.disconnecting and not end.out and not end.lost:
                end.lost = peer.lost = True
                end.protocol.connectionLost(Failure(ConnectionAborted() if end.aborted else ConnectionDone()))
                peer.protocol.connectionLost(Failure(ConnectionDone()))
                moved = True
        if not moved:
            return
    raise AssertionError("the in-memory connection did not settle")


class FakePostfix(LineReceiver):
    """A small postfix-like server: STARTTLS or implicit TLS, AUTH PLAIN/LOGIN, queue ids."""

    def __init__(
        self,
        tls: ServerTls | None,
        implicit: bool = False,
        mechanisms: bytes = b"PLAIN LOGIN",
        inject: bytes = b"",
    ) -> None:
        self.tls = tls
        self.implicit = implicit
        self.mechanisms = mechanisms
        self.inject = inject
        self.secured = False
        self.lines: list[bytes] = []
        self.messages: list[bytes] = []
        self.silent = False  # True: read commands, answer none (a server that hangs)
        self._data: list[bytes] | None = None
        self._login_step = 0
        self.authenticated: str | None = None

    def _transport(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        if self.implicit:
            assert self.tls is not None
            self._transport().startTLS(self.tls)
            self.secured = True
        self.sendLine(b"220 mail.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            self._data_line(line)
            return
        self.lines.append(line)
        if self.silent:
            return
        if self._login_step:
            self._login(line)
            return
        verb, _, rest = line.partition(b" ")
        handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None)
        if handler is None:
            self.sendLine(b"502 5.5.2 Error: command not recognized")
        else:
            handler(rest)

    def do_EHLO(self, rest: bytes) -> None:
        caps = [b"mail.test", b"PIPELINING", b"SIZE 10240000", b"8BITMIME"]
        if self.tls is not None and not self.secured:
            caps.append(b"STARTTLS")
        if self.secured or self.tls is None:
            caps.append(b"AUTH " + self.mechanisms)
        for cap in caps[:-1]:
            self.sendLine(b"250-" + cap)
        self.sendLine(b"250 " + caps[-1])

    def do_STARTTLS(self, rest: bytes) -> None:
        self.sendLine(b"220 2.0.0 Ready to start TLS")
        if self.inject:
            self._transport().write(self.inject)
        self._transport().startTLS(self.tls)
        self.secured = True

    def do_AUTH(self, rest: bytes) -> None:
        mechanism, _, initial = rest.partition(b" ")
        if mechanism.upper() == b"PLAIN":
            _, login, password = base64.b64decode(initial).split(b"\0")
            self._verdict(login, password)
        else:
            self._login_step = 1
            self.sendLine(b"334 VXNlcm5hbWU6")

    def _login(self, line: bytes) -> None:
        if self._login_step == 1:
            self._login_user = base64.b64decode(line)
            self._login_step = 2
            self.sendLine(b"334 UGFzc3dvcmQ6")
        else:
            self._login_step = 0
            self._verdict(self._login_user, base64.b64decode(line))

    def _verdict(self, login: bytes, password: bytes) -> None:
        if login == CREDENTIALS.login.encode() and password == PASSWORD.encode("utf-8"):
            self.authenticated = login.decode()
            self.sendLine(b"235 2.7.0 Authentication successful")
        else:
            self.sendLine(b"535 5.7.8 Error: authentication failed: authentication failure")

    def do_MAIL(self, rest: bytes) -> None:
        self.sendLine(b"250 2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        self.sendLine(b"250 2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        self._data = []
        self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            self.messages.append(b"".join(part + b"\r\n" for part in self._data or []))
            self._data = None
            self.sendLine(b"250 2.0.0 Ok: queued as 4AbCdE%d" % len(self.messages))
            return
        assert self._data is not None
        self._data.append(line[1:] if line.startswith(b".") else line)

    def do_RSET(self, rest: bytes) -> None:
        self.sendLine(b"250 2.0.0 Ok")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendLine(b"221 2.0.0 Bye")
        self._transport().loseConnection()


def _build(factory: Any, port: int) -> Any:
    """The protocol the client's connection factory builds for a connection to ``port``."""
    return factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))


def connect_pipe(reactor: MemoryReactorClock, server: FakePostfix) -> tuple[PipeEnd, PipeEnd]:
    """Connect the client's pending TCP attempt to ``server`` over an in-memory pipe."""
    _host, port, factory, _timeout, _bind = reactor.tcpClients[-1]
    client_protocol = _build(factory, port)
    client, server_end = PipeEnd(client_protocol, True, reactor), PipeEnd(server, False, reactor)
    server.makeConnection(server_end)
    client_protocol.makeConnection(client)
    return client, server_end
