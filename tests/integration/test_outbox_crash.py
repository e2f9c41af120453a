"""Crash safety of the outbox: the sidecar is killed with SIGKILL in the middle of a hand-over.

A scripted SMTP proxy on loopback stands between the sidecar and postfix's plain port (10025) and
is the sidecar's only, plain, target. Armed, it stops one transaction at an exact point:

- ``before-dot``: the whole message (headers with the Message-ID, the body) has gone to postfix,
  the final ``.`` has not: postfix has logged the Message-ID but not taken the message;
- ``after-dot``: the final ``.`` has gone to postfix and postfix's ``250 ... queued as`` has come
  back to the proxy, which keeps it from the sidecar: postfix has the message, the sidecar
  does not know.

There the sidecar is killed with SIGKILL, and a new one started on the same state database. The
row was left ``sending`` under a lease (``--smtp-timeout 2``: 2 x 8 + 10 = 26 s); once it ends the
new process looks the Message-ID up in postfix's log (``--postfix-log file:<the bed's log>``) and
sends the message again only if postfix did not take it. Every message must arrive in the sink
exactly once, counted by Message-ID. Without a log the cut-off message after the dot ends
``unknown`` and is not sent again.

The cases run side by side (each with its own proxy, state database and sidecars), so their
leases run out together.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    HANDED_OVER,
    HOST,
    Sidecar,
    Testbed,
    message_status,
    postfix_queue,
    sink_message_ids,
    wait_for_state,
    wait_until,
)
from .test_outbox import accepted, postfix_log_option

pytestmark = pytest.mark.integration

SMTP_TIMEOUT = 2  # seconds per SMTP step: the outbox lease is 2 x 8 + 10 = 26 s
LEASE = SMTP_TIMEOUT * 8 + 10
# A restarted sidecar resolves a cut-off hand-over once the lease ended, and with the log it may
# need a further round (5 s) before the log covers a lease's time after the hand-over.
RESOLVE_TIMEOUT = LEASE + 30.0
HOLD_TIMEOUT = 15.0  # the armed transaction reaches its point within seconds of the acceptance
EXTRA_MESSAGES = 2  # more messages in flight when the process is killed


# ------------------------------------------------------------------------------ the scripted proxy


class SmtpProxy:
    """A TCP proxy to postfix's plain port that can stop one transaction before or after its final dot.

    ``arm(mode)`` picks the next transaction that reaches its final ``.``: with ``before-dot`` the
    dot is never forwarded; with ``after-dot`` it is, and postfix's reply to it (and everything
    after) is kept from the client. ``held`` is set at that point. Every other transaction, and
    every connection after the armed one, passes unchanged. When one side closes, the proxy
    closes the other.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = (HOST, upstream_port)
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        self.held = threading.Event()
        self.held_message: bytes = b""  # what went to postfix of the held transaction (without the dot)
        self.held_reply: bytes = b""  # after-dot: postfix's reply the client never got
        self.transactions = 0  # final dots seen, all connections together
        self._armed: str | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str) -> None:
        """Stop the next transaction that reaches its final dot: ``before-dot`` or ``after-dot``."""
        assert mode in ("before-dot", "after-dot")
        with self._lock:
            self._armed = mode
            self.held.clear()

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._closing = True
        for sock in [self.listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            link = _Link(self, client, server)
            threading.Thread(target=link.client_to_server, daemon=True).start()
            threading.Thread(target=link.server_to_client, daemon=True).start()

    def _take(self) -> str | None:
        with self._lock:
            self.transactions += 1
            mode, self._armed = self._armed, None
            return mode


@dataclass
class _Link:
    """One client connection and its connection to postfix."""

    proxy: SmtpProxy
    client: socket.socket
    server: socket.socket
    hold_replies: bool = False
    message: bytearray = field(default_factory=bytearray)

    def _close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def client_to_server(self) -> None:
        in_data = False
        line = b""  # command mode: a partial line
        held = b""  # data mode: the last bytes, not forwarded yet (they may begin the final dot)
        before = b"\r\n"  # data mode: the two bytes forwarded last (the DATA line's CRLF at first)
        dropping = False
        try:
            while True:
                chunk = self.client.recv(65536)
                if not chunk:
                    break
                if dropping:
                    continue
                out = bytearray()
                data = chunk
                while data:
                    if not in_data:
                        end = (line + data).find(b"\r\n")
                        if end < 0:
                            line += data
                            break
                        joined = line + data
                        command, data, line = joined[: end + 2], joined[end + 2 :], b""
                        out += command
                        if command.strip().upper() == b"DATA":
                            in_data, held, before = True, b"", b"\r\n"
                            self.message.clear()
                        continue
                    buf = held + data
                    found = (before + buf).find(b"\r\n.\r\n")
                    if found < 0:
                        keep = max(0, len(buf) - 3)  # ".", ".\r" or ".\r\n" may follow
                        out += buf[:keep]
                        self.message += buf[:keep]
                        before = (before + buf[:keep])[-2:]
                        held, data = buf[keep:], b""
                        break
                    # The final dot is at buf[found]: before it the message, after it the next commands.
                    body, dot, data = buf[:found], buf[found : found + 3], buf[found + 3 :]
                    out += body
                    self.message += body
                    in_data, held = False, b""
                    mode = self.proxy._take()
                    if mode == "before-dot":
                        self.server.sendall(bytes(out))
                        self.proxy.held_message = bytes(self.message)
                        self.proxy.held.set()
                        dropping, out = True, bytearray()
                        break
                    out += dot
                    if mode == "after-dot":
                        self.proxy.held_message = bytes(self.message)
                        self.hold_replies = True
                if out:
                    self.server.sendall(bytes(out))
        except OSError:
            pass
        finally:
            self._close()

    def server_to_client(self) -> None:
        try:
            while True:
                chunk = self.server.recv(65536)
                if not chunk:
                    break
                if self.hold_replies:
                    # postfix answered the final dot: it has the message; the client never hears it.
                    self.proxy.held_reply += chunk
                    self.proxy.held.set()
                    continue
                self.client.sendall(chunk)
        except OSError:
            pass
        finally:
            self._close()


@pytest.fixture
def proxies() -> Iterator[Callable[[], SmtpProxy]]:
    """A factory of ``SmtpProxy`` to postfix's plain port; all closed after the test."""
    made: list[SmtpProxy] = []

    def make() -> SmtpProxy:
        made.append(SmtpProxy(10025))
        return made[-1]

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


# ------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    """One kill: where the proxy stops the transaction, whether the sidecars read postfix's log."""

    name: str
    mode: str
    with_log: bool
    extra: int
    proxy: SmtpProxy | None = None
    options: tuple[str, ...] = ()
    first: Sidecar | None = None
    restarted: Sidecar | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, Any] = field(default_factory=dict)  # the entry of the held message

    @property
    def message_ids(self) -> list[str]:
        return [entry["message_id"] for entry in self.entries]


