"""Following postfix's log (a file, mailcow's Redis list) into per-message traces, on a task.Clock.

Files are temporary files written by the tests; the Redis list is a fake that holds the entries
newest first, as syslog-ng's LPUSH leaves them in ``POSTFIX_MAILLOG``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.maillog import Accepted, Delivery, Filed, MessageIdSeen, Notification, Removed
from mailcow_smtp_api.core.readiness import SafeReason
from mailcow_smtp_api.mailcow.postfixlog import FileLog, MessageTrace, RedisLog

UTC = timezone.utc


def stamp(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def clock_at(when: float) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


NOW = stamp(2026, 12, 1, 22, 0, 0)


def sent(qid: str, message_id: str, minute: int = 47, rcpt: str = "r@example.net") -> str:
    """postfix's lines for one message delivered at once (as the test bed writes them)."""
    at = f"Dec 01 21:{minute:02d}:38 mail"
    return (
        f"{at} postfix/cleanup[9448]: {qid}: message-id={message_id}\n"
        f"{at} postfix/qmgr[9428]: {qid}: from=<s@example.com>, size=767, nrcpt=1 (queue active)\n"
        f"{at} postfix/smtp[9449]: {qid}: to=<{rcpt}>, relay=127.0.0.1[127.0.0.1]:10026, delay=0.03, "
        "delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)\n"
        f"{at} postfix/qmgr[9428]: {qid}: removed\n"
    )


BOUNCED = """\
Dec 01 21:50:00 mail postfix/cleanup[1]: 1A2B3C4D5E: message-id=<bounce-me@example.com>
Dec 01 21:50:00 mail postfix/qmgr[2]: 1A2B3C4D5E: from=<s@example.com>, size=500, nrcpt=1 (queue active)
Dec 01 21:50:01 mail postfix/error[3]: 1A2B3C4D5E: to=<x@bounce.test>, relay=none, delay=0.2, delays=0.1/0/0/0.1, dsn=5.1.1, status=bounced (no such domain)
Dec 01 21:50:01 mail postfix/cleanup[1]: 9F8E7D6C5B: message-id=<20261201215001.9F8E7D6C5B@mail>
Dec 01 21:50:01 mail postfix/qmgr[2]: 9F8E7D6C5B: from=<>, size=2304, nrcpt=1 (queue active)
Dec 01 21:50:01 mail postfix/bounce[5]: 1A2B3C4D5E: sender non-delivery notification: 9F8E7D6C5B
Dec 01 21:50:01 mail postfix/qmgr[2]: 1A2B3C4D5E: removed
Dec 01 21:50:01 mail postfix/smtp[4]: 9F8E7D6C5B: to=<s@example.com>, relay=127.0.0.1[127.0.0.1]:10026, delay=0.03, delays=0/0.03/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)
Dec 01 21:50:02 mail postfix/qmgr[2]: 9F8E7D6C5B: removed
"""

DEFERRED_THEN_SENT = """\
Dec 01 21:52:00 mail postfix/cleanup[1]: 5E5E5E5E5E: message-id=<later@example.com>
Dec 01 21:52:00 mail postfix/qmgr[2]: 5E5E5E5E5E: from=<s@example.com>, size=500, nrcpt=1 (queue active)
Dec 01 21:52:00 mail postfix/smtp[4]: 5E5E5E5E5E: to=<x@defer.test>, relay=none, delay=0.04, delays=0/0.04/0/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
Dec 01 21:52:10 mail postfix/qmgr[7]: 5E5E5E5E5E: from=<s@example.com>, size=500, nrcpt=1 (queue active)
Dec 01 21:52:10 mail postfix/smtp[8]: 5E5E5E5E5E: to=<x@defer.test>, relay=127.0.0.1[127.0.0.1]:10026, delay=10, delays=10/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)
Dec 01 21:52:10 mail postfix/qmgr[7]: 5E5E5E5E5E: removed
"""


def statuses(trace: MessageTrace | None) -> list[tuple[str, str, str]]:
    assert trace is not None
    return [(d.queue_id, d.status, d.dsn) for d in trace.deliveries]


# ---------------------------------------------------------------------------------- files


class FileLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = clock_at(NOW)
        self.follower: FileLog | None = None

    def tearDown(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    def write(self, text: str | bytes, mode: str = "ab") -> None:
        with open(self.path, mode) as f:
            f.write(text.encode() if isinstance(text, str) else text)

    def follow(self, **options: Any) -> FileLog:
        self.follower = FileLog(self.path, self.clock, **options)
        self.follower.start()
        self.clock.advance(0)
        return self.follower

    def test_the_whole_file_is_read_from_its_beginning(self) -> None:
        """At start the file's existing lines are read: the trace says accepted and sent, with their stamps."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10) + sent("448A220C171", "<two@example.com>", minute=20))
        follower = self.follow()
        trace = follower.trace("<one@example.com>")
        assert trace is not None
        self.assertEqual(trace.queue_ids, ["EE59B20CBCA"])
        self.assertEqual(trace.accepted_queue_id, "EE59B20CBCA")
        self.assertEqual(trace.accepted_at, stamp(2026, 12, 1, 21, 10, 38))
        self.assertEqual(statuses(trace), [("EE59B20CBCA", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<two@example.com>")), [("448A220C171", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 10, 38), stamp(2026, 12, 1, 21, 20, 38)))
        self.assertEqual(follower.caught_up_at, NOW)

    def test_appended_lines_are_followed(self) -> None:
        """Lines added later are read at the next poll, and only those."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10))
        follower = self.follow(poll_interval=0.5)
        self.assertIsNone(follower.trace("<two@example.com>"))
        self.write(sent("448A220C171", "<two@example.com>", minute=30))
        self.clock.advance(0.5)
        self.assertEqual(statuses(follower.trace("<two@example.com>")), [("448A220C171", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 10, 38), stamp(2026, 12, 1, 21, 30, 38)))

    def test_a_partial_last_line_waits_for_its_end(self) -> None:
        """A line without its newline is not parsed until the rest of it arrives."""
        lines = sent("EE59B20CBCA", "<one@example.com>")
        delivery_at = lines.index("to=<") + 10
        self.write(lines[:delivery_at])
        follower = self.follow()
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [])
        self.write(lines[delivery_at:])
        self.clock.advance(0.5)
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])

    def test_rotation_reads_the_old_file_to_its_end_then_the_new_one(self) -> None:
        """Renamed away and replaced: the old file's last lines and the new file's are read; coverage goes on."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10))
        follower = self.follow()
        self.write(sent("448A220C171", "<two@example.com>", minute=20))  # written just before the rotation
        os.rename(self.path, self.path + ".1")
        self.write(sent("C043420C175", "<three@example.com>", minute=30), mode="wb")
        for _ in range(3):
            self.clock.advance(0.5)
        self.assertEqual(statuses(follower.trace("<two@example.com>")), [("448A220C171", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<three@example.com>")), [("C043420C175", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 10, 38), stamp(2026, 12, 1, 21, 30, 38)))

    def test_an_empty_new_file_waits_while_the_old_one_still_grows(self) -> None:
        """After a rename, lines the writer still adds to the old file are read until the new file has lines."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10))
        follower = self.follow()
        os.rename(self.path, self.path + ".1")
        self.write(b"", mode="wb")
        with open(self.path + ".1", "ab") as old:
            old.write(sent("448A220C171", "<two@example.com>", minute=20).encode())
        self.clock.advance(0.5)
        self.assertEqual(statuses(follower.trace("<two@example.com>")), [("448A220C171", "sent", "2.0.0")])

    def test_truncation_starts_over_and_restarts_coverage(self) -> None:
        """The same file, now shorter: read again from 0, and coverage starts at its first line."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10) + sent("448A220C171", "<two@example.com>", minute=20))
        follower = self.follow()
        with open(self.path, "r+b") as f:
            f.truncate(0)
        self.write(sent("C043420C175", "<three@example.com>", minute=40))
        self.clock.advance(0.5)
        self.clock.advance(0)
        self.assertEqual(statuses(follower.trace("<three@example.com>")), [("C043420C175", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 40, 38), stamp(2026, 12, 1, 21, 40, 38)))
        # What was filed before stays; nothing of it is filed twice.
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])

    def test_december_lines_read_in_january_are_last_years(self) -> None:
        """Syslog stamps have no year: a month after the clock's month belongs to the year before."""
        self.clock = clock_at(stamp(2027, 1, 1, 0, 0, 5))
        text = sent("EE59B20CBCA", "<old@example.com>").replace("Dec 01 21:47:38", "Dec 31 23:59:59")
        text += sent("448A220C171", "<new@example.com>").replace("Dec 01 21:47:38", "Jan 01 00:00:01")
        self.write(text)
        follower = self.follow()
        old, new = follower.trace("<old@example.com>"), follower.trace("<new@example.com>")
        assert old is not None and new is not None
        self.assertEqual(old.accepted_at, stamp(2026, 12, 31, 23, 59, 59))
        self.assertEqual(new.accepted_at, stamp(2027, 1, 1, 0, 0, 1))
        self.assertEqual(follower.covered, (stamp(2026, 12, 31, 23, 59, 59), stamp(2027, 1, 1, 0, 0, 1)))

    def test_a_large_file_is_read_in_bounded_chunks(self) -> None:
        """Each turn of the clock reads at most chunk_size bytes once; the next turn is scheduled at once."""
        text = "".join(sent(f"{n:06X}ABCD", f"<m{n}@example.com>") for n in range(200))
        self.write(text)
        follower = FileLog(self.path, self.clock, chunk_size=4096)
        self.follower = follower
        reads: list[tuple[int, int]] = []  # (turn, bytes asked)
        turns = [0]
        real_pread, real_tick = os.pread, follower._tick

        def pread(fd: int, size: int, offset: int) -> bytes:
            reads.append((turns[0], size))
            return real_pread(fd, size, offset)

        def tick() -> None:
            turns[0] += 1
            real_tick()

        self.patch(os, "pread", pread)
        follower._tick = tick  # type: ignore[method-assign]
        follower.start()
        self.clock.advance(0)
        self.assertEqual(len(reads), turns[0])  # one read per turn
        self.assertEqual({size for _, size in reads}, {4096})
        self.assertGreater(turns[0], len(text) // 4096)
        self.assertEqual(follower.caught_up_at, NOW)
        self.assertEqual(statuses(follower.trace("<m199@example.com>")), [("0000C7ABCD", "sent", "2.0.0")])

    def test_a_missing_file_is_said_once_and_read_once_it_exists(self) -> None:
        """No file yet: one warning for the whole outage, a retry every poll, then the file is read."""
        with capturedLogs() as events:
            follower = self.follow()
            for _ in range(5):
                self.clock.advance(0.5)
            self.write(sent("EE59B20CBCA", "<one@example.com>"))
            self.clock.advance(0.5)
        warnings = [e for e in events if "cannot read" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])

    def test_stop_and_start_again_reads_nothing_twice(self) -> None:
        """Started again on the same file, the follower goes on where it stopped."""
        self.write(sent("EE59B20CBCA", "<one@example.com>", minute=10))
        follower = self.follow()
        self.assertIsNone(follower.stop())
        self.write(sent("448A220C171", "<two@example.com>", minute=20))
        follower.start()
        self.clock.advance(0)
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<two@example.com>")), [("448A220C171", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 10, 38), stamp(2026, 12, 1, 21, 20, 38)))

    def test_a_bounce_reports_queue_id_is_not_the_messages(self) -> None:
        """The bounced delivery and the report stay with the message; the report's own delivery does not."""
        self.write(BOUNCED)
        follower = self.follow()
        trace = follower.trace("<bounce-me@example.com>")
        assert trace is not None
        self.assertEqual(statuses(trace), [("1A2B3C4D5E", "bounced", "5.1.1")])
        self.assertEqual(trace.notifications, [Notification("1A2B3C4D5E", "9F8E7D6C5B")])
        self.assertEqual(trace.queue_ids, ["1A2B3C4D5E"])
        report = follower.trace("<20261201215001.9F8E7D6C5B@mail>")
        self.assertEqual(statuses(report), [("9F8E7D6C5B", "sent", "2.0.0")])

    def test_a_deferred_message_keeps_its_first_acceptance(self) -> None:
        """qmgr's "(queue active)" repeats at the retry; accepted_at stays the first; both attempts are kept."""
        self.write(DEFERRED_THEN_SENT)
        trace = self.follow().trace("later@example.com")  # the Message-ID without its brackets finds it too
        assert trace is not None
        self.assertEqual(trace.accepted_at, stamp(2026, 12, 1, 21, 52, 0))
        self.assertEqual(statuses(trace), [("5E5E5E5E5E", "deferred", "4.4.1"), ("5E5E5E5E5E", "sent", "2.0.0")])

    def test_subscribers_get_every_filed_event_in_log_order(self) -> None:
        """Each filed event reaches each subscriber once, in the order of the log; a failing one harms no other."""
        self.write(BOUNCED)
        seen: list[Filed] = []
        follower = FileLog(self.path, self.clock)
        self.follower = follower

        def broken(filed: Filed) -> None:
            raise RuntimeError("subscriber bug")

        follower.subscribe(broken)
        follower.subscribe(seen.append)
        follower.start()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), len(seen))
        mine = [type(f.event) for f in seen if f.message_id == "<bounce-me@example.com>"]
        self.assertEqual(mine, [MessageIdSeen, Accepted, Delivery, Notification, Removed])
        self.assertEqual([f.message_id for f in seen][:3], ["<bounce-me@example.com>"] * 3)
        self.assertEqual(len(seen), 9)

    def test_traces_are_bounded(self) -> None:
        """At most max_traces traces are kept; the one that heard nothing for longest goes first."""
        self.write(sent("AAAAAA0001", "<a@x>", 1) + sent("BBBBBB0002", "<b@x>", 2) + sent("CCCCCC0003", "<c@x>", 3))
        follower = self.follow(max_traces=2)
        self.assertIsNone(follower.trace("<a@x>"))
        self.assertIsNotNone(follower.trace("<b@x>"))
        self.assertIsNotNone(follower.trace("<c@x>"))

    def test_a_trace_is_a_copy(self) -> None:
        """What trace() returns does not change under the caller when more lines arrive."""
        lines = DEFERRED_THEN_SENT.splitlines(keepends=True)
        self.write("".join(lines[:3]))
        follower = self.follow()
        before = follower.trace("<later@example.com>")
        self.write("".join(lines[3:]))
        self.clock.advance(0.5)
        self.assertEqual(len(statuses(before)), 1)
        self.assertEqual(len(statuses(follower.trace("<later@example.com>"))), 2)


