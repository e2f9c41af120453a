"""Following postfix's log as it grows, and what it says of each Message-ID (mailcow.md section 8).

Two followers feed the same per-message traces: ``FileLog`` follows a plain postfix log file (the
``maillog_file`` of a non-docker postfix, and the test bed's), ``RedisLog`` mailcow's
``POSTFIX_MAILLOG`` list, which syslog-ng in postfix-mailcow fills newest first and trims to
``LOG_LINES`` (9999) every minute: a rolling window, not an archive.

Both say what they have seen without a gap in ``covered``: the stamps of the first and the last
line read since they started (or since the last gap). Only within it does the absence of a
Message-ID prove that postfix did not take a message; ``caught_up_at`` is the clock time at
which the follower last reached the end of what postfix had written. A gap (lines that may
have passed unread) restarts the coverage and forgets which queue id holds which Message-ID,
so that no later line of a reused queue id is filed under the wrong message.

The parsing and the queue-id bookkeeping are the pure ``core.maillog``; this module adds the
reading, the clock and the bounds.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.maillog import (
    Accepted,
    Delivery,
    Filed,
    LogBook,
    LogLine,
    Notification,
    parse_file_line,
    parse_mailcow_entry,
)

log = Logger(namespace="smtpapi.postfixlog")

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


@attrs.define
class MessageTrace:
    """What postfix's log said of one Message-ID, in log order."""

    message_id: str
    # Every queue id tied to it by a cleanup line (one per submission of the same Message-ID).
    queue_ids: list[str] = attrs.Factory(list)
    # The first queue id whose qmgr "(queue active)" line was seen: postfix took the message.
    accepted_queue_id: str | None = None
    accepted_at: float | None = None
    # One per delivery attempt and recipient; never those of a bounce report's own queue id.
    deliveries: list[Delivery] = attrs.Factory(list)
    # Bounce and delay reports postfix made: their queue id is not the message's.
    notifications: list[Notification] = attrs.Factory(list)

    def copy(self) -> MessageTrace:
        """A copy whose lists the caller may keep while the follower goes on."""
        return attrs.evolve(
            self,
            queue_ids=list(self.queue_ids),
            deliveries=list(self.deliveries),
            notifications=list(self.notifications),
        )


class MaillogSource(Protocol):
    """Reads mailcow's ``POSTFIX_MAILLOG``: its ``count`` newest entries, newest first."""

    def maillog(self, count: int) -> Deferred[list[bytes]]: ...


