"""Lingering close: after an early answer, read and discard what the client still sends, for a while.

A server that closes a connection while the client is still uploading makes the kernel answer the
unread data with a reset, and the client never reads the answer: Python's http.client (and so
requests and urllib), Node's fetch and most other clients without ``Expect: 100-continue`` read
the response only once they have sent the whole body, and get a broken pipe or a reset instead of
the 413. nginx therefore keeps reading for a while before it closes (its ``lingering_close``); this
does the same, bounded in time and in bytes, so a client cannot hold the connection for long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LINGER_SECONDS = 5.0  # at most this long after the answer (nginx: lingering_time 30 s)
LINGER_BYTES = 64 * 1024 * 1024  # at most this much is read and discarded


class Lingering:
    """Discards what arrives on ``transport`` and closes it after ``seconds`` or ``max_bytes``.

    The answer must already be written. Where the transport can, its sending side is closed at
    once (a FIN after the answer), so a client that waits for the end of the response sees it.
    """

    def __init__(
        self,
        transport: Any,
        call_later: Callable[..., Any],
        seconds: float = LINGER_SECONDS,
        max_bytes: int = LINGER_BYTES,
    ) -> None:
        self.transport = transport
        self.max_bytes = max_bytes
        self.discarded = 0
        self.closed = False
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._timer: Any = call_later(seconds, self.close)

    def discard(self, data: bytes) -> None:
        """Drop ``data``; close once more than ``max_bytes`` were dropped."""
        self.discarded += len(data)
        if self.discarded > self.max_bytes:
            self.close()

    def close(self) -> None:
        """Close the connection now (the client had its time to read the answer)."""
        self.stop()
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()

    def stop(self) -> None:
        """The connection is gone: nothing left to time."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
