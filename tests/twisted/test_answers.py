"""Every answer a client can get, in memory over a real twisted.web channel: each carries a request
id (header and body) and leaves one log line; the Server header names no version; an early 413
lingers so that a client still uploading can read it."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher

from mailcow_smtp_api.web.linger import LINGER_BYTES, LINGER_SECONDS, Lingering
from tests.unit.test_hostile_input import LIMIT, VALID, _channel, _head

REQUEST_ID = re.compile(rb"\r\nX-Request-Id: ([0-9a-f]{16})\r\n", re.IGNORECASE)


@pytest.fixture
def lines() -> Any:
    """The ``http ...`` and ``send ...`` log lines written while the test runs."""
    seen: list[str] = []

    def observe(event: LogEvent) -> None:
        text = event.get("log_format", "")
        if text.startswith(("http ", "send ")):
            seen.append(text.format(**event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def answer(data: bytes, clock: Clock | None = None) -> tuple[bytes, StringTransport]:
    """Feed ``data`` to a fresh channel of the API's site; the bytes written back."""
    _shell, channel, transport = _channel(LIMIT, clock=clock or Clock())
    channel.dataReceived(data)
    return transport.value(), transport


def body_request_id(raw: bytes) -> str:
    body = raw.split(b"\r\n\r\n", 1)[1]
    if b"\r\n" in body[:8]:  # chunked: the first chunk holds the JSON
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    parsed = json.loads(body)
    return str(parsed[0]["log"][2]["request_id"])


BODY = json.dumps(VALID).encode()


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: sidecar.test\r\n\r\n", 404, "not_found"),
        (b"GET /api/v1/send/email HTTP/1.1\r\nHost: sidecar.test\r\n\r\n", 405, "method_not_allowed"),
        (_head(LIMIT + 1), 413, "smtp_request_too_large"),
        (_head(None, b"Content-Length: 10", b"Transfer-Encoding: chunked") + BODY, 400, "smtp_bad_http_request"),
        (_head(len(BODY), content_type="text/plain") + BODY, 415, "smtp_unsupported_media_type"),
    ],
)
def test_every_error_answer_has_a_request_id_and_one_log_line(data: bytes, status: int, code: str, lines: list[str]) -> None:
    """404, 405, 413, framing errors and send errors alike: the X-Request-Id header, the same id
    in the body's log entry, and exactly one log line naming it with the status and code."""
    raw, _transport = answer(data)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:100]
    found = REQUEST_ID.search(raw)
    assert found is not None, raw[:300]
    request_id = found.group(1).decode()
    assert body_request_id(raw) == request_id
    mine = [line for line in lines if request_id in line]
    assert len(mine) == 1, lines
    assert f"status={status}" in mine[0] and f"code={code}" in mine[0]


@pytest.mark.parametrize("path", [b"/healthz", b"/api/v1/openapi.json"])
def test_other_routes_carry_a_request_id_and_log_it(path: bytes, lines: list[str]) -> None:
    """Answers outside the send route have an id and a log line too."""
    raw, _transport = answer(b"GET " + path + b" HTTP/1.1\r\nHost: sidecar.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    found = REQUEST_ID.search(raw)
    assert found is not None
    assert [line for line in lines if found.group(1).decode() in line] == [
        f"http {found.group(1).decode()} ip=192.168.1.1 GET {path.decode()} status=200 code=-"
    ]


@pytest.mark.parametrize(
    "data",
    [b"GET /healthz HTTP/1.1\r\nHost: sidecar.test\r\n\r\n", b"GET /nope HTTP/1.1\r\nHost: sidecar.test\r\n\r\n"],
)
def test_the_server_header_names_no_version(data: bytes) -> None:
    """The Server header is the product's name alone, never TwistedWeb/<version>."""
    raw, _transport = answer(data)
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nserver: mailcow-smtp-api\r\n" in head
    assert b"twisted" not in head


def test_an_early_413_reads_and_drops_the_rest_of_the_body_then_closes() -> None:
    """After the 413 the connection stays open while the client uploads (nothing of it is parsed or
    answered), and closes after LINGER_SECONDS."""
    clock = Clock()
    _shell, channel, transport = _channel(LIMIT, clock=clock)
    channel.dataReceived(_head(10 * LIMIT))
    answered = transport.value()
    assert answered.startswith(b"HTTP/1.1 413 ")
    for _ in range(20):  # the body, with a request hidden in it: never parsed
        channel.dataReceived(b"x" * LIMIT + b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value() == answered
    assert not transport.disconnecting
    clock.advance(LINGER_SECONDS - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


class HalfClosingTransport(StringTransport):
    """A transport that records a half close (TCP's FIN after the answer)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def test_lingering_half_closes_then_stops_at_its_byte_cap() -> None:
    """Where the transport can, its sending side closes at once; past the byte cap it closes fully."""
    clock = Clock()
    transport = HalfClosingTransport()
    lingering = Lingering(transport, clock.callLater, seconds=5, max_bytes=1000)
    assert transport.write_closed and not transport.disconnecting
    lingering.discard(b"x" * 1000)
    assert not transport.disconnecting
    lingering.discard(b"x")
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_lingering_ends_its_timer_when_the_client_closes_first() -> None:
    """A client that reads the answer and goes away leaves no timer behind."""
    clock = Clock()
    _shell, channel, transport = _channel(LIMIT, clock=clock)
    channel.dataReceived(_head(LIMIT + 1))
    channel.connectionLost(None)
    assert all(not call.active() for call in clock.getDelayedCalls())
    assert LINGER_BYTES >= 8 * 1024 * 1024  # a body of megabytes is read to its end


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        (b"/v3/example.org/messages", "multipart/form-data; boundary=b"),
        (b"/v3/example.org/messages.mime", "multipart/form-data; boundary=b"),
        (b"/email", "application/json"),
        (b"/email/batch", "application/json"),
        (b"/api/v1/send/batch", "application/json"),
        (b"/api/v1/send/raw", "application/json"),
    ],
)
def test_an_oversize_body_on_every_new_route_is_refused_before_it_is_read(path: bytes, content_type: str) -> None:
    """A multipart (or JSON) body declared past --max-request-bytes answers 413 at once, on every
    route, before any of it is buffered or parsed."""
    head = _head(LIMIT + 1, content_type=content_type).replace(b"POST /api/v1/send/email ", b"POST " + path + b" ", 1)
    raw, _transport = answer(head + b"--b\r\n" + b"x" * 100)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
    assert b"smtp_request_too_large" in raw
