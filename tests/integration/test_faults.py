"""Faults around a real ``twistd smtpapi``: a scripted SMTP server on loopback that misbehaves on cue,
a private MariaDB that is stopped, restarted and slowed down, and HTTP clients that hang up.

Each fault gets a coded answer within a bounded time, nothing is sent twice on the service's own
initiative, no credential leaks into an answer or the log, and the service recovers without a
restart. The SMTP faults run against ``FaultServer`` (threads, Python's ssl module), which counts
connections, transactions and received messages, so "sent" and "delivered" are measured, not assumed.
"""

from __future__ import annotations

import base64
import datetime
import email.policy
import http.client
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pymysql  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailcow_smtp_api.core.schema import MARIADB_TABLES
from tests.twisted.smtp_kit import Pki

from .conftest import API_KEY, HOST, PASSWORD, SENDER, SUBMISSION_PORT, Sidecar, Testbed, free_port

pytestmark = pytest.mark.integration

HTTP_TIMEOUT = 30.0
PHASES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "message")
REPLY_CODES = (421, 451, 452, 554)


def secrets_of(login: str = SENDER, password: str = PASSWORD, key: str = API_KEY) -> tuple[str, ...]:
    """Every form in which these credentials could leak: as given, AUTH PLAIN and AUTH LOGIN blobs."""
    return (
        password,
        key,
        base64.b64encode(f"\0{login}\0{password}".encode()).decode(),
        base64.b64encode(password.encode()).decode(),
    )


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one server certificate and its key."""

    cert: Path
    key: Path


def _issue_expired(pki: Pki) -> tuple[Any, x509.Certificate]:
    """A certificate for localhost/127.0.0.1 from the test CA whose validity ended yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(pki.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(pki.ca_key, hashes.SHA256())
    )
    return key, cert


@dataclass
class Certificates:
    """A throwaway CA (trusted by the service through --smtp-ca) and server certificates to present."""

    ca: Path
    good: CertFiles
    wrong_name: CertFiles
    no_san: CertFiles
    expired: CertFiles
    untrusted: CertFiles


