"""The durable outbox end to end: ``Prefer: respond-async`` against the bed's real postfix.

Each test starts ``twistd smtpapi`` (its state in SQLite unless said otherwise) and watches what
arrives in the sink, counted by Message-ID, and what ``GET /api/v1/send/status/{id}`` says:

- a message accepted (202) while postfix is stopped is stored, retried, and arrives exactly once
  after postfix starts again;
- synchronous sends gain an ``id`` whose status only the sending key can read;
- ``send_at`` holds a message back until its time, ``DELETE`` cancels one that waits, a bad or too
  distant ``send_at`` is refused, and a full outbox answers 503 with Retry-After;
- asynchronous sends need a plain target, and a wrong password is refused at acceptance;
- with ``--postfix-log file:<the bed's log>``, each message ends as postfix's log says: delivered
  with the sink's relay and dsn 2.0.0, bounced (bounce.test) with the DSN of the error transport,
  deferred (defer.test) and then delivered once the route is fixed;
- with ``--webhook-url``, a receiver on loopback gets signed events (Standard Webhooks) and an
  event it answered 500 comes again with the same id.

Every wait is bounded; postfix is always started again after a test that stopped it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    API_KEY,
    HANDED_OVER,
    HOST,
    PASSWORD,
    RESPOND_ASYNC,
    SENDER,
    STATUS_PATH,
    Sidecar,
    Testbed,
    message_status,
    new_api_key,
    postfix_queue,
    postfix_stopped,
    route_defer,
    sink_message_ids,
    wait_for_state,
    wait_until,
)
from .test_abuse import code
from .test_send_api import example_body, post

pytestmark = pytest.mark.integration

RECIPIENT = "recipient@example.com"
DEFERRED_RECIPIENT = "x@defer.test"  # testbed.sh: a transport to a closed loopback port
BOUNCED_RECIPIENT = "x@bounce.test"  # testbed.sh: error:5.1.1
SINK_RELAY = "127.0.0.1[127.0.0.1]:10026"  # how postfix's log names the sink as relay
# The first retry after postfix refused the connection comes 1-15 s later (backoff with jitter);
# then postfix takes it at once.
HANDOVER_TIMEOUT = 45.0
LOG_TIMEOUT = 20.0  # postfix logs a delivery to the sink within a second or two
WEBHOOK_SECRET = "0123456789abcdef0123456789abcdef"  # 32 characters


def rfc3339(moment: float) -> str:
    """A unix time as RFC 3339 UTC (``2027-01-31T09:00:00Z``)."""
    return datetime.fromtimestamp(moment, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def send_async(service: Sidecar, key: str = API_KEY, **changes: Any) -> tuple[int, Any, Any]:
    """POST one send with ``Prefer: respond-async``: (status, body, headers)."""
    return post(service.url, example_body(**changes), key, dict(RESPOND_ASYNC))


def accepted(service: Sidecar, key: str = API_KEY, **changes: Any) -> dict[str, Any]:
    """An asynchronous send that must be accepted: its 202 answer's entry."""
    status, body, headers = send_async(service, key, **changes)
    assert status == 202, body
    entry = body[0]
    assert headers["Location"] == STATUS_PATH + entry["id"], dict(headers)
    return dict(entry)


def state_path(tmp_path: Path) -> Path:
    """The SQLite state database these tests give the sidecar."""
    return tmp_path / "state.sqlite"


def state_option(tmp_path: Path) -> tuple[str, str]:
    """``--state-db sqlite:<tmp_path>/state.sqlite``."""
    return ("--state-db", f"sqlite:{state_path(tmp_path)}")


def stored_rows(tmp_path: Path) -> list[tuple[str, str]]:
    """(id, status) of every row of the SQLite outbox table (none when it does not exist yet)."""
    path = state_path(tmp_path)
    if not path.exists():
        return []
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "smtpapi_outbox" not in tables:
            return []
        return [(str(r[0]), str(r[1])) for r in connection.execute("SELECT id, status FROM smtpapi_outbox")]


