"""Webhooks over real sockets: the dispatcher on the real reactor, its queue in a real SQLite file, and
a receiver on 127.0.0.1 (the standard library's HTTP server in a thread, plain or with TLS).

The receiver checks each signature as a receiver would (HMAC-SHA256 over "id.timestamp.body", and
with the standardwebhooks library when it is installed). Each test waits for an outcome with a
deadline and counts the requests the receiver saw.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization

from mailcow_smtp_api.core.webhooks import new_event
from mailcow_smtp_api.state.store import open_state_runner
from mailcow_smtp_api.state.webhooks import QueuedEvent, WebhookStore
from mailcow_smtp_api.web.webhooks import WebhookDispatcher, webhook_client
from tests.twisted.smtp_kit import Pki

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
SECRET = "integration-webhook-secret"
DEADLINE = 30.0  # no single test waits longer than this for an outcome
FIRST_RETRY = 5.0  # retry_delay(1) with the jitter at its lowest


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class LowJitter:
    """The jitter at its lowest: the first retry comes 5 s after the first attempt."""

    def random(self) -> float:
        return 0.0


@dataclass
class Request:
    """One request as the receiver read it, with whether its signature verified."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    signature_ok: bool


@dataclass
class Receiver:
    """A scripted HTTP(S) receiver on 127.0.0.1: each request gets the next answer (status, delay)."""

    script: list[tuple[int, float]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    handshake_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def next_answer(self) -> tuple[int, float]:
        with self.lock:
            return self.script.pop(0) if self.script else (200, 0.0)


def signature_ok(headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification with the secret's UTF-8 bytes as the key."""
    signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(headers.get("webhook-signature", ""), expected)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.requests.append(Request(self.path, headers, body, time.time(), signature_ok(headers, body)))
            status, delay = receiver.next_answer()
            time.sleep(delay)
            answer = b'{"ok":true}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None
    receiver: Receiver

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                with self.receiver.lock:
                    self.receiver.handshake_failures += 1
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) leaves a broken pipe behind


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start receivers on 127.0.0.1 (plain, or with TLS from a certificate file); stop them afterwards."""
    started: list[_Server] = []

    def start(*script: tuple[int, float], tls: ssl.SSLContext | None = None) -> Receiver:
        receiver = Receiver(script=list(script))
        server = _Server((HOST, 0), _handler(receiver))
        server.tls, server.receiver, receiver.server = tls, receiver, server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return receiver

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def server_tls(pki: Pki, pair: Any, folder: Path) -> ssl.SSLContext:
    """A server context presenting ``pair`` (key, certificate)."""
    key, cert = pair
    (folder / "cert.pem").write_bytes(Pki.pem(cert))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@dataclass
class Bed:
    """A queue in a SQLite file and a dispatcher for one URL, on the real reactor."""

    store: WebhookStore
    dispatcher: WebhookDispatcher

    async def row(self, event_id: str) -> QueuedEvent:
        found = await self.store.event(event_id)
        assert found is not None
        return found

    async def until(self, event_id: str, done: Any, what: str) -> QueuedEvent:
        """The event's row once ``done(row)`` holds; fails after DEADLINE seconds."""
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + DEADLINE
        while True:
            row = await self.row(event_id)
            if done(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {DEADLINE} s; the row is {row}")
            await deferLater(_reactor(), 0.05, lambda: None)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Any]:
    """Make a Bed for a URL and start its dispatcher; stop and close everything afterwards."""
    made: list[Bed] = []

    def make(url: str, *, timeout: float = 5.0, ca_file: str | None = None) -> Bed:
        reactor = _reactor()
        store = WebhookStore(open_state_runner(f"sqlite:{tmp_path / f'state{len(made)}.sqlite'}", reactor))
        dispatcher = WebhookDispatcher(
            store, url, SECRET, reactor, webhook_client(reactor, ca_file=ca_file), timeout,
            interval=0.2, rng=LowJitter(),
        )
        made.append(Bed(store, dispatcher))
        return made[-1]

    yield make
    for item in made:
        if item.dispatcher.running:
            pytest_twisted.blockon(item.dispatcher.stopService() or _done())
        item.store.close()


def _done() -> Any:
    from twisted.internet.defer import succeed

    return succeed(None)


async def _queue(bed: Bed, n: int = 1) -> str:
    event = new_event("delivered", {"id": f"msg_{n}", "state": "delivered", "recipients": ["jörg@example.org"]}, time.time(), f"integration-{n:04d}")
    assert await bed.store.enqueue(event, time.time() + 3600) is True
    bed.dispatcher.wake()
    return event.event_id


def _library_verifies(request: Request) -> None:
    """The reference library accepts the request too, when it is installed."""
    try:
        import standardwebhooks
    except ImportError:
        return
    standardwebhooks.Webhook(SECRET.encode()).verify(request.body, request.headers)


@pytest_twisted.ensureDeferred
async def test_a_signed_event_reaches_a_real_receiver(serve: Any, bed: Any) -> None:
    """One POST to the configured path with the stored body and a signature the receiver verifies."""
    receiver = serve()
    hooks = bed(f"http://{HOST}:{receiver.port}/hooks/mailcow?key=abc")
    hooks.dispatcher.startService()
    event_id = await _queue(hooks)
    row = await hooks.until(event_id, lambda r: r.delivered_at is not None, "delivered")
    assert row.attempts == 1
    [request] = receiver.requests
    assert request.path == "/hooks/mailcow?key=abc" and request.signature_ok
    assert request.headers["content-type"] == "application/json" and request.headers["user-agent"] == "mailcow-smtp-api"
    assert request.headers["webhook-id"] == event_id
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 10
    assert json.loads(request.body)["message"]["recipients"] == ["jörg@example.org"]
    _library_verifies(request)


@pytest_twisted.ensureDeferred
async def test_a_500_is_answered_first_then_the_retry_is_delivered(serve: Any, bed: Any) -> None:
    """The receiver fails once; the retry comes after the backoff, same id and body, newly signed."""
    receiver = serve((500, 0.0), (200, 0.0))
    hooks = bed(f"http://{HOST}:{receiver.port}/hook")
    hooks.dispatcher.startService()
    event_id = await _queue(hooks)
    failed = await hooks.until(event_id, lambda r: r.attempts >= 1, "first attempt")
    assert (failed.last_error, failed.delivered_at) == ("HTTP 500", None)
    row = await hooks.until(event_id, lambda r: r.delivered_at is not None, "delivered after the retry")
    assert row.attempts == 2
    first, second = receiver.requests
    assert first.signature_ok and second.signature_ok
    assert (first.headers["webhook-id"], first.body) == (second.headers["webhook-id"], second.body)
    assert second.at - first.at >= FIRST_RETRY - 0.5
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    _library_verifies(second)


@pytest_twisted.ensureDeferred
async def test_a_receiver_slower_than_the_timeout_is_retried(serve: Any, bed: Any) -> None:
    """The first answer takes 3 s against a 1 s timeout: that attempt fails, the next one is delivered."""
    receiver = serve((200, 3.0), (200, 0.0))
    hooks = bed(f"http://{HOST}:{receiver.port}/hook", timeout=1.0)
    hooks.dispatcher.startService()
    started = time.monotonic()
    event_id = await _queue(hooks)
    failed = await hooks.until(event_id, lambda r: r.attempts >= 1, "first attempt")
    assert failed.last_error == "no answer within 1 s" and failed.delivered_at is None
    assert time.monotonic() - started < 2.5  # the dispatcher did not wait for the slow answer
    row = await hooks.until(event_id, lambda r: r.delivered_at is not None, "delivered after the timeout")
    assert row.attempts == 2 and len(receiver.requests) == 2


@pytest_twisted.ensureDeferred
async def test_a_closed_port_is_a_refused_connection(bed: Any) -> None:
    """Nobody listening: the attempt fails in a few words and the event waits for its retry."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    hooks = bed(f"http://{HOST}:{port}/hook")
    hooks.dispatcher.startService()
    event_id = await _queue(hooks)
    row = await hooks.until(event_id, lambda r: r.attempts >= 1, "first attempt")
    assert row.last_error == "connection refused" and row.next_at > time.time()


@pytest_twisted.ensureDeferred
async def test_https_with_a_certificate_for_the_host_is_delivered(serve: Any, bed: Any, pki: Pki, tmp_path: Path) -> None:
    """A certificate from the trusted CA with 127.0.0.1 in its subjectAltName: delivered over TLS."""
    receiver = serve(tls=server_tls(pki, pki.good, tmp_path))
    (tmp_path / "ca.pem").write_bytes(Pki.pem(pki.ca))
    hooks = bed(f"https://{HOST}:{receiver.port}/hook", ca_file=str(tmp_path / "ca.pem"))
    hooks.dispatcher.startService()
    event_id = await _queue(hooks)
    await hooks.until(event_id, lambda r: r.delivered_at is not None, "delivered over TLS")
    assert len(receiver.requests) == 1 and receiver.requests[0].signature_ok


@pytest.mark.parametrize(
    "which, error",
    [
        ("no_san", "TLS: the server certificate has no usable subjectAltName for 127.0.0.1"),
        ("wrong_name", "TLS: the server certificate is not valid for 127.0.0.1"),
        ("untrusted", "TLS handshake failed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_https_refuses_a_certificate_not_valid_for_the_host(
    serve: Any, bed: Any, pki: Pki, tmp_path: Path, which: str, error: str
) -> None:
    """A CN-only certificate (which Twisted's own check lets through), one for another name, and one
    from another CA: the handshake is ended and the receiver never sees the request."""
    pairs = {
        "no_san": pki.issue(cn="127.0.0.1"),
        "wrong_name": pki.wrong_name,
        "untrusted": pki.untrusted,
    }
    receiver = serve(tls=server_tls(pki, pairs[which], tmp_path))
    (tmp_path / "ca.pem").write_bytes(Pki.pem(pki.ca))
    hooks = bed(f"https://{HOST}:{receiver.port}/hook", ca_file=str(tmp_path / "ca.pem"))
    hooks.dispatcher.startService()
    event_id = await _queue(hooks)
    row = await hooks.until(event_id, lambda r: r.attempts >= 1, "first attempt")
    assert (row.last_error, row.delivered_at) == (error, None)
    assert receiver.requests == []  # the body never left