def write_certificates(directory: Path) -> Certificates:
    """Write the CA bundle and each server certificate with its key under ``directory``."""
    pki = Pki()
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, pair: tuple[Any, x509.Certificate]) -> CertFiles:
        key, cert = pair
        files = CertFiles(directory / f"{name}.pem", directory / f"{name}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return files

    ca = directory / "ca.pem"
    ca.write_bytes(Pki.pem(pki.ca))
    return Certificates(
        ca=ca,
        good=write("good", pki.good),
        wrong_name=write("wrong-name", pki.wrong_name),
        no_san=write("no-san", pki.no_san),
        expired=write("expired", _issue_expired(pki)),
        untrusted=write("untrusted", pki.untrusted),
    )


def server_context(files: CertFiles) -> ssl.SSLContext:
    """A server-side TLS context presenting ``files``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """One PKI for the module."""
    return write_certificates(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------- the fault server


@dataclass
class Fault:
    """What the server does wrong, and where.

    ``action``: ``reply`` (answer ``reply`` instead of the normal line), ``hang`` (say nothing until
    the client leaves), ``drop`` (close the connection), ``inject`` (send ``reply`` right behind the
    normal line, in the same segment), ``no-starttls`` (EHLO without STARTTLS), ``delay`` (wait
    ``seconds`` before the normal line). ``phase`` ``mid-data`` drops after the first message line;
    ``tls`` hangs instead of starting the handshake after ``220`` to STARTTLS. ``echo`` answers
    ``reply`` followed by every AUTH line received; ``mechanisms`` offers ``reply`` as the AUTH list.
    """

    phase: str = "none"
    action: str = "reply"
    reply: bytes = b""
    seconds: float = 0.0
    times: int = -1  # how often the fault fires; -1: every time


class _Line:
    """A line-oriented view of one connection whose socket may be swapped for a TLS one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def readline(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data if data.endswith(b"\r\n") else data + b"\r\n")

    def start_tls(self, context: ssl.SSLContext) -> None:
        # RFC 3207 4.2: nothing received before the handshake is kept.
        self.buffer = b""
        self.sock = context.wrap_socket(self.sock, server_side=True)


@dataclass
class Counts:
    """What the server saw since the last reset."""

    connections: int = 0
    ehlos: int = 0
    auth_lines: list[bytes] = field(default_factory=list)
    mail_commands: int = 0
    rcpt_commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    quits: int = 0
    active: int = 0
    most_active: int = 0


class FaultServer:
    """A scripted ESMTP server on 127.0.0.1: STARTTLS (or implicit TLS), AUTH PLAIN/LOGIN, one fault."""

    def __init__(self, context: ssl.SSLContext | None, implicit: bool = False) -> None:
        self.context = context
        self.implicit = implicit
        self.fault = Fault()
        self.counts = Counts()
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(256)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._lines: list[_Line] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def reset(self, fault: Fault | None = None, context: ssl.SSLContext | None = None) -> None:
        """Set the next fault (and certificate), and zero the counts."""
        with self.lock:
            self.fault = fault or Fault()
            if context is not None:
                self.context = context
            self.counts = Counts()

    def close(self) -> None:
        """Stop accepting, end every hang, and wait (bounded) for the handlers."""
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self.lock:
            lines = list(self._lines)
        for line in lines:  # sessions a client keeps open (pooled) end now, TLS or not
            try:
                line.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            with self.lock:
                self.counts.connections += 1
            thread = threading.Thread(target=self._handle, args=(sock,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _hang(self, line: _Line) -> None:
        """Say nothing until the client gives up (or the server stops)."""
        line.sock.settimeout(0.2)
        deadline = time.monotonic() + 60
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                if not line.sock.recv(65536):
                    return
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return

    def _act(self, phase: str, line: _Line, normal: bytes) -> str:
        """Answer ``normal`` or the fault for ``phase``: 'normal', 'replaced' or 'ended'."""
        fault = self.fault
        with self.lock:
            fires = fault.phase == phase and fault.times != 0
            if fires and fault.times > 0:
                fault.times -= 1
        if not fires:
            line.send(normal)
            return "normal"
        if fault.action == "hang":
            self._hang(line)
            return "ended"
        if fault.action == "drop":
            return "ended"
        if fault.action == "inject":
            line.sock.sendall(normal + b"\r\n" + fault.reply)
            return "normal"
        if fault.action == "delay":
            time.sleep(fault.seconds)
            line.send(normal)
            return "normal"
        if fault.action == "echo":
            # A server that quotes what the client sent it, AUTH included, in its error reply.
            with self.lock:
                quoted = b" / ".join(self.counts.auth_lines)
            line.send(fault.reply + b" " + quoted)
            return "replaced"
        line.send(fault.reply)
        return "replaced"

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        line = _Line(sock)
        counts = self.counts
        with self.lock:
            # Kept until its handler ends: a socket's fileno says nothing while its TLS handshake runs
            # (the plain socket is already detached then), so it cannot tell which lines are done.
            self._lines.append(line)
            counts.active += 1
            counts.most_active = max(counts.most_active, counts.active)
        try:
            self._session(line)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with self.lock:
                counts.active -= 1
                self._lines.remove(line)
            try:
                line.sock.close()
            except OSError:
                pass

    def _session(self, line: _Line) -> None:
        secured = False
        if self.implicit:
            assert self.context is not None
            line.start_tls(self.context)
            secured = True
        if self._act("greeting", line, b"220 fault.test ESMTP") == "ended":
            return
        while True:
            command = line.readline()
            if command is None:
                return
            verb = command.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                with self.lock:
                    self.counts.ehlos += 1
                caps = [b"fault.test", b"PIPELINING", b"SIZE 10240000", b"8BITMIME"]
                if self.context is not None and not secured and self.fault.action != "no-starttls":
                    caps.append(b"STARTTLS")
                if secured or self.context is None:
                    caps.append(b"AUTH " + (self.fault.reply if self.fault.action == "mechanisms" else b"PLAIN LOGIN"))
                reply = b"\r\n".join(b"250-" + c for c in caps[:-1]) + b"\r\n250 " + caps[-1]
                if self._act("ehlo" if not secured or self.implicit else "ehlo-again", line, reply) == "ended":
                    return
            elif verb == b"STARTTLS":
                if self.fault.phase == "tls":
                    line.send(b"220 2.0.0 Ready to start TLS")
                    self._hang(line)
                    return
                outcome = self._act("starttls", line, b"220 2.0.0 Ready to start TLS")
                if outcome == "ended":
                    return
                if outcome == "normal":
                    assert self.context is not None
                    line.start_tls(self.context)
                    secured = True
            elif verb == b"AUTH":
                with self.lock:
                    self.counts.auth_lines.append(command)
                if command.upper().startswith(b"AUTH LOGIN"):
                    for prompt in (b"334 VXNlcm5hbWU6", b"334 UGFzc3dvcmQ6"):
                        line.send(prompt)
                        answer = line.readline()
                        if answer is None:
                            return
                        with self.lock:
                            self.counts.auth_lines.append(answer)
                if self._act("auth", line, b"235 2.7.0 Authentication successful") == "ended":
                    return
            elif verb == b"MAIL":
                with self.lock:
                    self.counts.mail_commands += 1
                if self._act("mail", line, b"250 2.1.0 Ok") == "ended":
                    return
            elif verb == b"RCPT":
                with self.lock:
                    self.counts.rcpt_commands.append(command)
                if self._act("rcpt", line, b"250 2.1.5 Ok") == "ended":
                    return
            elif verb == b"DATA":
                outcome = self._act("data", line, b"354 End data with <CR><LF>.<CR><LF>")
                if outcome == "ended":
                    return
                if outcome == "normal" and not self._data(line):
                    return
            elif verb in (b"RSET", b"NOOP"):
                line.send(b"250 2.0.0 Ok")
            elif verb == b"QUIT":
                with self.lock:
                    self.counts.quits += 1
                line.send(b"221 2.0.0 Bye")
                return
            else:
                line.send(b"502 5.5.2 Error: command not recognized")

    def _data(self, line: _Line) -> bool:
        """Read the message up to the lone dot; answer the final reply. False when the connection ended."""
        lines: list[bytes] = []
        while True:
            text = line.readline()
            if text is None:
                return False
            if self.fault.phase == "mid-data":
                return False
            if text == b".":
                break
            lines.append(text[1:] if text.startswith(b".") else text)
        with self.lock:
            self.counts.messages.append(b"".join(part + b"\r\n" for part in lines))
            number = len(self.counts.messages)
        return self._act("message", line, b"250 2.0.0 Ok: queued as FAULT%d" % number) != "ended"


# --------------------------------------------------------------------------- HTTP


@dataclass
class Reply:
    """One HTTP answer of the service."""

    status: int
    body: Any
    headers: dict[str, str]
    raw: bytes

    @property
    def code(self) -> Any:
        """The error code (``msg``) or the success tuple's first item."""
        if isinstance(self.body, list) and self.body:
            msg = self.body[0].get("msg")
            return msg[0] if isinstance(msg, list) else msg
        return self.body.get("msg") if isinstance(self.body, dict) else None

    @property
    def detail(self) -> dict[str, Any]:
        """The error's ``detail`` object ({} when there is none)."""
        if isinstance(self.body, list) and self.body:
            return dict(self.body[0].get("detail") or {})
        return {}


def send(url: str, body: Any, key: str = API_KEY, timeout: float = HTTP_TIMEOUT, headers: dict[str, str] | None = None) -> Reply:
    """POST one request with http.client (a new connection each time); bounded by ``timeout``."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        connection.request(
            "POST",
            "/api/v1/send/email",
            body=data,
            headers={"Content-Type": "application/json", "X-API-Key": key, **(headers or {})},
        )
        response = connection.getresponse()
        raw = response.read()
        return Reply(response.status, json.loads(raw), {k.lower(): v for k, v in response.getheaders()}, raw)
    finally:
        connection.close()


def message(token: str = "", **changes: Any) -> dict[str, Any]:
    """A valid request from SENDER whose subject carries ``token``."""
    body: dict[str, Any] = {
        "from": SENDER,
        "to": ["recipient@example.net"],
        "subject": f"fault test {token}".strip(),
        "body": "Hello from the fault tests.\n.\nStill here.\n",
        "password": PASSWORD,
    }
    body.update(changes)
    return body


def assert_no_secret(texts: list[str], secret_values: tuple[str, ...] = secrets_of()) -> None:
    """None of the credentials, in any encoding, appears in ``texts``."""
    joined = "\n".join(texts)
    for secret in secret_values:
        assert secret not in joined, f"a credential leaked: {secret[:3]}..."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def starttls_server(certificates: Certificates) -> Iterator[FaultServer]:
    """One scripted STARTTLS server presenting the good certificate, standing in for postfix."""
    server = FaultServer(server_context(certificates.good))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fault_servers(certificates: Certificates) -> Iterator[tuple[FaultServer, FaultServer]]:
    """A STARTTLS fault server and an implicit-TLS one, both presenting the good certificate."""
    starttls = FaultServer(server_context(certificates.good))
    implicit = FaultServer(server_context(certificates.good), implicit=True)
    try:
        yield starttls, implicit
    finally:
        starttls.close()
        implicit.close()


def fault_sidecar(
    sidecar: Callable[..., Sidecar], certificates: Certificates, servers: tuple[FaultServer, FaultServer], *extra: str
) -> Sidecar:
    """A service that may submit to both fault servers and trusts the test CA."""
    starttls, implicit = servers
    allow = f"{HOST}:{SUBMISSION_PORT},{HOST}:{starttls.port},{HOST}:{implicit.port}/tls"
    return sidecar("--smtp-allow", allow, "--smtp-ca", str(certificates.ca), *extra)


def fresh_sidecar(
    sidecar: Callable[..., Sidecar], certificates: Certificates, servers: tuple[FaultServer, FaultServer], *extra: str
) -> Sidecar:
    """``fault_sidecar`` with session reuse off: every request meets the fault on a new connection."""
    return fault_sidecar(sidecar, certificates, servers, "--smtp-pool-size", "0", *extra)


def expected_for_reply(phase: str, code: int) -> tuple[int, str]:
    """The documented answer to an SMTP error reply (README error table)."""
    if phase == "auth" and code >= 500:
        return 403, "smtp_auth_failed"
    if code >= 500:
        return 502, "smtp_error"
    return 503, "smtp_error"


# --------------------------------------------------------------------------- SMTP faults


def test_error_replies_at_every_phase(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """421/451/452/554 at each phase: the documented status and code, the phase and reply in detail,
    Retry-After on 4xx, one connection per request (no resend), and the service then sends normally."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "5")
    server = fault_servers[0]
    texts: list[str] = []
    tried = 0
    for phase in PHASES:
        for code in REPLY_CODES:
            server.reset(Fault(phase, "reply", b"%d 4.3.0 fault %s" % (code, phase.encode())))
            answer = send(service.url, message(smtp_port=server.port))
            tried += 1
            texts.append(answer.raw.decode())
            want_status, want_code = expected_for_reply(phase, code)
            where = f"{code} at {phase}"
            assert (answer.status, answer.code) == (want_status, want_code), where
            assert answer.detail.get("phase") == phase and answer.detail.get("smtp_code") == code, where
            if want_status == 503:
                assert int(answer.headers["retry-after"]) > 0, where
            assert server.counts.connections == 1, where
            assert server.counts.mail_commands <= 1, where
            assert len(server.counts.messages) == (1 if phase == "message" else 0), where
    time.sleep(0.3)  # a resend would have connected again by now
    assert server.counts.connections == 1
    server.reset()
    answer = send(service.url, message("after faults", smtp_port=server.port))
    assert answer.status == 200, answer.body
    assert len(server.counts.messages) == 1
    assert tried == len(PHASES) * len(REPLY_CODES)
    assert_no_secret(texts + [service.log_text()])


HANG_PHASES = ("greeting", "ehlo", "starttls", "tls", "auth", "mail", "rcpt", "data", "message")


def test_hangs_time_out_with_504_and_no_resend(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """A server that goes silent after connect, at each step, or after the final dot: 504 within the
    timeout; after the dot the answer says the outcome is unknown; the message is never sent twice."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "1")
    server = fault_servers[0]
    for phase in HANG_PHASES:
        server.reset(Fault(phase, "hang"))
        started = time.monotonic()
        answer = send(service.url, message(smtp_port=server.port))
        elapsed = time.monotonic() - started
        assert (answer.status, answer.code) == (504, "smtp_error"), phase
        assert answer.detail["phase"] == phase and answer.detail["kind"] == "timeout", phase
        assert bool(answer.detail.get("outcome_unknown")) == (phase == "message"), phase
        assert elapsed < 8, phase
        time.sleep(0.2)
        assert server.counts.connections == 1, phase
        assert len(server.counts.messages) == (1 if phase == "message" else 0), phase
    server.reset()
    assert send(service.url, message(smtp_port=server.port)).status == 200
    assert_no_secret([service.log_text()])


BIG = base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()
DROP_PHASES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "mid-data", "message")


def test_dropped_connections_are_coded_and_not_resent(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """The server closes the connection at each step, mid-DATA, or right after the final dot: before
    the dot 503 (retry is safe), after it 504 with outcome_unknown; one connection each time."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "5")
    server = fault_servers[0]
    for phase in DROP_PHASES:
        server.reset(Fault(phase, "drop"))
        # Mid-DATA needs a message larger than the socket buffers, so the client is still writing.
        extra = {"attachments": [{"filename": "big.bin", "content": BIG}]} if phase == "mid-data" else {}
        answer = send(service.url, message(smtp_port=server.port, **extra))
        if phase == "mid-data":
            assert answer.detail["phase"] == "data" and not answer.detail.get("outcome_unknown")
        if phase == "message":
            assert (answer.status, answer.code) == (504, "smtp_error")
            assert answer.detail["outcome_unknown"] is True
        else:
            assert (answer.status, answer.code) == (503, "smtp_error"), phase
            assert answer.detail["kind"] in ("dropped", "tls"), phase
            assert int(answer.headers["retry-after"]) > 0, phase
        time.sleep(0.2)
        assert server.counts.connections == 1, phase
        assert server.counts.mail_commands <= 1, phase
    server.reset()
    assert send(service.url, message(smtp_port=server.port)).status == 200
    assert_no_secret([service.log_text()])


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_bad_certificates_stop_before_any_credential(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    certificates: Certificates,
    fault_servers: tuple[FaultServer, FaultServer],
    implicit: bool,
) -> None:
    """A certificate for another name, without subjectAltName, expired, or from an unknown CA:
    502 smtp_error kind tls, and not one AUTH or MAIL command reaches the server."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "5")
    server = fault_servers[1] if implicit else fault_servers[0]
    texts = []
    for name in ("wrong_name", "no_san", "expired", "untrusted"):
        server.reset(context=server_context(getattr(certificates, name)))
        answer = send(service.url, message(smtp_port=server.port))
        texts.append(answer.raw.decode())
        assert (answer.status, answer.code) == (502, "smtp_error"), name
        assert answer.detail["kind"] == "tls", name
        assert server.counts.auth_lines == [] and server.counts.mail_commands == 0, name
        assert server.counts.connections == 1, name
    server.reset(context=server_context(certificates.good))
    answer = send(service.url, message(smtp_port=server.port))
    assert answer.status == 200, answer.body
    assert len(server.counts.auth_lines) == 1
    assert_no_secret(texts + [service.log_text()])


def test_starttls_injection_and_downgrade(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """Plaintext lines sent together with '220 Ready' are discarded (RFC 3207 4.2): the session goes on
    with the real post-TLS EHLO and the message is sent once. A reply injected before the 220, or a
    server that stops offering STARTTLS, ends the session with 502 and no credential sent."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "5")
    server = fault_servers[0]
    injected = b"250-fault.test\r\n250 AUTH PLAIN\r\n535 5.7.8 injected failure\r\n"
    server.reset(Fault("starttls", "inject", injected))
    answer = send(service.url, message("injected", smtp_port=server.port))
    assert answer.status == 200, answer.body
    assert server.counts.ehlos == 2 and len(server.counts.messages) == 1
    assert server.counts.rcpt_commands == [b"RCPT TO:<recipient@example.net>"]

    server.reset(Fault("starttls", "reply", b"250 2.0.0 injected\r\n220 2.0.0 Ready to start TLS"))
    answer = send(service.url, message(smtp_port=server.port))
    assert (answer.status, answer.code) == (502, "smtp_error")
    assert server.counts.auth_lines == [] and server.counts.mail_commands == 0

    server.reset(Fault("capabilities", "no-starttls"))
    answer = send(service.url, message(smtp_port=server.port))
    assert (answer.status, answer.code) == (502, "smtp_error")
    assert answer.detail["kind"] == "tls"
    assert server.counts.auth_lines == [] and server.counts.mail_commands == 0
    assert_no_secret([service.log_text()])


def test_postfix_down_then_back(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """postfix stopped: 503 smtp_error with Retry-After and nothing queued; started again: the next
    request is delivered without restarting the service."""
    service = sidecar("--smtp-timeout", "10")
    bed.stop_postfix()
    try:
        answer = send(service.url, message("while down", smtp_port=SUBMISSION_PORT))
        assert (answer.status, answer.code) == (503, "smtp_error")
        assert answer.detail["phase"] == "connect"
        assert int(answer.headers["retry-after"]) > 0
    finally:
        bed.start_postfix()
    answer = send(service.url, message("after restart", smtp_port=SUBMISSION_PORT))
    assert answer.status == 200, answer.body
    (delivered,) = bed.wait_for_messages(1)
    assert delivered.message["Subject"] == "fault test after restart"


def test_a_burst_of_requests_is_bounded_to_twenty_smtp_sessions(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """60 concurrent requests against a slow server with --smtp-max-connections 20: at most 20 SMTP
    sessions at once (the others wait), and every request is delivered exactly once."""
    service = fault_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "20", "--smtp-max-connections", "20")
    server = fault_servers[0]
    server.reset(Fault("message", "delay", seconds=0.3))
    answers: list[Reply] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        answer = send(service.url, message(f"tok-{number:04x}", smtp_port=server.port), timeout=60)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert [a.status for a in answers] == [200] * 60
    assert 2 <= server.counts.most_active <= 20
    assert sorted(_token_counts(server.counts.messages).values()) == [1] * 60


def test_reused_sessions_retry_only_before_the_data(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """With session reuse on: a pooled session the server answers 421 or drops before DATA is replaced
    once by a new session and the message arrives once; a pooled session lost after the final dot is
    never retried (504, outcome unknown), so the message is never duplicated."""
    service = fault_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "5", "--smtp-pool-size", "4")
    server = fault_servers[0]
    server.reset()
    assert send(service.url, message("opens", smtp_port=server.port)).status == 200
    for phase, fault in (("mail", Fault("mail", "reply", b"421 4.4.2 closing", times=1)),
                         ("rcpt", Fault("rcpt", "drop", times=1))):
        server.reset(fault)
        answer = send(service.url, message(f"tok-{phase}", smtp_port=server.port))
        assert answer.status == 200, (phase, answer.body)
        assert server.counts.connections == 1, phase  # one new session replaced the pooled one
        assert server.counts.mail_commands == 2, phase
        assert _token_counts(server.counts.messages) == {f"tok-{phase}": 1}, phase
    server.reset(Fault("message", "drop", times=1))
    answer = send(service.url, message("tok-dot", smtp_port=server.port))
    assert (answer.status, answer.code) == (504, "smtp_error")
    assert answer.detail["outcome_unknown"] is True
    time.sleep(0.3)
    assert server.counts.connections == 0 and server.counts.mail_commands == 1
    assert _token_counts(server.counts.messages) == {"tok-dot": 1}


# --------------------------------------------------------------------------- client disconnect


def test_client_disconnect_mid_request_completes_the_transaction(
    bed: Testbed, sidecar: Callable[..., Sidecar], certificates: Certificates, fault_servers: tuple[FaultServer, FaultServer]
) -> None:
    """The HTTP client hangs up while the message is being submitted: the SMTP transaction still ends
    properly (message accepted, QUIT), and the outcome is logged under the request's id."""
    service = fresh_sidecar(sidecar, certificates, fault_servers, "--smtp-timeout", "10")
    server = fault_servers[0]
    server.reset(Fault("message", "delay", seconds=1.5))
    body = json.dumps(message("disconnect", smtp_port=server.port)).encode()
    client = socket.create_connection((HOST, service.port), timeout=10)
    client.sendall(
        b"POST /api/v1/send/email HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    deadline = time.monotonic() + 10
    while server.counts.mail_commands == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.counts.mail_commands == 1
    client.close()  # gone before the server's reply to the final dot
    deadline = time.monotonic() + 10
    while server.counts.quits == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.counts.messages) == 1 and server.counts.quits == 1
    delivered = BytesParser(policy=email.policy.default).parsebytes(server.counts.messages[0])
    request_id = str(delivered["X-Request-Id"])
    assert re.fullmatch(r"[0-9a-f]{16}", request_id)
    deadline = time.monotonic() + 5
    while f"send {request_id}" not in service.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(text for text in service.log_text().splitlines() if f"send {request_id}" in text)
    assert "status=200" in line and "code=smtp_mail_sent" in line and "queue_id=FAULT1" in line
    assert server.counts.connections == 1


# --------------------------------------------------------------------------- a private MariaDB


class PrivateMariaDB:
    """A mariadbd of its own on a free loopback port, data under a temporary folder, run as mysql.

    The shared server on 3306 serves every other test and is never touched; this one can be stopped,
    restarted and locked at will. Rows are added through a ``Testbed`` bound to it (``rows``).
    """

    DATABASE = "mailcow"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The service's ``--db`` value."""
        return f"mysql://root@{HOST}:{self.port}/{self.DATABASE}"

    def install(self) -> None:
        """Create the data folder (about a second) and owner it to mysql."""
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "mysql:mysql", str(self.directory)], check=True, timeout=10)
        result = subprocess.run(
            ["mariadb-install-db", "--user=mysql", f"--datadir={self.directory / 'db'}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def start(self, timeout: float = 15.0) -> None:
        """Start mariadbd and wait (bounded) until it answers."""
        with open(self.directory / "mariadbd.log", "ab") as log:
            self.process = subprocess.Popen(
                ["mariadbd", "--user=mysql", f"--datadir={self.directory / 'db'}",
                 f"--socket={self.directory / 'mysqld.sock'}", f"--pid-file={self.directory / 'mysqld.pid'}",
                 f"--bind-address={HOST}", f"--port={self.port}", "--skip-name-resolve", "--skip-log-bin",
                 "--innodb-buffer-pool-size=16M", f"--log-error={self.directory / 'error.log'}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                pymysql.connect(host=HOST, port=self.port, user="root", connect_timeout=1).close()
                return
            except pymysql.MySQLError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the private mariadbd did not start:\n" + self.error_tail()) from None
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server (SIGKILL after ``timeout``) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def error_tail(self) -> str:
        """The last lines of the server's error log."""
        try:
            return "\n".join((self.directory / "error.log").read_text(errors="replace").splitlines()[-20:])
        except FileNotFoundError:
            return ""

    def create_schema(self) -> None:
        """mailcow's tables in database ``mailcow``."""
        with pymysql.connect(host=HOST, port=self.port, user="root", autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{self.DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
            cursor.execute(f"USE `{self.DATABASE}`")
            for statement in MARIADB_TABLES:
                cursor.execute(statement)
            cursor.execute("INSERT INTO versions (application, version) VALUES ('db_schema', '19022026_1220')")

    def rows(self, directory: Path) -> Testbed:
        """A ``Testbed`` whose row helpers write to this server."""
        return PrivateRows(directory=directory, database=self.DATABASE, port=self.port)

    def connect(self) -> Any:
        """A new autocommit connection to the database."""
        return pymysql.connect(host=HOST, port=self.port, user="root", database=self.DATABASE, autocommit=True,
                               connect_timeout=5, read_timeout=30)


@dataclass
class PrivateRows(Testbed):
    """The bed's row helpers, pointed at a private MariaDB."""

    __test__ = False
    port: int = 0

    def connect(self, database: bool = True) -> Any:
        """A connection to the private server."""
        return pymysql.connect(host=HOST, port=self.port, user="root", database=self.database if database else None,
                               charset="utf8mb4", autocommit=True, connect_timeout=5, read_timeout=30)


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[PrivateMariaDB]:
    """A running private MariaDB with mailcow's schema; stopped and removed afterwards."""
    server = PrivateMariaDB(Path(f"/tmp/smtpapi-private-mariadb-{secrets.token_hex(4)}"))
    try:
        server.install()
        server.start()
        server.create_schema()
        yield server
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(server.directory)], check=False, timeout=30)


def _token_counts(messages: list[bytes]) -> dict[str, int]:
    found: dict[str, int] = {}
    for raw in messages:
        match = re.search(rb"Subject: fault test (tok-[0-9a-z]+)", raw)
        if match:
            token = match.group(1).decode()
            found[token] = found.get(token, 0) + 1
    return found


def test_mariadb_stopped_and_restarted_mid_load(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    certificates: Certificates,
    fault_servers: tuple[FaultServer, FaultServer],
    private_mariadb: PrivateMariaDB,
    tmp_path: Path,
) -> None:
    """Clients keep sending while mailcow's database stops and comes back: answers are 200 or 503
    smtp_db_unavailable (within the 5 s database timeout), every 200 is one message and every 503
    none, and sending resumes without restarting the service."""
    rows = private_mariadb.rows(tmp_path)
    rows.add_domain("example.com")
    rows.add_mailbox(SENDER, PASSWORD)
    rows.add_api_key(API_KEY, allow_from="127.0.0.1")
    server = fault_servers[0]
    # No cached key rows or sender decisions: every request asks the database.
    service = fault_sidecar(
        sidecar, certificates, fault_servers, "--db", private_mariadb.url, "--smtp-timeout", "5", "--db-cache-ttl", "0"
    )
    server.reset()
    results: list[tuple[str, int, Any, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        for _ in range(400):  # bounded; normally ended by ``stop``
            if stop.is_set():
                return
            token = f"tok-{secrets.token_hex(6)}"
            started = time.monotonic()
            try:
                answer = send(service.url, message(token, smtp_port=server.port), timeout=20)
                outcome: tuple[str, int, Any, float] = (token, answer.status, answer.code, time.monotonic() - started)
            except OSError as exc:
                outcome = (token, 0, type(exc).__name__, time.monotonic() - started)
            with lock:
                results.append(outcome)
            time.sleep(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    private_mariadb.stop()
    down_at = len(results)
    time.sleep(3.0)
    private_mariadb.start()
    up_at = len(results)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            recent = [status for _, status, _, _ in results[up_at:]]
        if recent.count(200) >= 8:
            break
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(30)
    statuses = [status for _, status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert all(code == "smtp_db_unavailable" for _, status, code, _ in results if status == 503)
    assert 503 in statuses[down_at:up_at + 4], "no request noticed the database going away"
    assert statuses[up_at:].count(200) >= 8, "sending did not resume after the restart"
    assert max(seconds for _, status, _, seconds in results if status == 503) < 10
    time.sleep(0.5)
    delivered = _token_counts(server.counts.messages)
    ok = {token for token, status, _, _ in results if status == 200}
    assert set(delivered) == ok and set(delivered.values()) == {1}
    assert_no_secret([service.log_text()])


def test_slow_queries_answer_503_then_recover(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    certificates: Certificates,
    fault_servers: tuple[FaultServer, FaultServer],
    private_mariadb: PrivateMariaDB,
    tmp_path: Path,
) -> None:
    """A query that does not return (the api table write-locked by another session) is answered 503
    smtp_db_unavailable within the database timeout; once the lock goes, requests succeed again."""
    rows = private_mariadb.rows(tmp_path)
    rows.add_domain("example.com")
    rows.add_mailbox(SENDER, PASSWORD)
    rows.add_api_key(API_KEY, allow_from="127.0.0.1")
    server = fault_servers[0]
    service = fault_sidecar(sidecar, certificates, fault_servers, "--db", private_mariadb.url, "--db-cache-ttl", "0")
    server.reset()
    assert send(service.url, message(smtp_port=server.port)).status == 200
    locker = private_mariadb.connect()
    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLES api WRITE, mailbox WRITE, alias WRITE")
        started = time.monotonic()
        answer = send(service.url, message(smtp_port=server.port))
        elapsed = time.monotonic() - started
        assert (answer.status, answer.code) == (503, "smtp_db_unavailable")
        assert int(answer.headers["retry-after"]) > 0
        assert 3 < elapsed < 10
    finally:
        with locker.cursor() as cursor:
            cursor.execute("UNLOCK TABLES")
        locker.close()
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status = send(service.url, message(smtp_port=server.port)).status
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200
    assert len(server.counts.messages) == 2
