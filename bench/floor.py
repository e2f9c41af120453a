"""The floor of the sidecar's stack: the least a Twisted server can do per send request.

    .venv/bin/python -m bench.floor resource|klein PORT
    .venv/bin/python -m bench.floor app PORT CAFILE

Listens on 127.0.0.1:PORT and answers every ``POST /api/v1/send/email`` by reading the body,
``json.loads`` of it, and a small JSON answer of the sidecar's shape (200, ``"type": "success"``),
with keep-alive. ``resource`` is a bare twisted.web ``Resource``; ``klein`` the same handler on a
Klein route. Neither sends anything: the CPU per request of this process is what twisted.web
(and Klein) cost before any of the sidecar's own work.

``app`` is the whole job at its least: the same Resource, then a plain-text message of fixed
headers, submitted to postfix on 127.0.0.1 at the request's ``smtp_port`` over pooled STARTTLS
sessions (verified against CAFILE, AUTH PLAIN as ``from`` with ``password``, at most 50 per login),
MAIL, RCPT and DATA pipelined. No key, sender rule, limit, record, log line or metric: what is
left is the cost of twisted.web, TLS and SMTP on this machine, the floor under the sidecar's
send path. ``bench/cpu.py`` measures all three in the same run and with the same load generator
as the sidecar. ``GET /healthz`` answers 200 for start-up.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from collections import deque
from email.utils import formatdate
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web import server
from twisted.web.resource import Resource

ANSWER = {"type": "success", "msg": ["smtp_mail_sent"], "queue_id": "-"}


def answer(request: Any) -> bytes:
    """Parse the JSON body and answer as the sidecar does for a sent message."""
    content = request.content.read() if request.content is not None else b""
    parsed = json.loads(content)
    request.setHeader(b"Content-Type", b"application/json")
    body = dict(ANSWER, rcpts=len(parsed.get("to", ())))
    return json.dumps([body], separators=(",", ":")).encode("utf-8")


class SendResource(Resource):
    """The send route as a leaf resource; ``/healthz`` answers GET."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        """POST: the send route."""
        return answer(request)

    def render_GET(self, request: Any) -> bytes:
        """GET: alive."""
        return b'{"status":"ok"}'


def klein_resource() -> Any:
    """The same two routes on Klein."""
    from klein import Klein

    app = Klein()

    @app.route("/api/v1/send/email", methods=["POST"])
    def send(request: Any) -> bytes:
        return answer(request)

    @app.route("/healthz", methods=["GET"])
    def healthz(request: Any) -> bytes:
        return b'{"status":"ok"}'

    return app.resource()


POOL_SIZE = 50  # sessions per login, as the sidecar's --smtp-pool-size default


class Session(LineOnlyReceiver):
    """One SMTP session: EHLO, STARTTLS, EHLO, AUTH PLAIN once; then pipelined transactions.

    Every reply's last line fires the oldest waiting Deferred with its code; a transaction's
    commands are written at once and their replies read in order.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self) -> None:
        self.waiting: deque[Deferred[int]] = deque()
        self.lost = False

    def reply(self) -> Deferred[int]:
        """The code of the next reply."""
        waiter: Deferred[int] = Deferred()
        self.waiting.append(waiter)
        return waiter

    def lineReceived(self, line: bytes) -> None:
        if line[3:4] != b"-" and self.waiting:
            self.waiting.popleft().callback(int(line[:3]))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        while self.waiting:
            self.waiting.popleft().errback(ConnectionError("the SMTP session closed"))

    async def command(self, line: bytes, expected: int) -> None:
        """Write one command and check its reply."""
        waiter = self.reply()
        self.transport.write(line + b"\r\n")
        code = await waiter
        if code != expected:
            raise ConnectionError(f"{line.split()[0]!r}: {code}")

    async def start(self, tls: Any, login: str, password: str) -> None:
        """Greeting, EHLO, STARTTLS, EHLO and AUTH PLAIN."""
        if await self.reply() != 220:
            raise ConnectionError("no greeting")
        await self.command(b"EHLO floor.localhost", 250)
        await self.command(b"STARTTLS", 220)
        self.transport.startTLS(tls)
        await self.command(b"EHLO floor.localhost", 250)
        token = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
        await self.command(b"AUTH PLAIN " + token, 235)

    async def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        """MAIL, RCPT and DATA in one write; the dot-stuffed message after the 354."""
        commands = [f"MAIL FROM:<{sender}>".encode()]
        commands.extend(f"RCPT TO:<{rcpt}>".encode() for rcpt in recipients)
        commands.append(b"DATA")
        waiters = [self.reply() for _ in commands]
        self.transport.write(b"\r\n".join(commands) + b"\r\n")
        try:
            codes = await gatherResults(waiters, consumeErrors=True)
        except FirstError as problem:
            raise problem.subFailure.value from None
        if codes[-1] != 354 or any(code != 250 for code in codes[:-1]):
            raise ConnectionError(f"envelope refused: {codes}")
        if message.startswith(b"."):
            message = b"." + message
        waiter = self.reply()
        self.transport.write(message.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
        if await waiter != 250:
            raise ConnectionError("message refused")


class Pool:
    """Idle sessions per (port, login, password); at most POOL_SIZE each, callers queue beyond."""

    def __init__(self, cafile: str) -> None:
        with open(cafile, "rb") as handle:
            authority = Certificate.loadPEM(handle.read())
        self.tls = optionsForClientTLS("127.0.0.1", trustRoot=authority)
        self.idle: dict[tuple[int, str, str], list[Session]] = {}
        self.count: dict[tuple[int, str, str], int] = {}
        self.queued: dict[tuple[int, str, str], deque[Deferred[Session]]] = {}

    async def take(self, key: tuple[int, str, str]) -> Session:
        """An idle session, a new one while under the limit, else the next one given back."""
        idle = self.idle.setdefault(key, [])
        while idle:
            session = idle.pop()
            if not session.lost:
                return session
            self.count[key] -= 1
        if self.count.get(key, 0) >= POOL_SIZE:
            waiter: Deferred[Session] = Deferred()
            self.queued.setdefault(key, deque()).append(waiter)
            return await waiter
        self.count[key] = self.count.get(key, 0) + 1
        try:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", key[0], timeout=30)
            session = await connectProtocol(endpoint, Session())
            await session.start(self.tls, key[1], key[2])
        except BaseException:
            self.count[key] -= 1
            raise
        return session

    def give(self, key: tuple[int, str, str], session: Session) -> None:
        """Back to the first queued caller, else idle. A broken session is dropped, and the first
        queued caller gets a new one in its place (its place under the limit is free now)."""
        queued = self.queued.get(key)
        if session.lost:
            self.count[key] -= 1
            if queued:
                Deferred.fromCoroutine(self.take(key)).chainDeferred(queued.popleft())
        elif queued:
            queued.popleft().callback(session)
        else:
            self.idle[key].append(session)


def plain_message(request: dict[str, Any]) -> bytes:
    """A text/plain UTF-8 message with the headers every sent message has, CRLF line ends."""
    headers = (
        f"From: {request['from']}\r\n"
        f"To: {', '.join(request['to'])}\r\n"
        f"Subject: {request['subject']}\r\n"
        f"Date: {formatdate(time.time(), localtime=False, usegmt=True)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@floor.localhost>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    body = request["body"].replace("\r\n", "\n").replace("\n", "\r\n")
    return (headers + body).encode("utf-8")


class AppResource(Resource):
    """POST: parse, build, submit over the pool, answer; ``/healthz`` answers GET."""

    isLeaf = True

    def __init__(self, cafile: str) -> None:
        super().__init__()
        self.pool = Pool(cafile)

    def render_POST(self, request: Any) -> Any:
        content = request.content.read() if request.content is not None else b""
        parsed = json.loads(content)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        Deferred.fromCoroutine(self.submit(request, parsed, gone))
        return server.NOT_DONE_YET

    async def submit(self, request: Any, parsed: dict[str, Any], gone: list[bool]) -> None:
        """Send, then write the answer (502 with the reason when the send failed)."""
        key = (int(parsed["smtp_port"]), parsed["from"], parsed["password"])
        try:
            session = await self.pool.take(key)
            try:
                await session.send(parsed["from"], parsed["to"], plain_message(parsed))
            finally:
                self.pool.give(key, session)
        except Exception as problem:
            request.setResponseCode(502)
            answer = {"type": "danger", "msg": str(problem)}
        else:
            answer = dict(ANSWER, rcpts=len(parsed["to"]))
        if gone:
            return
        request.setHeader(b"Content-Type", b"application/json")
        request.write(json.dumps([answer], separators=(",", ":")).encode("utf-8"))
        request.finish()

    def render_GET(self, request: Any) -> bytes:
        """GET: alive."""
        return b'{"status":"ok"}'


KINDS = {"resource": SendResource, "klein": klein_resource, "app": AppResource}
ARGUMENTS = {"resource": 2, "klein": 2, "app": 3}


def main(argv: list[str]) -> int:
    """Serve until killed."""
    if not argv or argv[0] not in KINDS or len(argv) != ARGUMENTS[argv[0]]:
        print("usage: python -m bench.floor resource|klein PORT  or  app PORT CAFILE", file=sys.stderr)
        return 2
    site = server.Site(KINDS[argv[0]](*argv[2:]))
    reactor.listenTCP(int(argv[1]), site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
