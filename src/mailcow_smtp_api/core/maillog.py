"""postfix's log lines, as mailcow keeps them, turned into a message's fate (mailcow.md section 8).

Two sources give the same lines: a plain postfix log file (``Mmm dd HH:MM:SS host program[pid]: text``)
and mailcow's Redis list ``POSTFIX_MAILLOG`` (JSON objects with ``time``, ``program``, ``message``).
Queue ids are short and reused over time, so a queue id alone names nothing for long: postfix's
``cleanup`` line ``<QID>: message-id=<...>`` ties the queue id to a Message-ID until
``<QID>: removed``; ``LogBook`` keeps exactly that tie and files every later line of the queue id
under the Message-ID. Pure core: no I/O, the year of syslog-style stamps is passed in.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import attrs



def _qid(group: str) -> str:
    """postfix's queue ids: short (hex, 6+ digits) or long (base 52 + base 10, 10+ characters)."""
    return rf"(?P<{group}>[0-9A-F]{{6,}}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{{10,}})"


_QID = _qid("qid")
_FILE_LINE = re.compile(
    r"(?P<stamp>[A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d:\d\d)(?:\.\d+)? \S+ (?P<program>postfix[^\[:\s]*)(?:\[\d+\])?: (?P<text>.*)"
)
_ISO_LINE = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)) \S+ (?P<program>postfix[^\[:\s]*)(?:\[\d+\])?: (?P<text>.*)")
_QUEUED = re.compile(_QID + r": (?P<rest>.*)")
_MESSAGE_ID = re.compile(r"message-id=(?P<id><[^>\s]*>|\S+)")
_ACTIVE = re.compile(r"from=<(?P<sender>[^>]*)>, size=(?P<size>\d+), nrcpt=(?P<nrcpt>\d+) \(queue active\)")
_DELIVERY = re.compile(
    r"to=<(?P<rcpt>[^>]*)>,(?: orig_to=<(?P<orig>[^>]*)>,)? relay=(?P<relay>[^,]*), .*?"
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>sent|deferred|bounced|expired|undeliverable)(?: \((?P<text>.*)\))?$"
)
_BOUNCE = re.compile(r"sender (?:non-delivery|delay|delivery status) notification: " + _qid("report"))
_EXPIRED = re.compile(r"from=<(?P<sender>[^>]*)>, status=expired, returned to sender")


@attrs.frozen
class LogLine:
    """One postfix line: when (unix seconds, or None), which program, and its text."""

    time: float | None
    program: str
    text: str


@attrs.frozen
class MessageIdSeen:
    """``cleanup``: the queue id holds this Message-ID (not yet proof that postfix took it)."""

    queue_id: str
    message_id: str


@attrs.frozen
class Accepted:
    """``qmgr ... (queue active)``: postfix has the message in its queue."""

    queue_id: str
    sender: str
    size: int
    recipients: int


@attrs.frozen
class Delivery:
    """One delivery attempt for one recipient."""

    queue_id: str
    recipient: str
    status: str  # sent, deferred, bounced, expired, undeliverable
    dsn: str
    relay: str
    text: str
    time: float | None = None


@attrs.frozen
class Notification:
    """postfix made a bounce (or delay) report under a new queue id: that id is not the message's."""

    queue_id: str
    report_queue_id: str


@attrs.frozen
class Expired:
    """The message stayed queued past ``maximal_queue_lifetime`` and was returned."""

    queue_id: str


@attrs.frozen
class Removed:
    """The queue file is gone: the queue id may be used again from now on."""

    queue_id: str


Event = MessageIdSeen | Accepted | Delivery | Notification | Expired | Removed


def parse_file_line(line: str, year: int) -> LogLine | None:
    """A line of a postfix log file (syslog or ISO stamps), or None for another program's line."""
    line = line.rstrip("\r\n")
    match = _FILE_LINE.match(line)
    when: float | None = None
    if match is not None:
        try:
            stamp = datetime.strptime(f"{year} {match['stamp']}", "%Y %b %d %H:%M:%S")
            when = stamp.replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            when = None
    else:
        match = _ISO_LINE.match(line)
        if match is None:
            return None
        try:
            when = datetime.fromisoformat(match["stamp"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            when = None
    return LogLine(when, match["program"], match["text"])


def parse_mailcow_entry(raw: str | bytes) -> LogLine | None:
    """One JSON entry of mailcow's ``POSTFIX_MAILLOG`` list, or None when it is not a postfix line."""
    try:
        obj: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    program, message = obj.get("program"), obj.get("message")
    if not isinstance(program, str) or not isinstance(message, str) or not program.startswith("postfix"):
        return None
    try:
        when: float | None = float(obj.get("time"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        when = None
    return LogLine(when, program, message)


def event_of(line: LogLine) -> Event | None:
    """What a line says about a queued message, or None when it says nothing this module uses."""
    queued = _QUEUED.match(line.text)
    if queued is None:
        return None
    qid, rest = queued["qid"], queued["rest"]
    if rest == "removed":
        return Removed(qid)
    if line.program.endswith("/cleanup"):
        found = _MESSAGE_ID.match(rest)
        return MessageIdSeen(qid, found["id"]) if found else None
    if (active := _ACTIVE.match(rest)) is not None:
        return Accepted(qid, active["sender"], int(active["size"]), int(active["nrcpt"]))
    if _EXPIRED.match(rest) is not None:
        return Expired(qid)
    if (delivery := _DELIVERY.match(rest)) is not None:
        return Delivery(
            qid,
            delivery["orig"] or delivery["rcpt"],
            delivery["status"],
            delivery["dsn"],
            delivery["relay"],
            delivery["text"] or "",
            line.time,
        )
    if (bounce := _BOUNCE.match(rest)) is not None:
        return Notification(qid, bounce["report"])
    return None


@attrs.frozen
class Filed:
    """An event filed under the Message-ID its queue id held at the time."""

    message_id: str
    event: Event


class LogBook:
    """Follows queue ids to Message-IDs as the lines come, and files each event under its message.

    A queue id is tied to a Message-ID from its ``cleanup`` line to its ``removed`` line; lines of
    a queue id with no tie (its cleanup line was before the window we saw) are dropped. At most
    ``max_open`` ties are kept; the oldest goes first.
    """

    def __init__(self, max_open: int = 100_000) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, str] = OrderedDict()

    def feed(self, lines: Iterable[LogLine]) -> list[Filed]:
        """The events of ``lines`` (in log order) that belong to a known message."""
        out: list[Filed] = []
        for line in lines:
            event = event_of(line)
            if event is None:
                continue
            if isinstance(event, MessageIdSeen):
                self._open[event.queue_id] = event.message_id
                self._open.move_to_end(event.queue_id)
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)
            message_id = self._open.get(event.queue_id)
            if message_id is None:
                continue
            out.append(Filed(message_id, event))
            if isinstance(event, Removed):
                del self._open[event.queue_id]
        return out
