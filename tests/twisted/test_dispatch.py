"""The API's root: the send route goes straight to its handler and is answered as Klein answers it."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mailcow_smtp_api.web.dispatch import DirectRoutes

PATH = b"/api/v1/send/email"


class Fallback(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.path))
        return b"fallback"


def _request(method: bytes, path: bytes) -> DummyRequest:
    request = DummyRequest([])
    request.method = method
    setattr(request, "path", path)
    return request


def test_post_to_the_route_runs_its_handler_and_writes_its_answer() -> None:
    """The handler's bytes are written and the request finished; the fallback never sees it."""
    fallback, calls = Fallback(), []

    def handler(request: Any) -> Deferred[bytes]:
        calls.append(request)
        return succeed(b'{"ok":1}')

    root = DirectRoutes({PATH: handler}, fallback)
    request = _request(b"POST", PATH)
    assert root.render(request) is NOT_DONE_YET
    assert calls == [request] and fallback.seen == []
    assert request.written == [b'{"ok":1}'] and request.finished == 1


def test_other_methods_and_paths_go_to_the_fallback() -> None:
    """GET on the same path (Klein answers 405) and POST elsewhere are the fallback's."""
    fallback = Fallback()
    root = DirectRoutes({PATH: lambda request: succeed(b"")}, fallback)
    for method, path in ((b"GET", PATH), (b"POST", PATH + b"/"), (b"POST", b"/api/v1/send/batch")):
        assert root.render(_request(method, path)) == b"fallback"
    assert fallback.seen == [(b"GET", PATH), (b"POST", PATH + b"/"), (b"POST", b"/api/v1/send/batch")]


def test_a_client_that_goes_away_cancels_the_handler_and_gets_nothing_written() -> None:
    """Klein's behaviour: the handler's Deferred is cancelled; nothing is written after the loss."""
    pending: Deferred[bytes] = Deferred()
    root = DirectRoutes({PATH: lambda request: pending}, Fallback())
    request = _request(b"POST", PATH)
    root.render(request)
    request.processingFailed(Failure(ConnectionError("gone")))  # DummyRequest: fails notifyFinish
    assert pending.called  # cancelled
    assert request.written == []


def test_an_unexpected_failure_is_a_processing_failure() -> None:
    """A handler that fails (it normally answers every error itself) gets twisted.web's 500."""

    class Request(DummyRequest):
        failures: list[Failure]

        def processingFailed(self, reason: Failure) -> None:  # noqa: N802 - twisted.web's name
            self.failures.append(reason)  # twisted.web's Request answers 500 here

    failing: Deferred[bytes] = Deferred()
    root = DirectRoutes({PATH: lambda request: failing}, Fallback())
    request = Request([])
    request.failures = []
    request.method = b"POST"
    setattr(request, "path", PATH)
    root.render(request)
    failing.errback(RuntimeError("boom"))
    assert [failure.type for failure in request.failures] == [RuntimeError]
    assert request.written == []
