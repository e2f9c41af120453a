"""The floor of the sidecar's HTTP stack: the least a Twisted server can do per send request.

    .venv/bin/python -m bench.floor resource|klein PORT

Listens on 127.0.0.1:PORT and answers every ``POST /api/v1/send/email`` by reading the body,
``json.loads`` of it, and a small JSON answer of the sidecar's shape (200, ``"type": "success"``),
with keep-alive. ``resource`` is a bare twisted.web ``Resource``; ``klein`` the same handler on a
Klein route. Nothing is sent anywhere: the CPU per request of this process is what twisted.web
(and Klein) cost before any of the sidecar's own work. ``bench/cpu.py`` measures it in the same
run and with the same load generator as the sidecar. ``GET /healthz`` answers 200 for start-up.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
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


KINDS = {"resource": SendResource, "klein": klein_resource}


def main(argv: list[str]) -> int:
    """Serve until killed."""
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: python -m bench.floor {'|'.join(KINDS)} PORT", file=sys.stderr)
        return 2
    site = server.Site(KINDS[argv[0]]())
    reactor.listenTCP(int(argv[1]), site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