def arrived_once(bed: Testbed, message_id: str, timeout: float = HANDOVER_TIMEOUT) -> None:
    """Wait until ``message_id`` is in the sink and postfix's queue is empty; then it is there exactly once."""
    wait_until(lambda: sink_message_ids(bed)[message_id] >= 1, timeout, f"{message_id} in the sink")
    wait_until(lambda: not postfix_queue(bed), 15.0, "postfix's queue empty")
    assert sink_message_ids(bed)[message_id] == 1, sink_message_ids(bed)


def postfix_log_option(bed: Testbed) -> tuple[str, str]:
    """``--postfix-log file:<the bed's postfix log>``."""
    return ("--postfix-log", f"file:{bed.log_path('postfix')}")


# ------------------------------------------------------------------------------ accept now, deliver later


def test_accepted_while_postfix_is_stopped_and_delivered_once_it_starts(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """With postfix stopped the send is answered 202 (stored, checked, mailcow-shaped) and waits as
    ``queued`` after a failed attempt; once postfix runs again it arrives exactly once and its
    status is ``submitted``."""
    service = sidecar(*state_option(tmp_path))
    with postfix_stopped(bed) as start_postfix:
        status, body, headers = send_async(service, subject="while postfix is stopped")
        assert status == 202, body
        entry = body[0]
        assert entry["type"] == "success"
        assert entry["msg"] == ["smtp_mail_accepted", SENDER, RECIPIENT]
        assert entry["status"] == "queued"
        assert headers["Preference-Applied"] == "respond-async"
        assert headers["Location"] == f"{STATUS_PATH}{entry['id']}"
        message_id = entry["message_id"]

        def tried() -> dict[str, Any] | None:
            found = message_status(service, entry["id"])[1]
            return found if found["status"] == "queued" and found["attempts"] else None

        record = wait_until(tried, 15.0, "a first attempt against the stopped postfix")
        assert record["attempts"][0]["outcome"] == "retry", record
        assert record["message_id"] == message_id and record["from"] == SENDER
        assert [r["address"] for r in record["recipients"]] == [RECIPIENT]
        assert sink_message_ids(bed)[message_id] == 0
        start_postfix()

    record = wait_for_state(service, entry["id"], HANDED_OVER, HANDOVER_TIMEOUT)
    arrived_once(bed, message_id)
    assert record["queue_id"], record
    assert record["attempts"][-1]["outcome"] == "submitted" and record["attempts"][-1]["smtp_code"] == 250, record
    assert all(a["outcome"] == "retry" for a in record["attempts"][:-1]), record
    # What arrived is the message that was accepted, sent on postfix's plain port.
    (delivered,) = [m for m in bed.messages() if str(m.message["Message-ID"]) == message_id]
    assert str(delivered.message["Subject"]) == "while postfix is stopped"
    assert delivered.mail_from == SENDER and delivered.rcpt_to == (RECIPIENT,)
    assert f"with ESMTP id {record['queue_id']}" in str(delivered.message["Received"])


def test_synchronous_sends_gain_an_id_whose_status_only_their_key_reads(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """A synchronous 200 carries ``id``; GET with the sending key answers 200 with the queue id and
    the attempt; another valid key, and an unknown id, get 404 ``smtp_status_not_found``, and
    another key cannot cancel it either."""
    other_key = bed.add_api_key(new_api_key(), allow_from="127.0.0.1")
    service = sidecar(*state_option(tmp_path))
    status, body, _ = post(service.url, example_body(subject="sent at once"))
    assert status == 200, body
    sent = body[0]
    assert sent["msg"][0] == "smtp_mail_sent" and sent["id"], sent

    code_, record = message_status(service, sent["id"])
    assert code_ == 200, record
    assert record["id"] == sent["id"] and record["status"] == "submitted"
    assert record["queue_id"] == sent["queue_id"] and record["message_id"] == sent["message_id"]
    assert [(a["outcome"], a["smtp_code"], a["queue_id"]) for a in record["attempts"]] == [("submitted", 250, sent["queue_id"])]
    assert record["recipients"] == [{"address": RECIPIENT, "status": "pending"}]

    for key, message in ((other_key, sent["id"]), (API_KEY, secrets.token_hex(16))):
        for method in ("GET", "DELETE"):
            code_, refused = message_status(service, message, key, method)
            assert (code_, code(refused)) == (404, "smtp_status_not_found"), (method, refused)
    # The other key works, it only has no record of this message.
    assert post(service.url, example_body(subject="the other key"), other_key)[0] == 200
    arrived_once(bed, sent["message_id"], timeout=10.0)
    assert message_status(service, sent["id"])[1]["status"] == "submitted"


# ------------------------------------------------------------------------------ later, canceled, refused


def test_scheduled_send_waits_for_its_time_and_a_canceled_one_never_arrives(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """``send_at`` 6 s ahead: ``scheduled`` and absent from the sink until then, delivered once
    after; a second message with the same time canceled with DELETE is ``canceled`` and never
    arrives; DELETE after the hand-over is 409 ``smtp_not_cancelable``."""
    service = sidecar(*state_option(tmp_path))
    due = time.time() + 6
    later = accepted(service, subject="scheduled", send_at=rfc3339(due))
    canceled = accepted(service, subject="canceled", send_at=rfc3339(due))
    due = float(int(due))  # send_at has whole seconds
    for entry in (later, canceled):
        assert entry["status"] == "scheduled" and entry["send_at"] == due, entry
    assert message_status(service, later["id"])[1]["status"] == "scheduled"

    code_, record = message_status(service, canceled["id"], method="DELETE")
    assert (code_, record["status"]) == (200, "canceled"), record
    assert message_status(service, canceled["id"])[1]["status"] == "canceled"
    code_, again = message_status(service, canceled["id"], method="DELETE")
    assert (code_, code(again)) == (409, "smtp_not_cancelable"), again

    # Nothing arrives before its time.
    while time.time() < due - 0.5:
        assert not sink_message_ids(bed), "a scheduled message arrived early"
        time.sleep(0.2)
    record = wait_for_state(service, later["id"], HANDED_OVER, 20.0)
    arrived_once(bed, later["message_id"], timeout=10.0)
    (delivered,) = bed.messages()
    assert delivered.path.stat().st_mtime >= due, (delivered.path.stat().st_mtime, due)
    assert record["attempts"][-1]["at"] >= due, record
    assert record["send_at"] == due

    code_, late = message_status(service, later["id"], method="DELETE")
    assert (code_, code(late)) == (409, "smtp_not_cancelable"), late
    time.sleep(2)  # the canceled message had the same time: it would be there by now
    assert canceled["message_id"] not in sink_message_ids(bed)
    assert message_status(service, canceled["id"])[1]["status"] == "canceled"


def test_send_at_needs_prefer_and_must_lie_within_max_schedule(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """400 ``smtp_invalid_send_at`` for ``send_at`` without ``Prefer: respond-async``, beyond
    ``--max-schedule``, in the past and without a zone; none of them is stored or sent."""
    service = sidecar(*state_option(tmp_path), "--max-schedule", "3600")
    now = time.time()
    status, body, _ = post(service.url, example_body(send_at=rfc3339(now + 60)))
    assert (status, code(body), body[0]["field"]) == (400, "smtp_invalid_send_at", "send_at"), body
    for send_at in (rfc3339(now + 7200), rfc3339(now - 3600), "2030-01-31T09:00:00"):
        status, body, _ = send_async(service, send_at=send_at)
        assert (status, code(body)) == (400, "smtp_invalid_send_at"), (send_at, body)
    # Within the window it is accepted.
    entry = accepted(service, send_at=rfc3339(now + 1800))
    assert entry["status"] == "scheduled"
    assert stored_rows(tmp_path) == [(entry["id"], "scheduled")]
    assert not sink_message_ids(bed)


def test_a_full_outbox_answers_503_with_retry_after_and_stores_nothing(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """``--outbox-max-messages 2``: two scheduled messages fill it, the third gets 503
    ``smtp_outbox_full`` with Retry-After and is not stored; a canceled one makes room again.
    ``--outbox-max-bytes``: a message larger than the room left is refused the same way."""
    service = sidecar(*state_option(tmp_path), "--outbox-max-messages", "2")
    later = rfc3339(time.time() + 3000)
    first = accepted(service, send_at=later)
    accepted(service, send_at=later)
    status, body, headers = send_async(service, send_at=later)
    assert (status, code(body)) == (503, "smtp_outbox_full"), body
    assert int(headers["Retry-After"]) > 0
    status, body, headers = send_async(service)  # also a message to send at once
    assert (status, code(body)) == (503, "smtp_outbox_full"), body
    assert len(stored_rows(tmp_path)) == 2
    # Synchronous sends do not wait in the outbox: they still go.
    assert post(service.url, example_body(subject="synchronous"))[0] == 200
    assert message_status(service, first["id"], method="DELETE")[0] == 200
    accepted(service, send_at=later)
    assert send_async(service, send_at=later)[0] == 503
    service.stop()

    # The smallest byte bound, 1 MiB: a 600 kB message fits, a second one does not, a small one does.
    by_size = sidecar(*state_option(tmp_path), "--outbox-max-messages", "100", "--outbox-max-bytes", "1048576")
    text = ("x" * 75 + "\n") * 8000
    assert accepted(by_size, body=text, send_at=later)["status"] == "scheduled"
    status, body, headers = send_async(by_size, body=text, send_at=later)
    assert (status, code(body)) == (503, "smtp_outbox_full"), body
    assert int(headers["Retry-After"]) > 0
    assert accepted(by_size, body="small", send_at=later)["status"] == "scheduled"


def test_respond_async_needs_a_plain_target(bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    """Without a plain target in ``--smtp-allow``, ``Prefer: respond-async`` is 409
    ``smtp_async_unavailable`` (nothing stored) while the synchronous send still works; a request
    naming the STARTTLS port gets the same 409 where a plain target exists."""
    service = sidecar(*state_option(tmp_path), "--smtp-allow", f"{HOST}:10587,{HOST}:10465/tls")
    status, body, _ = send_async(service)
    assert (status, code(body)) == (409, "smtp_async_unavailable"), body
    assert stored_rows(tmp_path) == []
    assert post(service.url, example_body())[0] == 200
    service.stop()

    with_plain = sidecar(*state_option(tmp_path))
    status, body, _ = send_async(with_plain, smtp_port=10587)
    assert (status, code(body)) == (409, "smtp_async_unavailable"), body


def test_wrong_password_is_refused_at_acceptance_and_a_send_key_needs_none(
    bed: Testbed, sidecar: Callable[..., Sidecar], state_admin: Any, tmp_path: Path
) -> None:
    """With ``Prefer: respond-async`` a wrong mailbox password is 403 ``smtp_auth_failed`` at once
    (checked by the sidecar, nothing stored, nothing sent); a send key without any password is
    accepted and its message arrives once."""
    token, _ = state_admin.add_send_key(SENDER)
    service = sidecar("--state-db", state_admin.state_url)
    started = time.monotonic()
    status, body, _ = send_async(service, password="not-the-password")
    assert (status, code(body)) == (403, "smtp_auth_failed"), body
    assert time.monotonic() - started < 5
    status, body, _ = send_async(service, password=None)  # an admin key needs the password
    assert (status, code(body)) == (400, "smtp_auth_required"), body

    keyed = accepted(service, key=token, password=None, subject="send key, no password")
    assert keyed["status"] == "queued"
    record = wait_for_state(service, keyed["id"], HANDED_OVER, 15.0, key=token)
    arrived_once(bed, keyed["message_id"], timeout=10.0)
    # The admin key did not send it: it has no record of it.
    assert message_status(service, keyed["id"])[0] == 404
    assert record["attempts"][-1]["smtp_code"] == 250
    state_file = Path(state_admin.state_url.removeprefix("sqlite:"))
    with sqlite3.connect(state_file) as connection:
        rows = list(connection.execute("SELECT status, body FROM smtpapi_outbox"))
    assert [status for status, _ in rows] == [record["status"]]
    assert all(stored is None for _, stored in rows), "the body is dropped once postfix has the message"
    assert PASSWORD.encode() not in state_file.read_bytes()


# ------------------------------------------------------------------------------ postfix's log


def test_with_the_postfix_log_a_message_ends_delivered(bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    """``--postfix-log file:<log>``: the status moves on to ``delivered``, the recipient with
    status ``sent``, dsn 2.0.0, the sink as relay, postfix's text and a time."""
    service = sidecar(*state_option(tmp_path), *postfix_log_option(bed))
    entry = accepted(service, subject="delivered")
    record = wait_for_state(service, entry["id"], ("delivered",), LOG_TIMEOUT)
    (recipient,) = record["recipients"]
    assert recipient["address"] == RECIPIENT and recipient["status"] == "sent", recipient
    assert recipient["dsn"] == "2.0.0" and recipient["relay"] == SINK_RELAY, recipient
    assert recipient["text"] and recipient["time"], recipient
    arrived_once(bed, entry["message_id"], timeout=10.0)

    # A synchronous send's record follows postfix's log too.
    status, body, _ = post(service.url, example_body(subject="synchronous, delivered"))
    assert status == 200, body
    synchronous = wait_for_state(service, body[0]["id"], ("delivered",), LOG_TIMEOUT)
    assert synchronous["recipients"][0]["dsn"] == "2.0.0"


def test_with_the_postfix_log_a_bounce_ends_bounced(bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    """To bounce.test (postfix's ``error:5.1.1`` transport): ``bounced`` with dsn 5.1.1; the
    non-delivery report postfix sends to the sender has its own queue id, and its delivery to the
    sink does not make the message ``delivered``."""
    service = sidecar(*state_option(tmp_path), *postfix_log_option(bed))
    entry = accepted(service, to=[BOUNCED_RECIPIENT], subject="bounced")
    record = wait_for_state(service, entry["id"], ("bounced",), LOG_TIMEOUT)
    (recipient,) = record["recipients"]
    assert recipient["address"] == BOUNCED_RECIPIENT and recipient["status"] == "bounced", recipient
    assert recipient["dsn"].startswith("5.") and recipient["dsn"] == "5.1.1", recipient
    queue_id = record["queue_id"]
    assert queue_id

    def report_queue_id() -> str | None:
        for line in bed.log_text("postfix").splitlines():
            if f" {queue_id}: sender non-delivery notification: " in line:
                return line.rsplit(": ", 1)[1].strip()
        return None

    report = wait_until(report_queue_id, LOG_TIMEOUT, "postfix's non-delivery notification")
    assert report != queue_id
    # The report reaches the sender (the sink) with an empty envelope sender.
    wait_until(lambda: any(m.mail_from == "" for m in bed.messages()), LOG_TIMEOUT, "the bounce report in the sink")
    wait_until(lambda: f" {report}: removed" in bed.log_text("postfix"), LOG_TIMEOUT, "the report's delivery logged")
    time.sleep(1.5)  # the sidecar follows the log: time to (wrongly) apply the report's lines
    after = message_status(service, entry["id"])[1]
    assert after["status"] == "bounced" and after["queue_id"] == queue_id, after
    assert entry["message_id"] not in sink_message_ids(bed)


def test_with_the_postfix_log_a_deferred_message_is_delivered_once_its_route_is_fixed(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """To defer.test (a transport to a closed port): ``deferred`` with a 4.x.x dsn; after
    ``testbed.sh route-defer sink`` (which flushes the queue) it ends ``delivered``, once."""
    service = sidecar(*state_option(tmp_path), *postfix_log_option(bed))
    entry = accepted(service, to=[DEFERRED_RECIPIENT], subject="deferred, then delivered")
    try:
        record = wait_for_state(service, entry["id"], ("deferred",), LOG_TIMEOUT)
        (recipient,) = record["recipients"]
        assert recipient["status"] == "deferred" and recipient["dsn"].startswith("4."), recipient
        assert entry["message_id"] not in sink_message_ids(bed)
        route_defer(bed, "sink")
        record = wait_for_state(service, entry["id"], ("delivered",), 30.0)
    finally:
        route_defer(bed, "closed")
    (recipient,) = record["recipients"]
    assert recipient["status"] == "sent" and recipient["dsn"] == "2.0.0" and recipient["relay"] == SINK_RELAY, recipient
    arrived_once(bed, entry["message_id"], timeout=10.0)


# ------------------------------------------------------------------------------ webhooks


class HookReceiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on loopback: records every POST; answers 500 to the first, 204 after."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _HookHandler)
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The ``--webhook-url`` of this receiver."""
        return f"http://{HOST}:{self.server_address[1]}/hook"

    def answered(self, status: int) -> list[tuple[dict[str, str], bytes]]:
        """The posts answered with ``status``."""
        with self.lock:
            return [(headers, body) for headers, body, answer in self.posts if answer == status]


class _HookHandler(http.server.BaseHTTPRequestHandler):
    server: HookReceiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            answer = 500 if not self.server.posts else 204
            self.server.posts.append(({k.lower(): v for k, v in self.headers.items()}, body, answer))
        self.send_response(answer)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook_receiver() -> Iterator[HookReceiver]:
    """A running ``HookReceiver``, shut down after the test."""
    receiver = HookReceiver()
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()


def signature_ok(headers: dict[str, str], body: bytes, secret: str = WEBHOOK_SECRET) -> bool:
    """Standard Webhooks: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret's bytes."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    return f"v1,{expected}" in headers["webhook-signature"].split(" ")


def test_webhooks_are_signed_and_retried_after_a_500(
    bed: Testbed, sidecar: Callable[..., Sidecar], tmp_path: Path, hook_receiver: HookReceiver
) -> None:
    """``--webhook-url`` on loopback: ``submitted`` and ``delivered`` events arrive as JSON with
    the message's status, signed (webhook-id, webhook-timestamp, webhook-signature); the receiver
    answers 500 to the first post, and that event arrives again with the same id."""
    service = sidecar(
        *state_option(tmp_path),
        *postfix_log_option(bed),
        "--webhook-url", hook_receiver.url,
        "--webhook-allow-hosts", HOST,
        "--webhook-secret", WEBHOOK_SECRET,
    )  # fmt: skip
    entry = accepted(service, subject="with webhooks")
    wait_for_state(service, entry["id"], ("delivered",), LOG_TIMEOUT)

    def events_of(status: int) -> dict[str, str]:
        found: dict[str, str] = {}
        for headers, body in hook_receiver.answered(status):
            event = json.loads(body)
            if event["message"]["id"] == entry["id"]:
                found[headers["webhook-id"]] = event["type"]
        return found

    # The first post was answered 500; the retry comes 5-10 s later (backoff with jitter).
    wait_until(lambda: hook_receiver.answered(500), 30.0, "a first webhook post")
    def both_answered() -> dict[str, str] | None:
        found = events_of(204)
        return found if sorted(found.values()) == ["delivered", "submitted"] else None

    types = wait_until(both_answered, 40.0, "submitted and delivered events answered 204")
    ((failed_headers, failed_body),) = hook_receiver.answered(500)
    assert failed_headers["webhook-id"] in types, "the event answered 500 came again with the same id"
    again = [(h, b) for h, b in hook_receiver.answered(204) if h["webhook-id"] == failed_headers["webhook-id"]]
    assert again and json.loads(again[0][1])["type"] == json.loads(failed_body)["type"]
    now = time.time()
    for headers, body in hook_receiver.answered(500) + hook_receiver.answered(204):
        assert headers["content-type"].startswith("application/json")
        assert signature_ok(headers, body), headers
        assert abs(int(headers["webhook-timestamp"]) - now) < 120, headers
        event = json.loads(body)
        assert event["id"] == headers["webhook-id"]
        assert event["message"]["message_id"] == entry["message_id"] and event["message"]["status"] == event["type"]
    assert not signature_ok(failed_headers, failed_body + b" "), "a changed body fails the check"
