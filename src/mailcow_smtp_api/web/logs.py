"""Log output: JSON lines for log collectors (``--log-format json``), and the text lines twistd
writes by default, rendered with less work (``ClassicText``).

For JSON, every event becomes one JSON object on one line: ``time`` (UTC, ISO 8601), ``level``,
``namespace``, ``message`` (the formatted text) and the event's own fields that are plain values.
The service's own events carry no secrets (no password, key, body or attachment), so nothing is
filtered by name here; Twisted's internal ``log_*`` keys are left out.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, Logger, formatEvent, formatEventAsClassicLogText, formatTime

_PLAIN = (str, int, float, bool, type(None))


def _rendered(event: dict[str, Any]) -> str | None:
    """The event's message as already rendered (``log_text``: ``info_line``'s events, and legacy
    ``log.msg`` ones, whose format is that field alone); None when it has to be formatted."""
    text = event.get("log_text")
    return text if type(text) is str else None


def _text(event: dict[str, Any]) -> str:
    """The event's message: its rendered text when it has one, else Twisted's formatting."""
    text = _rendered(event)
    return formatEvent(event) if text is None else text


def _line(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": _text(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and isinstance(value, _PLAIN):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}"
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def json_lines_observer(out: IO[str]) -> FileLogObserver:
    """An observer writing one JSON object per line to ``out``."""
    return FileLogObserver(out, _line)


class ClassicText:
    """Twisted's classic text line (``formatEventAsClassicLogText``, what twistd writes by default)
    with less work per line: the timestamp is rendered once per second, and an event whose text is
    already rendered (``log_text``) is taken as it is. Any other event (a failure, its own
    ``log_system``, no rendered text) is left to Twisted's formatter; the text is the same either way.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: Any) -> str:
        if type(when) is not float:
            return formatTime(when)
        second = math.floor(when)
        if when - second >= 0.9999995:  # rounds up to the next second's microsecond: rendered as that
            return formatTime(when)
        if second != self._second:
            self._stamp, self._second = formatTime(when), second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        text = _rendered(event)
        if text is None or "log_failure" in event or "log_system" in event:
            return formatEventAsClassicLogText(event)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def text_observer(out: IO[str]) -> FileLogObserver:
    """An observer writing Twisted's classic text lines to ``out`` (``ClassicText``)."""
    return FileLogObserver(out, ClassicText())


def info_line(log: Logger, template: str, **fields: Any) -> None:
    """Log one info event: ``template`` with ``fields``, rendered here once with ``str.format``.

    The event carries every field as usual (for ``--log-format json`` and for observers), but its
    ``log_format`` is the rendered line with its braces escaped: Twisted's observers then format
    a string without fields instead of running their pure-Python formatter over each one, which
    cost more than the rest of the log line per request. The rendered text is also the event's
    ``log_text``, which this module's observers write without formatting anything. The text
    written is the same.
    """
    text = template.format(**fields)
    log.info(text.replace("{", "{{").replace("}", "}}"), log_text=text, **fields)
