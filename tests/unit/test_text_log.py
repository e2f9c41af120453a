"""The text log lines: ``ClassicText`` writes exactly what Twisted's classic formatter writes, and
twistd uses it when its text log goes to standard output."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogEvent, Logger, LogLevel, LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from mailcow_smtp_api import tap
from mailcow_smtp_api.web.logs import ClassicText, info_line

TEMPLATE = "send {request_id} ip={client_ip} from={sender} status={status}"


def _info_event(when: float, sender: str = "a@example.org") -> LogEvent:
    seen: list[LogEvent] = []
    info_line(Logger(namespace="smtpapi", observer=LogPublisher(seen.append)), TEMPLATE,
              request_id="00ff", client_ip="192.0.2.1", sender=sender, status=200)  # fmt: skip
    [event] = seen
    event["log_time"] = when
    return event


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


@given(
    when=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    sender=st.text(max_size=30),
)
def test_a_rendered_line_is_what_twisted_writes(when: float, sender: str) -> None:
    """For info_line's events at any time (second boundaries included) and any text (braces, new
    lines), the line is Twisted's; one formatter reused across events keeps each second right."""
    formatter = ClassicText()
    for moment in (when, when + 0.5, when + 0.9999996, when + 1.0, when):
        event = _info_event(moment, sender)
        assert formatter(event) == formatEventAsClassicLogText(event)


@pytest.mark.parametrize(
    "event",
    [
        {"log_format": "plain {x}", "x": 1, "log_time": 1.5e9, "log_level": LogLevel.warn, "log_namespace": "n"},
        {"log_text": "legacy", "log_format": "{log_text}", "log_system": "-", "log_time": 1.5e9},
        {"log_text": "no level", "log_format": "{log_text}", "log_time": 1.5e9},
        {"log_text": "int time", "log_format": "{log_text}", "log_time": 1500000000, "log_level": LogLevel.info},
        {"log_text": "no time", "log_format": "{log_text}", "log_level": LogLevel.info},
        {"log_text": "failed", "log_format": "{log_text}", "log_time": 1.5e9, "log_failure": _failure()},
        {"log_text": b"bytes", "log_format": "{log_text}", "log_time": 1.5e9},
        {"log_format": None, "log_time": 1.5e9},
    ],
)
def test_other_events_are_written_as_twisted_writes_them(event: dict[str, Any]) -> None:
    """Events of other shapes (no rendered text, a system, a failure, odd times) come out the same."""
    assert ClassicText()(event) == formatEventAsClassicLogText(event)


@pytest.mark.parametrize(
    "options, fast",
    [
        (["-n", "smtpapi"], True),
        (["-n", "--logfile=-", "smtpapi"], True),
        (["-n", "--logfile=/tmp/smtpapi-test.log", "smtpapi"], False),
        (["-n", "--syslog", "smtpapi"], False),
        (["--logfile=/tmp/smtpapi-test.log", "smtpapi"], False),
        (["-n", "--logger=twisted.logger.textFileLogObserver", "smtpapi"], False),
    ],
)
def test_twistd_writes_text_to_stdout_with_it_and_keeps_files_and_syslog(options: list[str], fast: bool) -> None:
    """twistd's --logger becomes the text logger only where twistd would write text to stdout."""
    parsed = ServerOptions()
    parsed.parseOptions(options)
    assert (parsed["logger"] is tap.text_logger) is fast


def test_json_stays_json() -> None:
    """--log-format json keeps its own logger."""
    parsed = ServerOptions()
    parsed.parseOptions(["-n", "smtpapi", "--log-format", "json"])
    assert parsed["logger"] is tap.json_logger
