"""Log lines rendered once: the same text as Twisted's own formatting, every field still in the event."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import LogEvent, Logger, LogPublisher, formatEvent, formatEventAsClassicLogText

from mailcow_smtp_api.web.logs import info_line, json_lines_observer

TEMPLATE = "send {request_id} ip={client_ip} from={sender} rcpts={rcpts} ms={ms}"
FIELDS: dict[str, Any] = {
    "request_id": "0123456789abcdef",
    "client_ip": "192.0.2.7",
    "sender": "we{i}rd}{@example.org",  # braces are valid in a local part
    "rcpts": 3,
    "ms": 12,
}


def _events() -> list[LogEvent]:
    seen: list[LogEvent] = []
    publisher = LogPublisher(seen.append)
    info_line(Logger(namespace="smtpapi", observer=publisher), TEMPLATE, **FIELDS)
    return seen


def test_the_text_is_what_str_format_gives_and_every_field_stays() -> None:
    """Formatted by Twisted, the event reads as the template with its fields; the fields are all there."""
    [event] = _events()
    assert formatEvent(event) == TEMPLATE.format(**FIELDS)
    assert {name: event[name] for name in FIELDS} == FIELDS
    assert event["log_format"].format(**event) == TEMPLATE.format(**FIELDS)  # what observers in tests do
    line = formatEventAsClassicLogText(event)
    assert line is not None and line.endswith(f"[smtpapi#info] {TEMPLATE.format(**FIELDS)}\n")


def test_json_lines_keep_the_message_and_the_fields() -> None:
    """--log-format json writes the same message and each field as its own key."""
    [event] = _events()
    out = io.StringIO()
    json_lines_observer(out)(event)
    record = json.loads(out.getvalue())
    assert record["message"] == TEMPLATE.format(**FIELDS)
    assert {name: record[name] for name in FIELDS} == FIELDS
    assert record["level"] == "info" and record["namespace"] == "smtpapi"