# ---------------------------------------------------------------------------------- Redis


def entry(line: str, year: int = 2026) -> bytes:
    """A file line as mailcow's syslog-ng stores it in POSTFIX_MAILLOG (all values strings)."""
    head, _, message = line.partition("]: ")
    program = head.split(" ")[4].split("[")[0]
    when = datetime.strptime(f"{year} {line[:15]}", "%Y %b %d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    return json.dumps({"time": str(int(when)), "priority": "info", "program": program, "message": message}).encode()


@attrs.define
class FakeMaillog:
    """POSTFIX_MAILLOG: newest first; records the counts asked for; can be down or slow."""

    entries: list[bytes] = attrs.Factory(list)
    asked: list[int] = attrs.Factory(list)
    down: bool = False
    hold: Deferred[list[bytes]] | None = None

    def push(self, text: str) -> None:
        for line in text.splitlines():
            self.entries.insert(0, entry(line))

    def trim(self, size: int) -> None:
        del self.entries[size:]

    def maillog(self, count: int) -> Deferred[list[bytes]]:
        self.asked.append(count)
        if self.down:
            # As MailcowRedis fails: an ApiError, and why in a SafeReason behind it.
            error = ApiError.of("smtp_ratelimit_unavailable")
            error.__cause__ = SafeReason("cannot connect to Redis (see --redis)")
            return fail(error)
        if self.hold is not None:
            return self.hold
        return succeed(list(self.entries[:count]))


class RedisLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at(NOW)
        self.source = FakeMaillog()

    def follow(self, **options: Any) -> RedisLog:
        follower = RedisLog(self.source, self.clock, **options)
        follower.start()
        self.clock.advance(0)
        self.addCleanup(follower.stop)
        return follower

    def test_the_first_read_covers_from_the_oldest_entry(self) -> None:
        """The first poll reads a whole window and files it oldest first."""
        self.source.push(sent("EE59B20CBCA", "<one@example.com>", minute=10) + sent("448A220C171", "<two@example.com>", minute=20))
        follower = self.follow(window=100)
        self.assertEqual(self.source.asked, [100])
        self.assertEqual(statuses(follower.trace("<one@example.com>")), [("EE59B20CBCA", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 10, 38), stamp(2026, 12, 1, 21, 20, 38)))
        self.assertEqual(follower.caught_up_at, NOW)

    def test_new_entries_at_the_head_are_fed_once_even_when_identical(self) -> None:
        """Entries identical to the letter (same second, same text) each count once, none twice."""
        self.source.push(DEFERRED_THEN_SENT.splitlines()[0] + "\n" + DEFERRED_THEN_SENT.splitlines()[1])
        deferred = DEFERRED_THEN_SENT.splitlines()[2]
        self.source.push(deferred)
        follower = self.follow()
        self.source.push(deferred + "\n" + deferred)  # postfix said the same thing twice in the same second
        self.clock.advance(1.0)
        self.clock.advance(1.0)  # nothing new: nothing fed again
        self.assertEqual(statuses(follower.trace("<later@example.com>")), [("5E5E5E5E5E", "deferred", "4.4.1")] * 3)

    def test_trimming_of_the_tail_is_not_mistaken_for_new_entries(self) -> None:
        """mailcow trims the oldest entries every minute: the overlap still shows what is new."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1) + sent("BBBBBB0002", "<b@x>", 2))
        follower = self.follow(window=8)
        self.source.push(sent("CCCCCC0003", "<c@x>", 3))
        self.source.trim(8)
        self.clock.advance(1.0)
        self.assertEqual(statuses(follower.trace("<c@x>")), [("CCCCCC0003", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<b@x>")), [("BBBBBB0002", "sent", "2.0.0")])
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 1, 38), stamp(2026, 12, 1, 21, 3, 38)))

    def test_a_short_head_is_read_and_grown_when_more_arrived(self) -> None:
        """After the first read only a short head is asked for; more new entries than it holds make it grow."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1))
        follower = self.follow(window=9999)
        self.source.push("".join(sent(f"{n:06X}ABCD", f"<m{n}@x>", 5) for n in range(40)))  # 160 entries
        self.clock.advance(1.0)
        self.assertEqual(self.source.asked, [9999, 64, 256])
        self.assertEqual(statuses(follower.trace("<m0@x>")), [("000000ABCD", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<m39@x>")), [("000027ABCD", "sent", "2.0.0")])
        self.assertEqual(statuses(follower.trace("<a@x>")), [("AAAAAA0001", "sent", "2.0.0")])

    def test_more_than_a_window_between_polls_is_a_gap(self) -> None:
        """No overlap with what was read: coverage restarts at the oldest entry now in the list."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1))
        lines = sent("BBBBBB0002", "<b@x>", 2).splitlines(keepends=True)
        self.source.push(lines[0])  # b's cleanup line, read before the gap
        follower = self.follow(window=8)
        rest_of_b = "".join(lines[1:]).replace("21:02:38", "21:04:38")
        self.source.push(sent("CCCCCC0003", "<c@x>", 3) + rest_of_b + sent("DDDDDD0004", "<d@x>", 5))
        self.source.trim(8)  # left: c's last line, the rest of b, d
        with capturedLogs() as events:
            self.clock.advance(1.0)
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 3, 38), stamp(2026, 12, 1, 21, 5, 38)))
        self.assertTrue(any("covered again" in e.get("log_format", "") for e in events))
        # b's queue id was tied before the gap; that tie may be stale now, so its later lines are not filed.
        self.assertEqual(statuses(follower.trace("<b@x>")), [])
        self.assertEqual(statuses(follower.trace("<d@x>")), [("DDDDDD0004", "sent", "2.0.0")])

    def test_an_emptied_list_is_a_gap(self) -> None:
        """The list emptied (Redis restarted without its data): what was written before cannot be vouched for."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1))
        follower = self.follow()
        self.source.entries.clear()
        self.clock.advance(1.0)
        self.assertIsNone(follower.covered)
        self.source.push(sent("BBBBBB0002", "<b@x>", 2))
        self.clock.advance(1.0)
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 2, 38), stamp(2026, 12, 1, 21, 2, 38)))

    def test_redis_down_is_said_once_and_coverage_survives_when_the_window_still_overlaps(self) -> None:
        """An outage is one warning; afterwards the overlap shows nothing was lost, so coverage goes on."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1))
        follower = self.follow(window=100)
        self.source.down = True
        with capturedLogs() as events:
            for _ in range(10):
                self.clock.advance(1.0)
            self.source.push(sent("BBBBBB0002", "<b@x>", 2))
            self.source.down = False
            self.clock.advance(1.0)
        warnings = [e for e in events if "cannot read" in e.get("log_format", "")]
        self.assertEqual([e["why"] for e in warnings], ["cannot connect to Redis (see --redis)"])
        self.assertTrue(any("readable again" in e.get("log_format", "") for e in events))
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 1, 38), stamp(2026, 12, 1, 21, 2, 38)))
        self.assertEqual(statuses(follower.trace("<b@x>")), [("BBBBBB0002", "sent", "2.0.0")])

    def test_redis_down_longer_than_the_window_holds_is_a_gap(self) -> None:
        """When more than a window was written during the outage, the first read after it finds no overlap."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1))
        follower = self.follow(window=4)
        self.source.down = True
        self.clock.advance(1.0)
        self.source.push(sent("BBBBBB0002", "<b@x>", 2) + sent("CCCCCC0003", "<c@x>", 3))
        self.source.trim(4)
        self.source.down = False
        self.clock.advance(1.0)
        self.assertEqual(follower.covered, (stamp(2026, 12, 1, 21, 3, 38), stamp(2026, 12, 1, 21, 3, 38)))
        self.assertEqual(statuses(follower.trace("<c@x>")), [("CCCCCC0003", "sent", "2.0.0")])

    def test_a_bounce_reports_queue_id_is_not_the_messages(self) -> None:
        """Over Redis too, the report's own delivery stays out of the message's trace."""
        self.source.push(BOUNCED)
        trace = self.follow().trace("<bounce-me@example.com>")
        assert trace is not None
        self.assertEqual(statuses(trace), [("1A2B3C4D5E", "bounced", "5.1.1")])
        self.assertEqual([n.report_queue_id for n in trace.notifications], ["9F8E7D6C5B"])

    def test_subscribers_get_new_events_in_log_order(self) -> None:
        """Subscribers see each poll's new events oldest first."""
        seen: list[Filed] = []
        follower = RedisLog(self.source, self.clock)
        follower.subscribe(seen.append)
        follower.start()
        self.addCleanup(follower.stop)
        self.clock.advance(0)
        self.source.push(DEFERRED_THEN_SENT)
        self.clock.advance(1.0)
        kinds = [type(f.event).__name__ for f in seen]
        self.assertEqual(kinds, ["MessageIdSeen", "Accepted", "Delivery", "Accepted", "Delivery", "Removed"])

    def test_traces_are_bounded(self) -> None:
        """At most max_traces traces, oldest first out."""
        self.source.push(sent("AAAAAA0001", "<a@x>", 1) + sent("BBBBBB0002", "<b@x>", 2))
        follower = self.follow(max_traces=1)
        self.assertIsNone(follower.trace("<a@x>"))
        self.assertIsNotNone(follower.trace("<b@x>"))

    def test_stop_waits_for_a_read_under_way(self) -> None:
        """stop() during a read returns a Deferred that fires when the read ends; nothing is polled after."""
        self.source.hold = Deferred()
        follower = RedisLog(self.source, self.clock)
        follower.start()
        self.clock.advance(0)
        stopped = follower.stop()
        assert stopped is not None
        self.assertNoResult(stopped)
        self.source.hold.callback([entry(line) for line in reversed(sent("AAAAAA0001", "<a@x>").splitlines())])
        self.successResultOf(stopped)
        self.clock.advance(10)
        self.assertEqual(self.source.asked, [9999])
        self.assertIsNone(follower.trace("<a@x>"))