def held_message_id(data: bytes) -> str:
    """The Message-ID header of a message as it went to postfix."""
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
        if not line:
            break
    raise AssertionError("no Message-ID in the held message")


def kill(service: Sidecar) -> None:
    """SIGKILL, and wait (bounded) until the process is gone."""
    service.process.send_signal(signal.SIGKILL)
    service.process.wait(10)
    assert service.process.returncode == -signal.SIGKILL


def queue_ids_of(bed: Testbed, message_id: str) -> list[str]:
    """The queue ids postfix's cleanup logged for ``message_id`` (before or without acceptance)."""
    found = []
    for line in bed.log_text("postfix").splitlines():
        if "/cleanup[" in line and f"message-id={message_id}" in line:
            found.append(line.split(": ", 2)[1])
    return found


def test_sigkill_mid_handover_then_restart_sends_each_message_exactly_once(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path, proxies: Callable[[], SmtpProxy]
) -> None:
    """Three kills at once, each followed by a new sidecar on the same SQLite state database:

    - ``before-dot`` with the log: postfix logged the Message-ID but lost the connection in DATA
      and kept nothing; the new process finds no acceptance in the log (which covers the lease's
      time) and sends it again: it arrives once, ``submitted`` or ``delivered``;
    - ``after-dot`` with the log: postfix took it (its 250 never reached the sidecar); the new
      process finds it in the log, records postfix's queue id and does not send it again;
    - ``after-dot`` without a log: the new process cannot know, so the message is ``unknown``
      and not sent again (postfix's one copy is in the sink).

    The two cases with the log also had two more messages accepted when the process died;
    every message of every case arrives exactly once.
    """
    cases = [
        Case("before_dot", "before-dot", with_log=True, extra=EXTRA_MESSAGES),
        Case("after_dot", "after-dot", with_log=True, extra=EXTRA_MESSAGES),
        Case("after_dot_no_log", "after-dot", with_log=False, extra=0),
    ]
    for case in cases:
        case.proxy = proxies()
        case.options = (
            "--state-db", f"sqlite:{tmp_path / case.name}.sqlite",
            "--smtp-timeout", str(SMTP_TIMEOUT),
            "--smtp-host", HOST,
            "--smtp-port", str(case.proxy.port),
            "--smtp-allow", f"{HOST}:{case.proxy.port}/plain",
            *(postfix_log_option(bed) if case.with_log else ()),
        )  # fmt: skip
        case.first = sidecar(*case.options)

    # Accept, let the proxy stop the hand-over at its point, and kill the process there.
    log_start = len(bed.log_text("postfix"))
    for case in cases:
        assert case.proxy is not None and case.first is not None
        case.proxy.arm(case.mode)
        for number in range(1 + case.extra):
            case.entries.append(accepted(case.first, subject=f"{case.name} {number}"))
            assert case.entries[-1]["status"] == "queued"
        assert case.proxy.held.wait(HOLD_TIMEOUT), f"{case.name}: the hand-over did not reach its point"
        kill(case.first)
        killed_at = time.time()
        cut_id = held_message_id(case.proxy.held_message)
        (case.cut,) = [entry for entry in case.entries if entry["message_id"] == cut_id]
        if case.mode == "after-dot":
            assert b"250 " in case.proxy.held_reply and b"queued as" in case.proxy.held_reply, case.proxy.held_reply
        case.restarted = sidecar(*case.options)
        assert time.time() - killed_at < LEASE - 5, "the new process must start while the lease still runs"

    # What postfix made of the cut-off transactions.
    before_dot, after_dot, no_log = cases
    wait_until(
        lambda: "lost connection after DATA" in bed.log_text("postfix")[log_start:], 15.0, "postfix losing the connection in DATA"
    )
    cut_queue_ids = wait_until(lambda: queue_ids_of(bed, before_dot.cut["message_id"]), 10.0, "the cut message's cleanup line")
    # postfix saw the Message-ID before the dot: that line alone proves nothing.
    for case in (after_dot, no_log):
        wait_until(lambda: sink_message_ids(bed)[case.cut["message_id"]] == 1, 15.0, f"{case.name}: postfix's copy in the sink")

    # The new processes resolve the cut-off hand-overs once the lease ends, and deliver the rest.
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    for case in (before_dot, after_dot):
        assert case.restarted is not None
        for entry in case.entries:
            left = max(1.0, deadline - time.monotonic())
            wait_for_state(case.restarted, entry["id"], HANDED_OVER, left)
    assert no_log.restarted is not None
    unknown = wait_for_state(no_log.restarted, no_log.cut["id"], ("unknown",), max(1.0, deadline - time.monotonic()))

    wait_until(lambda: not postfix_queue(bed), 20.0, "postfix's queue empty")
    time.sleep(2)  # anything sent twice would be on its way by now
    arrived = sink_message_ids(bed)
    for case in cases:
        for message_id in case.message_ids:
            assert arrived[message_id] == 1, (case.name, message_id, arrived[message_id])

    # How each one was resolved.
    records = {case.name: message_status(case.restarted, case.cut["id"])[1] for case in cases if case.restarted}
    resent = records["before_dot"]
    outcomes = [a["outcome"] for a in resent["attempts"]]
    assert "proven_not_taken" in outcomes and outcomes[-1] == "submitted", resent
    assert resent["queue_id"] not in cut_queue_ids, (resent, cut_queue_ids)
    found = records["after_dot"]
    reply_queue_id = after_dot.proxy.held_reply.decode().rsplit("queued as ", 1)[1].split()[0] if after_dot.proxy else ""
    assert found["queue_id"] == reply_queue_id, (found, after_dot.proxy.held_reply if after_dot.proxy else b"")
    assert [a["outcome"] for a in found["attempts"]] == ["submitted"], found
    assert unknown["attempts"][-1]["outcome"] == "unknown", unknown
    assert unknown["queue_id"] is None, unknown
