"""The API's root resource: the send route straight to its handler, every other request through Klein.

Klein matches each request against its URL map (werkzeug's router, environ and adapters) before
calling a handler; for a send that cost more CPU than the route's own reading of the request. The
send route is one exact path and method, so this resource calls the very handler Klein would call
for it and writes its answer the way Klein does: the returned bytes, then ``finish``. When the
client goes away first, the handler's Deferred is cancelled, as Klein does (the send itself is
shielded from that, see ``api.shield``). Anything else, other methods on the same path included,
is Klein's to answer, with its routing, 404 and 405 handling unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

log = Logger(namespace="smtpapi")

Handler = Callable[[Any], "Deferred[bytes]"]


class DirectRoutes(Resource):
    """POST to one of ``routes``' exact paths runs its handler; every other request renders ``fallback``."""

    isLeaf = True

    def __init__(self, routes: Mapping[bytes, Handler], fallback: Resource) -> None:
        super().__init__()
        self._routes = dict(routes)
        self._fallback = fallback

    def render(self, request: Any) -> Any:
        """Dispatch by method and path."""
        handler = self._routes.get(request.path) if request.method == b"POST" else None
        if handler is None:
            return self._fallback.render(request)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        answer = handler(request)
        request.notifyFinish().addErrback(lambda _: answer.cancel())

        def write(body: bytes) -> None:
            if not finished:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if not finished:
                request.processingFailed(failure)
            elif not failure.check(CancelledError):
                log.failure("unhandled error after the client went away", failure)

        answer.addCallbacks(write, failed)
        return NOT_DONE_YET
