"""Log output: JSON lines for log collectors (``--log-format json``).

Every event becomes one JSON object on one line: ``time`` (UTC, ISO 8601), ``level``,
``namespace``, ``message`` (the formatted text) and the event's own fields that are plain values.
The service's own events carry no secrets (no password, key, body or attachment), so nothing is
filtered by name here; Twisted's internal ``log_*`` keys are left out.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, Logger, formatEvent

_PLAIN = (str, int, float, bool, type(None))


def _line(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
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


def info_line(log: Logger, template: str, **fields: Any) -> None:
    """Log one info event: ``template`` with ``fields``, rendered here once with ``str.format``.

    The event carries every field as usual (for ``--log-format json`` and for observers), but its
    ``log_format`` is the rendered line with its braces escaped: Twisted's observers then format
    a string without fields instead of running their pure-Python formatter over each one, which
    cost more than the rest of the log line per request. The text written is the same.
    """
    text = template.format(**fields)
    log.info(text.replace("{", "{{").replace("}", "}}"), **fields)
