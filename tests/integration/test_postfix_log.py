"""postfix's own log says what became of a message: followed by FileLog in the bed's real log file,
and by RedisLog in the same lines shipped into Redis as mailcow's syslog-ng ships them.

Mail goes in on the bed's plain port (127.0.0.1:10025, like mailcow's port 25 for internal
clients). A normal recipient is delivered to the sink, ``bounce.test`` is bounced at once with a
report to the sender, ``defer.test`` is deferred until its route is fixed. The followers run on the
real reactor; sending and the bed's script run in threads so that they keep polling meanwhile.
"""

from __future__ import annotations

import secrets
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mailcow_smtp_api.core.config import RedisUrl
from mailcow_smtp_api.core.maillog import Filed
from mailcow_smtp_api.mailcow.postfixlog import FileLog, MessageTrace, PostfixLog, RedisLog
from mailcow_smtp_api.mailcow.redisio import MailcowRedis
from tests.integration.conftest import HOST, PLAIN_PORT, POSTFIX_LOG_DB, REDIS_PORT, LogShipper, Testbed

pytestmark = pytest.mark.integration

SENDER = "sender@example.com"
WAIT = 20.0  # seconds: the whole log file is read first, and a retry waits for postfix's queue run


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def send(rcpt: str, message_id: str) -> str:
    """Hand one message to postfix's plain port; postfix's queue id from its answer to DATA."""
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = rcpt
    message["Subject"] = "postfix log test"
    message["Message-ID"] = message_id
    message.set_content("Where did this message go?\n")
    with smtplib.SMTP(HOST, PLAIN_PORT, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(SENDER)
        code, answer = smtp.rcpt(rcpt)
        assert code == 250, (code, answer)
        code, answer = smtp.data(message.as_bytes())
        assert code == 250, (code, answer)
    return answer.decode().rsplit(" ", 1)[-1]  # "2.0.0 Ok: queued as 9865D20C04A"


class Followers:
    """A FileLog on the bed's postfix log and a RedisLog on the shipped list, running together."""

    def __init__(self, bed: Testbed) -> None:
        reactor = _reactor()
        self.bed = bed
        self.redis = MailcowRedis(reactor, RedisUrl(HOST, REDIS_PORT, None, POSTFIX_LOG_DB), timeout=5)
        self.file = FileLog(str(bed.log_path()), reactor, poll_interval=0.1)
        self.list = RedisLog(self.redis, reactor, poll_interval=0.2)
        self.filed: dict[str, list[Filed]] = {"file": [], "redis": []}
        self.file.subscribe(self.filed["file"].append)
        self.list.subscribe(self.filed["redis"].append)

    @property
    def both(self) -> dict[str, PostfixLog]:
        return {"file": self.file, "redis": self.list}

    async def __aenter__(self) -> Followers:
        self.file.start()
        self.list.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for follower in self.both.values():
            stopped = follower.stop()
            if stopped is not None:
                await stopped
        await self.redis.close()

    async def wait(self, message_id: str, done: Callable[[MessageTrace], bool], what: str) -> dict[str, MessageTrace]:
        """Each follower's trace of ``message_id`` once ``done`` holds for it (fail after WAIT s)."""
        reactor = _reactor()
        deadline = reactor.seconds() + WAIT
        while True:
            traces = {name: follower.trace(message_id) for name, follower in self.both.items()}
            if all(trace is not None and done(trace) for trace in traces.values()):
                return {name: trace for name, trace in traces.items() if trace is not None}
            if reactor.seconds() >= deadline:
                pytest.fail(f"{what}: not seen within {WAIT} s in both logs: {traces}\n{self.bed.log_tail(15)}")
            await deferLater(reactor, 0.1, lambda: None)


def results(trace: MessageTrace) -> list[tuple[str, str, str, str]]:
    return [(d.queue_id, d.recipient, d.status, d.dsn) for d in trace.deliveries]


def statuses_of(trace: MessageTrace, status: str) -> bool:
    return any(d.status == status for d in trace.deliveries)


def new_message_id(kind: str) -> str:
    return f"<postfix-log-{kind}-{secrets.token_hex(6)}@example.com>"


@pytest_twisted.ensureDeferred
async def test_a_delivered_message_is_accepted_and_sent_in_both_logs(
    clean_testbed: Testbed, postfix_log_shipper: LogShipper
) -> None:
    """The queue id postfix answered with was accepted and sent to the sink; a follower started later
    finds the same in the file (read from its beginning)."""
    message_id = new_message_id("sent")
    async with Followers(clean_testbed) as logs:
        queue_id = await deferToThread(send, "someone@example.net", message_id)
        traces = await logs.wait(message_id, lambda t: statuses_of(t, "sent"), "the delivery")
        for name, trace in traces.items():
            assert trace.queue_ids == [queue_id], name
            assert trace.accepted_queue_id == queue_id, name
            assert results(trace) == [(queue_id, "someone@example.net", "sent", "2.0.0")], name
            assert trace.deliveries[0].relay == f"{HOST}[{HOST}]:{clean_testbed.sink_port}", name
            covered = logs.both[name].covered
            assert covered is not None and trace.accepted_at is not None
            assert covered[0] <= trace.accepted_at <= covered[1], name
            assert logs.both[name].caught_up_at is not None, name
        assert postfix_log_shipper.shipped > 0
        assert [f.event for f in logs.filed["file"] if f.message_id == message_id] == [
            f.event for f in logs.filed["redis"] if f.message_id == message_id
        ]
    delivered = await deferToThread(clean_testbed.wait_for_messages, 1)
    assert [m.message["Message-ID"] for m in delivered] == [message_id]
    # After a restart of the sidecar, the file still proves what postfix did with the message.
    async with Followers(clean_testbed) as later:
        again = await later.wait(message_id, lambda t: statuses_of(t, "sent"), "the delivery, read again")
        assert results(again["file"]) == [(queue_id, "someone@example.net", "sent", "2.0.0")]


@pytest_twisted.ensureDeferred
async def test_a_bounce_has_its_dsn_and_a_report_under_another_queue_id(
    clean_testbed: Testbed, postfix_log_shipper: LogShipper
) -> None:
    """bounce.test bounces with 5.1.1; the non-delivery report has its own queue id, and its delivery
    to the sender is in the report's trace, not the message's."""
    message_id = new_message_id("bounce")
    async with Followers(clean_testbed) as logs:
        queue_id = await deferToThread(send, "x@bounce.test", message_id)
        traces = await logs.wait(message_id, lambda t: bool(t.notifications), "the bounce and its report")
        for name, trace in traces.items():
            assert trace.accepted_queue_id == queue_id, name
            assert [(d.status, d.dsn) for d in trace.deliveries] == [("bounced", "5.1.1")], name
            assert "bounce.test bounces every message" in trace.deliveries[0].text, name
            report = trace.notifications[0].report_queue_id
            assert [n.queue_id for n in trace.notifications] == [queue_id], name
            assert report != queue_id, name
            assert trace.queue_ids == [queue_id], name
        [report_message] = await deferToThread(clean_testbed.wait_for_messages, 1)
        assert report_message.rcpt_to == (SENDER,) and report_message.mail_from == ""
        report_id = str(report_message.message["Message-ID"])
        reports = await logs.wait(report_id, lambda t: statuses_of(t, "sent"), "the report's delivery")
        for name, report_trace in reports.items():
            assert report_trace.queue_ids == [traces[name].notifications[0].report_queue_id], name
            assert results(report_trace)[0][1:] == (SENDER, "sent", "2.0.0"), name


@pytest_twisted.ensureDeferred
async def test_a_deferred_message_is_sent_once_its_route_is_fixed(
    clean_testbed: Testbed, postfix_log_shipper: LogShipper, defer_route: Callable[[str], None]
) -> None:
    """defer.test is deferred (4.4.1, connection refused); once routed to the sink and flushed, the same
    queue id is sent; the trace keeps both attempts in order, and the first acceptance."""
    message_id = new_message_id("defer")
    async with Followers(clean_testbed) as logs:
        queue_id = await deferToThread(send, "x@defer.test", message_id)
        deferred = await logs.wait(message_id, lambda t: statuses_of(t, "deferred"), "the deferral")
        for name, trace in deferred.items():
            assert results(trace)[0] == (queue_id, "x@defer.test", "deferred", "4.4.1"), name
            assert "Connection refused" in trace.deliveries[0].text, name
        first_accepted = {name: trace.accepted_at for name, trace in deferred.items()}
        await deferToThread(defer_route, "sink")
        traces = await logs.wait(message_id, lambda t: statuses_of(t, "sent"), "the delivery after the fix")
        for name, trace in traces.items():
            assert trace.accepted_queue_id == queue_id and trace.accepted_at == first_accepted[name], name
            kinds = [status for _, _, status, _ in results(trace)]
            assert kinds[-1] == "sent" and set(kinds[:-1]) == {"deferred"}, (name, kinds)
            assert trace.deliveries[-1].relay == f"{HOST}[{HOST}]:{clean_testbed.sink_port}", name
    delivered = await deferToThread(clean_testbed.wait_for_messages, 1)
    assert [m.message["Message-ID"] for m in delivered] == [message_id]
