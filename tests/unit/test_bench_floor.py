"""bench/floor.py's app floor: the message it builds and the pipelined transaction it speaks.

In memory (StringTransport); the bench runs it against the real postfix of the test bed.
"""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from bench import floor

REQUEST = {"from": "a@example.org", "to": ["b@example.net", "c@example.net"], "subject": "s", "body": "one\n.two\r\nthree"}


def test_plain_message_has_crlf_lines_and_the_request_fields() -> None:
    message = floor.plain_message(REQUEST)
    head, _, body = message.partition(b"\r\n\r\n")
    assert body == b"one\r\n.two\r\nthree"
    assert b"\n" not in message.replace(b"\r\n", b"")
    parsed = message_from_bytes(message)
    assert parsed["From"] == "a@example.org" and parsed["To"] == "b@example.net, c@example.net"
    assert parsed["Message-ID"].endswith("@floor.localhost>") and parsed["Date"]


def test_a_transaction_is_pipelined_and_dot_stuffed() -> None:
    session = floor.Session()
    transport = StringTransport()
    session.makeConnection(transport)
    done: Deferred[Any] = Deferred.fromCoroutine(session.send("a@example.org", ["b@example.net"], b".x\r\n.y\r\nz"))
    assert transport.value() == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    transport.clear()
    session.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert transport.value() == b"..x\r\n..y\r\nz\r\n.\r\n"
    assert not done.called
    session.dataReceived(b"250-queued\r\n250 as X\r\n")
    assert done.called and done.result is None


def test_a_refused_recipient_fails_the_send() -> None:
    session = floor.Session()
    session.makeConnection(StringTransport())
    done: Deferred[Any] = Deferred.fromCoroutine(session.send("a@example.org", ["b@example.net"], b"x"))
    session.dataReceived(b"250 ok\r\n550 no\r\n554 no valid recipients\r\n")
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionError)


def test_a_lost_session_fails_what_waits() -> None:
    session = floor.Session()
    session.makeConnection(StringTransport())
    done: Deferred[Any] = Deferred.fromCoroutine(session.send("a@example.org", ["b@example.net"], b"x"))
    session.connectionLost(None)
    with pytest.raises(ConnectionError):
        done.result.raiseException()
    done.addErrback(lambda _: None)
    assert session.lost


def test_a_caller_queued_behind_a_broken_session_gets_a_new_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """At the limit a caller waits; when the session given back is broken, a new one is opened for it."""
    from twisted.internet.defer import succeed

    monkeypatch.setattr(floor, "POOL_SIZE", 1)
    monkeypatch.setattr(floor.Pool, "__init__", lambda self, cafile: _bare_pool(self))
    pool = floor.Pool("unused")
    opened: list[floor.Session] = []

    def connect(endpoint: Any, session: floor.Session) -> Deferred[floor.Session]:
        opened.append(session)
        return succeed(session)

    async def started(self: floor.Session, tls: Any, login: str, password: str) -> None:
        return None

    monkeypatch.setattr(floor, "connectProtocol", connect)
    monkeypatch.setattr(floor.Session, "start", started)
    key = (10587, "a@example.org", "pw")
    first: Deferred[Any] = Deferred.fromCoroutine(pool.take(key))
    waiting: Deferred[Any] = Deferred.fromCoroutine(pool.take(key))
    assert len(opened) == 1 and not waiting.called
    session = first.result
    session.lost = True
    pool.give(key, session)
    assert waiting.called and waiting.result is opened[1] and pool.count[key] == 1


def _bare_pool(pool: Any) -> None:
    pool.tls = None
    pool.idle, pool.count, pool.queued = {}, {}, {}
