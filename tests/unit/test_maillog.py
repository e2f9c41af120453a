"""postfix's log lines (file and mailcow's Redis JSON) turned into events filed under Message-IDs."""

from __future__ import annotations

import json

from mailcow_smtp_api.core.maillog import (
    Accepted,
    Delivery,
    Expired,
    LogBook,
    LogLine,
    MessageIdSeen,
    Notification,
    Removed,
    event_of,
    parse_file_line,
    parse_mailcow_entry,
)

# Lines as the test bed's postfix writes them (maillog_file).
SENT = """\
Dec 01 21:47:38 mail postfix/cleanup[9448]: EE59B20CBCA: message-id=<b58d@example.com>
Dec 01 21:47:38 mail postfix/qmgr[9428]: EE59B20CBCA: from=<sender@example.com>, size=767, nrcpt=1 (queue active)
Dec 01 21:47:38 mail postfix/smtp[9449]: EE59B20CBCA: to=<recipient@example.net>, relay=127.0.0.1[127.0.0.1]:10026, delay=0.03, delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)
Dec 01 21:47:38 mail postfix/qmgr[9428]: EE59B20CBCA: removed
"""
BOUNCED = """\
Dec 01 21:50:00 mail postfix/cleanup[1]: 1A2B3C4D5E: message-id=<bounce-me@example.com>
Dec 01 21:50:00 mail postfix/qmgr[2]: 1A2B3C4D5E: from=<sender@example.com>, size=500, nrcpt=2 (queue active)
Dec 01 21:50:01 mail postfix/error[3]: 1A2B3C4D5E: to=<a@bounce.test>, relay=none, delay=0.2, delays=0.1/0/0/0.1, dsn=5.0.0, status=bounced (no delivery to this domain)
Dec 01 21:50:01 mail postfix/smtp[4]: 1A2B3C4D5E: to=<b@defer.test>, orig_to=<B@Defer.test>, relay=none, delay=0.2, delays=0.1/0/0.1/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
Dec 01 21:50:01 mail postfix/cleanup[1]: 9F8E7D6C5B: message-id=<20261201215001.9F8E7D6C5B@mail>
Dec 01 21:50:01 mail postfix/bounce[5]: 1A2B3C4D5E: sender non-delivery notification: 9F8E7D6C5B
Dec 01 21:50:02 mail postfix/qmgr[2]: 9F8E7D6C5B: removed
"""


def lines(text: str) -> list[LogLine]:
    parsed = [parse_file_line(line, 2026) for line in text.splitlines()]
    return [line for line in parsed if line is not None]


def test_file_lines_parse_with_time_and_program() -> None:
    """The syslog stamp becomes unix seconds of the given year; the program keeps its service name."""
    line = parse_file_line("Dec 01 21:47:38 mail postfix/submission/smtpd[25357]: connect from x\n", 2026)
    assert line == LogLine(1796161658.0, "postfix/submission/smtpd", "connect from x")
    iso = parse_file_line("2026-12-01T21:47:38.123+00:00 mail postfix/qmgr[1]: ABCDEF1234: removed", 2026)
    assert iso is not None and iso.program == "postfix/qmgr" and int(iso.time or 0) == 1796161658
    assert parse_file_line("Dec 01 21:47:38 mail dovecot[1]: auth: ok", 2026) is None
    assert parse_file_line("garbage", 2026) is None


def test_mailcow_redis_entries_parse() -> None:
    """mailcow's POSTFIX_MAILLOG JSON (all strings) gives the same line; other programs and junk do not."""
    entry = json.dumps({"time": "1796161658", "priority": "info", "program": "postfix/qmgr", "message": "ABCDEF1234: removed"})
    assert parse_mailcow_entry(entry) == LogLine(1796161658.0, "postfix/qmgr", "ABCDEF1234: removed")
    assert parse_mailcow_entry(json.dumps({"program": "dovecot", "message": "x"})) is None
    assert parse_mailcow_entry("not json") is None
    assert parse_mailcow_entry("[1, 2]") is None
    assert parse_mailcow_entry(json.dumps({"program": "postfix/smtp", "message": "m", "time": "soon"})) == LogLine(None, "postfix/smtp", "m")


def test_events_of_a_delivered_message() -> None:
    """cleanup, queue active, the delivery and the removal, in order."""
    events = [event_of(line) for line in lines(SENT)]
    assert events[0] == MessageIdSeen("EE59B20CBCA", "<b58d@example.com>")
    assert events[1] == Accepted("EE59B20CBCA", "sender@example.com", 767, 1)
    assert events[2] == Delivery("EE59B20CBCA", "recipient@example.net", "sent", "2.0.0", "127.0.0.1[127.0.0.1]:10026", "250 2.0.0 Ok", 1796161658.0)
    assert events[3] == Removed("EE59B20CBCA")


def test_bounce_report_is_not_the_message() -> None:
    """The DSN's own queue id gets its own Message-ID; the report line stays with the original message."""
    filed = LogBook().feed(lines(BOUNCED))
    mine = [f.event for f in filed if f.message_id == "<bounce-me@example.com>"]
    assert [type(e).__name__ for e in mine] == ["MessageIdSeen", "Accepted", "Delivery", "Delivery", "Notification"]
    bounced, deferred = mine[2], mine[3]
    assert isinstance(bounced, Delivery) and (bounced.recipient, bounced.status, bounced.dsn) == ("a@bounce.test", "bounced", "5.0.0")
    assert isinstance(deferred, Delivery) and (deferred.recipient, deferred.status) == ("B@Defer.test", "deferred")
    assert mine[4] == Notification("1A2B3C4D5E", "9F8E7D6C5B")
    report = [f.event for f in filed if f.message_id != "<bounce-me@example.com>"]
    assert report == [MessageIdSeen("9F8E7D6C5B", "<20261201215001.9F8E7D6C5B@mail>"), Removed("9F8E7D6C5B")]


def test_a_reused_queue_id_belongs_to_its_new_message() -> None:
    """After 'removed', the same queue id names the next message, never the old one."""
    text = SENT + SENT.replace("<b58d@example.com>", "<second@example.com>")
    filed = LogBook().feed(lines(text))
    assert [f.message_id for f in filed] == ["<b58d@example.com>"] * 4 + ["<second@example.com>"] * 4


def test_lines_without_a_known_queue_id_are_dropped() -> None:
    """Lines of a queue id whose cleanup line came before what was read are not guessed at."""
    partial = SENT.splitlines(keepends=True)[2:]
    assert LogBook().feed(lines("".join(partial))) == []


def test_expired_message() -> None:
    """A message returned after the queue lifetime is an Expired event."""
    line = LogLine(None, "postfix/qmgr", "ABCDEF1234: from=<s@example.com>, status=expired, returned to sender")
    assert event_of(line) == Expired("ABCDEF1234")


def test_the_book_is_bounded() -> None:
    """At most max_open queue ids are followed."""
    book = LogBook(max_open=2)
    for n in range(5):
        book.feed([LogLine(None, "postfix/cleanup", f"ABCDEF00{n}0: message-id=<m{n}@x>")])
    assert len(book._open) == 2