class PostfixLog:
    """What both followers share: the traces, the coverage, the subscribers and the polling.

    ``start()`` begins following (a service calls it with the process), ``stop()`` ends it.
    Subscribers are called with every event filed from then on, in log order (also those of the
    backlog a follower reads first, when they subscribed before ``start()``). At most
    ``max_traces`` traces are kept: the one whose last line is oldest goes first.
    """

    source_name = "postfix log"

    def __init__(self, clock: IReactorTime, poll_interval: float, max_traces: int) -> None:
        self.clock = clock
        self.poll_interval = poll_interval
        self.max_traces = max_traces
        # (first, last): unix times of the lines read with no gap, or None before the first one.
        self.covered: tuple[float, float] | None = None
        # The clock's time when the follower last reached the end of the log with no gap since
        # covered[0] began; None after a gap until the end is reached again.
        self.caught_up_at: float | None = None
        self._book = LogBook(max_open=max_traces)
        self._traces: OrderedDict[str, MessageTrace] = OrderedDict()
        self._subscribers: list[Callable[[Filed], None]] = []
        self._timer: IDelayedCall | None = None
        self._running = False
        self._failing = False

    # ------------------------------------------------------------------ the public face

    def start(self) -> None:
        """Begin following: the first read happens at once (on the clock's next turn)."""
        if self._running:
            return
        self._running = True
        self._schedule(0)

    def stop(self) -> Deferred[None] | None:
        """Stop following; a Deferred when a read is still under way, fired once it ended."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return None

    def trace(self, message_id: str) -> MessageTrace | None:
        """A copy of what the log said of ``message_id`` (with or without its angle brackets)."""
        key = message_id.strip()
        found = self._traces.get(key)
        if found is None:
            other = key[1:-1] if key.startswith("<") and key.endswith(">") else f"<{key}>"
            found = self._traces.get(other)
        return None if found is None else found.copy()

    def subscribe(self, callback: Callable[[Filed], None]) -> None:
        """Call ``callback`` with every event filed from now on, in log order."""
        self._subscribers.append(callback)

    # ------------------------------------------------------------------ for the followers

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._tick) if self._running else None

    def _tick(self) -> None:
        self._timer = None
        if not self._running:
            return
        try:
            self._read()
        except Exception:
            # A bug must not end the following: say so, and try again next time.
            log.failure("{source}: reading failed", source=self.source_name)
            self._schedule(self.poll_interval)

    def _read(self) -> None:
        """Read what is new and schedule the next read (each follower's own)."""
        raise NotImplementedError

    def _failed(self, why: str) -> None:
        """A read failed: said once per outage."""
        if not self._failing:
            self._failing = True
            log.warn("{source}: cannot read ({why}); trying again every {interval} s",
                     source=self.source_name, why=why, interval=self.poll_interval)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("{source}: readable again", source=self.source_name)

    def _gap(self, why: str) -> None:
        """Lines may have passed unread: coverage starts again, queue-id ties are forgotten."""
        if self.covered is not None:
            log.warn("{source}: {why}; the log is covered again only from the next line read",
                     source=self.source_name, why=why)
        self.covered = None
        self.caught_up_at = None
        self._book = LogBook(max_open=self.max_traces)

    def _caught_up(self) -> None:
        self.caught_up_at = self.clock.seconds()

    def _feed(self, lines: Iterable[LogLine | None]) -> None:
        """Take lines in log order: coverage, traces, then the subscribers."""
        for line in lines:
            if line is None:
                continue
            if line.time is not None:
                first = line.time if self.covered is None else self.covered[0]
                self.covered = (first, line.time)
            for filed in self._book.feed([line]):
                self._file(filed, line.time)
                for callback in list(self._subscribers):
                    try:
                        callback(filed)
                    except Exception:
                        log.failure("{source}: a subscriber failed", source=self.source_name)

    def _file(self, filed: Filed, when: float | None) -> None:
        trace = self._traces.get(filed.message_id)
        if trace is None:
            trace = self._traces[filed.message_id] = MessageTrace(filed.message_id)
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(filed.message_id)
        event = filed.event
        if any(n.report_queue_id == event.queue_id for n in trace.notifications):
            # A report's lines normally carry its own Message-ID and never come here; should one
            # share the message's, its deliveries still are not the message's.
            return
        if event.queue_id not in trace.queue_ids:
            trace.queue_ids.append(event.queue_id)
        if isinstance(event, Accepted) and trace.accepted_queue_id is None:
            # qmgr logs "(queue active)" again at every retry of a deferred message: the first counts.
            trace.accepted_queue_id, trace.accepted_at = event.queue_id, when
        elif isinstance(event, Delivery):
            trace.deliveries.append(event)
        elif isinstance(event, Notification):
            trace.notifications.append(event)


# ---------------------------------------------------------------------------------- a file


class FileLog(PostfixLog):
    """Follows a postfix log file: the whole file from its beginning first, then what is added.

    Reads at most ``chunk_size`` bytes per turn of the clock (at once again while more is
    waiting), so that a multi-MB log does not hold up the reactor. A last line without its
    newline waits for the rest. Rotation is noticed when the path names another file that has
    lines (the old one is read to its end first, so nothing is lost and coverage goes on);
    truncation (the same file, now shorter than what was read) restarts the reading at 0 and the
    coverage with it, since lines written just before it may be gone. Syslog stamps have no
    year: the clock's current UTC year, the previous one for a month after the current one.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        poll_interval: float = 0.5,
        max_traces: int = 100_000,
        chunk_size: int = 256 * 1024,
        max_line: int = 64 * 1024,
    ) -> None:
        super().__init__(clock, poll_interval, max_traces)
        self.path = path
        self.source_name = f"postfix log {path}"
        self.chunk_size = chunk_size
        self.max_line = max_line
        self._fd: int | None = None
        self._file_id: tuple[int, int] | None = None
        self._position = 0
        self._partial = b""

    def stop(self) -> Deferred[None] | None:
        """Stop following and close the file."""
        super().stop()
        self._close()
        return None

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def _open(self) -> bool:
        """Open the file: at the start, after a failed read, or again after ``stop()``.

        The same file again, no shorter than what was read of it, is read on where it was left:
        nothing is read twice, nothing lost. Any other file is read from its beginning, and
        what came before it cannot be vouched for: a gap.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._failed(exc.strerror or type(exc).__name__)
            return False
        stat = os.fstat(fd)
        file_id = (stat.st_dev, stat.st_ino)
        if file_id != self._file_id or stat.st_size < self._position:
            self._gap("the log file was opened again")
            self._file_id, self._position, self._partial = file_id, 0, b""
        self._fd = fd
        self._recovered()
        return True

    def _read(self) -> None:
        if self._fd is None and not self._open():
            self._schedule(self.poll_interval)
            return
        assert self._fd is not None
        try:
            data = os.pread(self._fd, self.chunk_size, self._position)
        except OSError as exc:
            self._failed(exc.strerror or type(exc).__name__)
            self._close()
            self._schedule(self.poll_interval)
            return
        self._position += len(data)
        self._take(data)
        if len(data) == self.chunk_size:
            self._schedule(0)  # more is waiting: go on at the reactor's next turn
            return
        self._at_end(data)

    def _at_end(self, data: bytes) -> None:
        """At the end of the file: note it, and look for truncation and rotation."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size < self._position:
            self._gap("the log file was truncated")
            self._position, self._partial = 0, b""
            self._schedule(0)
            return
        try:
            named = os.stat(self.path)
        except OSError:
            named = None  # moved away and not created again yet: the old file may still grow
        if named is not None and (named.st_dev, named.st_ino) != self._file_id and named.st_size > 0:
            if data:
                # Only an empty read proves the old file is done; the writer may have been mid-line.
                self._schedule(0)
                return
            if self._open_rotated():
                self._schedule(0)
                return
        self._caught_up()
        self._schedule(self.poll_interval)

    def _open_rotated(self) -> bool:
        """Switch to the file now at the path; the old one was read to its end: no gap."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # gone again: go on with the old one
        if self._partial:
            self._feed([self._parse(self._partial)])
        self._close()
        stat = os.fstat(fd)
        self._fd, self._file_id, self._position, self._partial = fd, (stat.st_dev, stat.st_ino), 0, b""
        log.info("{source}: rotated; following the new file", source=self.source_name)
        return True

    def _take(self, data: bytes) -> None:
        """Split what was read into whole lines; keep a last partial line for the next read."""
        if not data:
            return
        buffer = self._partial + data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._partial = buffer
            if len(buffer) > self.max_line:
                # No log line is this long: take it as one rather than hold it without end.
                self._partial = b""
                self._feed([self._parse(buffer)])
            return
        self._partial = buffer[cut + 1:]
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        self._feed(self._parse(raw, now) for raw in buffer[:cut].split(b"\n"))

    def _parse(self, raw: bytes, now: datetime | None = None) -> LogLine | None:
        if now is None:
            now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        text = raw.decode("utf-8", "replace")
        month = _MONTHS.get(text[:3])
        # syslog stamps have no year: a month after the current one was last year's.
        year = now.year - 1 if month is not None and month > now.month else now.year
        return parse_file_line(text, year)


# ---------------------------------------------------------------------------------- Redis


class RedisLog(PostfixLog):
    """Follows mailcow's ``POSTFIX_MAILLOG`` list by polling it.

    The list holds the newest entries first and loses its oldest to the trimming. Each poll
    reads the head of the list and finds where what was read before begins in it (entries may
    repeat to the letter, so it is the whole overlap that must match, not one entry); what comes
    before that is new and is fed oldest first. Usually only a short head is read (it grows when
    the overlap is not found in it, up to ``window`` entries). When even a whole window has no
    overlap, more than a window arrived between two polls (or the list was emptied): a gap, and
    coverage starts again at the oldest entry now in the list.

    Redis down: said once per outage, read again every ``poll_interval``. The outage by itself
    does not end the coverage: the next read that works decides, by the same overlap, whether
    the window still holds everything written meanwhile (no gap) or not (a gap).
    """

    source_name = "postfix log POSTFIX_MAILLOG"
    min_overlap = 16
    min_head = 64

    def __init__(
        self,
        source: MaillogSource,
        clock: IReactorTime,
        poll_interval: float = 1.0,
        window: int = 9999,
        max_traces: int = 100_000,
    ) -> None:
        super().__init__(clock, poll_interval, max_traces)
        self.source = source
        self.window = window
        self._seen: list[bytes] = []  # the entries read so far, newest first, at most a window
        self._head = min(window, self.min_head)
        self._pending: Deferred[Any] | None = None

    def stop(self) -> Deferred[None] | None:
        """Stop polling; a Deferred fired once a read under way has ended."""
        super().stop()
        if self._pending is None:
            return None
        done: Deferred[None] = Deferred()
        self._pending.addBoth(lambda _: done.callback(None))
        return done

    def _read(self) -> None:
        count = self.window if not self._seen else self._head
        try:
            d = self.source.maillog(count)
        except Exception as exc:
            d = Deferred()
            d.errback(exc)
        self._pending = d
        d.addCallbacks(self._got, self._not_got, callbackArgs=(count,))
        d.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        self._pending = None
        log.failure("{source}: reading failed", failure, source=self.source_name)
        self._schedule(self.poll_interval)

    def _not_got(self, failure: Failure) -> None:
        self._pending = None
        if not self._running:
            return
        # MailcowRedis says why in a SafeReason (no address, no password) behind its ApiError.
        reason = getattr(failure.value, "__cause__", None)
        self._failed(str(reason) if reason is not None else type(failure.value).__name__)
        self._schedule(self.poll_interval)

    def _got(self, entries: list[Any], count: int) -> None:
        self._pending = None
        if not self._running:
            return
        self._recovered()
        entries = [e if isinstance(e, bytes) else str(e).encode("utf-8") for e in entries]
        whole = len(entries) < count or count >= self.window
        new = self._new_entries(entries, whole)
        if new is None:
            self._head = min(self.window, count * 4)
            self._schedule(0)  # read a longer head at once
            return
        if new < 0:
            self._gap("more than a whole window arrived between two reads of POSTFIX_MAILLOG, or it was emptied")
            self._seen = []
            new = len(entries)
        fresh = entries[:new]
        self._seen = (fresh + self._seen)[: self.window]
        self._head = min(self.window, max(self.min_head, 2 * new + self.min_overlap))
        self._feed(parse_mailcow_entry(entry) for entry in reversed(fresh))
        self._caught_up()
        self._schedule(self.poll_interval)

    def _new_entries(self, entries: list[bytes], whole: bool) -> int | None:
        """How many entries at the head are new; -1: none overlaps what was read (a gap);
        None: the head that was read is too short to tell."""
        seen = self._seen
        if not seen:
            return len(entries)
        need = min(len(seen), self.min_overlap)
        for new in range(len(entries)):
            overlap = len(entries) - new
            if not whole and overlap < need:
                return None
            if entries[new] == seen[0] and self._overlaps(entries, new, overlap):
                return new
        return -1 if whole else None

    def _overlaps(self, entries: list[bytes], new: int, overlap: int) -> bool:
        seen = self._seen
        if overlap > len(seen):
            return False
        return all(entries[new + i] == seen[i] for i in range(overlap))
