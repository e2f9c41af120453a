"""Real provider clients, unchanged from the registries, sending through ``twistd smtpapi`` to postfix.

django-anymail's Mailgun and Postmark backends (Python, in a Django configured by
tests/clients/anymail_send.py) and mailgun.js and postmark.js (Node, tests/clients/node) are
pointed at one sidecar by their base URL and a send key, nothing else. The sidecar has an outbox,
so "queued" means queued: each test waits for what arrives in the sink and reads it with the
email library: headers, text and HTML parts, the attachment's bytes and name, the inline image's
Content-ID against the HTML's ``cid:``, and in batches that each recipient saw only their own
address and values. Each client also meets one refusal (a ``from`` its key may not send as) and
must raise its own error type carrying the sidecar's message.

Nothing is skipped: scripts/test.sh installs Node.js and the npm packages, so a missing ``node``
or ``node_modules`` fails here.
"""

from __future__ import annotations

import base64
import email.policy
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import format_datetime, getaddresses, parseaddr
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    HOST,
    PASSWORD,
    SENDER,
    Sidecar,
    SinkMessage,
    StateAdmin,
    Testbed,
    revive_shared_mariadb,
    start_sidecar,
    wait_until,
)

pytestmark = pytest.mark.integration

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
NODE_CLIENTS = CLIENTS / "node"
OTHER = "other@example.com"  # a mailbox of the same domain that SENDER's key may not send as
PROGRAM_TIMEOUT = 60.0
ARRIVAL_TIMEOUT = 30.0  # the outbox hands a message over at once; postfix delivers within a second or two
SENDER_NAME = "Newsletter Desk"
TEXT = "Plain text part, with umlauts: Grüße.\n"
ATTACHMENT = b"%PDF-1.4\n" + bytes(range(256)) + b"\n%%EOF\n"  # every byte value
ATTACHMENT_NAME = "report.pdf"


def png() -> bytes:
    """A valid 1x1 PNG (mail libraries sniff the image type of inline images)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixel = zlib.compress(b"\x00\xff\x80\x00")  # one row: filter byte, then RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel) + chunk(b"IEND", b"")


LOGO = png()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------ the service


@dataclass(frozen=True)
class Service:
    """The sidecar the clients talk to, the send key of SENDER, the bed behind it and the sidecar's
    state database (SQLite: its outbox and status records)."""

    sidecar: Sidecar
    key: str
    bed: Testbed
    state: Path

    def outbox_rows(self) -> int:
        """How many messages the outbox holds or has a status record of.

        The service makes its tables on the first use of the state database (its outbox's first
        poll, or the first send), which may come after /healthz answers: no table holds none.
        """
        with sqlite3.connect(self.state) as connection:
            made = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'smtpapi_outbox'")
            if made.fetchone() is None:
                return 0
            return int(connection.execute("SELECT COUNT(*) FROM smtpapi_outbox").fetchone()[0])

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def host(self) -> str:
        return f"{HOST}:{self.sidecar.port}"


@pytest.fixture(scope="module")
def service(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One sidecar for the whole module: the bed with example.com, SENDER and OTHER, a send key of
    SENDER (it submits on the plain target, port 10025), and an outbox in SQLite."""
    revive_shared_mariadb()
    testbed.reset_database()
    testbed.clear_messages()
    testbed.add_domain("example.com")
    testbed.add_mailbox(SENDER, PASSWORD)
    testbed.add_mailbox(OTHER, PASSWORD)
    directory = tmp_path_factory.mktemp("clients")
    state = directory / "state.sqlite"
    admin = StateAdmin(testbed.db_url, f"sqlite:{state}")
    key, _ = admin.add_send_key(SENDER)
    sidecar = start_sidecar(testbed, directory, "sidecar", "--state-db", admin.state_url)
    try:
        yield Service(sidecar, key, testbed, state)
    finally:
        sidecar.stop()
        testbed.reset_database()


# ------------------------------------------------------------------------------ running the clients


def client_env() -> dict[str, str]:
    """The environment without proxy settings: the clients must reach loopback directly."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def run_program(argv: list[str], job: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Run one client program with ``job`` on stdin: its ``{"result": ...}`` or ``{"error": ...}``."""
    done = subprocess.run(
        argv, input=json.dumps(job), capture_output=True, text=True, timeout=PROGRAM_TIMEOUT, cwd=cwd, env=client_env(),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv[-1]} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{argv[-1]} printed nothing:\n{done.stderr[-3000:]}"
    answer = json.loads(lines[-1])
    assert isinstance(answer, dict) and set(answer) in ({"result"}, {"error"}), answer
    return answer


def node() -> str:
    """The ``node`` the test command installed; failing (not skipping) without it."""
    found = shutil.which("node")
    assert found, "node is not installed: scripts/test.sh installs Debian's nodejs and npm"
    assert (NODE_CLIENTS / "node_modules" / "mailgun.js").is_dir(), "npm ci has not run in tests/clients/node"
    return found


def mailgun_js(service: Service, domain: str, data: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """``client.messages.create(domain, data)`` of mailgun.js with url = the sidecar."""
    job = {"url": service.url, "key": key or service.key, "domain": domain, "data": data}
    return run_program([node(), "mailgun.mjs"], job, NODE_CLIENTS)


def postmark_js(service: Service, call: str, message: Any) -> dict[str, Any]:
    """``client.sendEmail`` or ``client.sendEmailBatch`` of postmark.js with requestHost = the sidecar."""
    job = {"host": service.host, "token": service.key, "call": call, "message": message}
    return run_program([node(), "postmark.mjs"], job, NODE_CLIENTS)


def anymail(service: Service, esp: str, message: dict[str, Any]) -> dict[str, Any]:
    """One ``AnymailMessage.send()`` through anymail's ``esp`` backend with its API URL = the sidecar."""
    api_url = f"{service.url}/v3" if esp == "mailgun" else f"{service.url}/"
    job = {"esp": esp, "api_url": api_url, "key": service.key, "message": message}
    return run_program([sys.executable, str(CLIENTS / "anymail_send.py")], job, CLIENTS)


def result_of(answer: dict[str, Any]) -> Any:
    assert "result" in answer, f"the client raised: {answer.get('error')}"
    return answer["result"]


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert "error" in answer, f"the client did not raise: {answer.get('result')}"
    return dict(answer["error"])


# ------------------------------------------------------------------------------ what the sidecar answers directly


def raw_mailgun(service: Service, domain: str, fields: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    """The same refusal asked without a client library: (status, JSON answer)."""
    token = base64.b64encode(f"api:{service.key}".encode()).decode()
    request = urllib.request.Request(
        f"{service.url}/v3/{domain}/messages", data=urllib.parse.urlencode(fields).encode(), method="POST",
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    return open_json(request)


def raw_postmark(service: Service, body: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{service.url}/email", data=json.dumps(body).encode(), method="POST",
        headers={"X-Postmark-Server-Token": service.key, "Content-Type": "application/json", "Accept": "application/json"},
    )  # fmt: skip
    return open_json(request)


def open_json(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=PROGRAM_TIMEOUT) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, body = error.code, json.loads(error.read())
    assert isinstance(body, dict), (status, body)
    return status, body


# ------------------------------------------------------------------------------ what arrived


def arrived(bed: Testbed, *recipients: str) -> dict[str, SinkMessage]:
    """The one message delivered to each of ``recipients`` (waiting for them); fails on a second copy."""

    def found() -> dict[str, list[SinkMessage]] | None:
        by_rcpt: dict[str, list[SinkMessage]] = {r: [] for r in recipients}
        for message in bed.messages():
            for rcpt in message.rcpt_to:
                if rcpt in by_rcpt:
                    by_rcpt[rcpt].append(message)
        return by_rcpt if all(by_rcpt.values()) else None

    by_rcpt = wait_until(found, ARRIVAL_TIMEOUT, f"delivery to {', '.join(recipients)}")
    for rcpt, messages in by_rcpt.items():
        assert len(messages) == 1, f"{rcpt} got {len(messages)} messages"
        assert messages[0].rcpt_to == (rcpt,), f"one message went to {messages[0].rcpt_to}"
    return {rcpt: messages[0] for rcpt, messages in by_rcpt.items()}


def addresses(message: EmailMessage, header: str) -> list[str]:
    return [address for _, address in getaddresses(message.get_all(header, []))]


def body_text(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part: {message.get_content_type()}"
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


def leaves(message: Message) -> list[Message]:
    """Every non-multipart part that is not the text or HTML body."""
    return [
        part
        for part in message.walk()
        if not part.is_multipart() and part.get_content_type() not in ("text/plain", "text/html")
    ]


def check_message(
    sink: SinkMessage, *, sender: str, to: str, subject: str, text: str, html: str, cid: str, attachment: str | None = None
) -> None:
    """What every client's full message must look like when it arrives.

    ``cid`` is the inline image's Content-ID without brackets; ``html`` must refer to it as
    ``cid:<cid>``. ``attachment`` is the attachment's file name (ATTACHMENT's bytes), if any.
    """
    message = sink.message
    assert parseaddr(str(message["From"]))[1] == sender and sink.mail_from == sender
    assert addresses(message, "To") == [to]
    assert str(message["Subject"]) == subject
    assert body_text(message, "plain").replace("\r\n", "\n").strip() == text.strip()
    sent_html = body_text(message, "html")
    assert sent_html.strip() == html.strip()
    assert f"cid:{cid}" in sent_html
    parts = leaves(message)
    images = [part for part in parts if part.get_content_type() == "image/png"]
    assert len(images) == 1, [part.get_content_type() for part in parts]
    assert str(images[0]["Content-ID"]).strip() == f"<{cid}>"
    assert images[0].get_payload(decode=True) == LOGO
    assert images[0].get_content_disposition() in ("inline", None)
    files = [part for part in parts if part.get_content_disposition() == "attachment"]
    if attachment is None:
        assert files == []
    else:
        assert [(part.get_filename(), part.get_payload(decode=True)) for part in files] == [(attachment, ATTACHMENT)]
    # The HTML refers to an image inside the same multipart/related as the HTML part.
    related = [part for part in message.walk() if part.get_content_type() == "multipart/related"]
    assert len(related) == 1 and images[0] in list(related[0].walk())


def without_trace_fields(raw: str) -> str:
    """The message as the sidecar wrote it: without the Received fields postfix added on the way
    (their queue ids are random hex that may contain any short value)."""
    lines = raw.splitlines(keepends=True)
    kept: list[str] = []
    dropping = False
    for index, line in enumerate(lines):
        if line in ("\r\n", "\n"):
            return "".join(kept + lines[index:])
        if line[:1] not in (" ", "\t"):
            dropping = line.lower().startswith("received:")
        if not dropping:
            kept.append(line)
    return "".join(kept)


def check_batch(messages: dict[str, SinkMessage], expected: dict[str, dict[str, str]]) -> None:
    """Each recipient's message names only them in To and holds only their own values.

    ``expected`` maps a recipient to the header or body texts its message must have
    (``"Subject"``, ``"text"``, any header name).
    """
    assert set(messages) == set(expected)
    for rcpt, message in messages.items():
        assert addresses(message.message, "To") == [rcpt]
        assert message.message.get_all("Cc") is None and message.message.get_all("Bcc") is None
        for name, value in expected[rcpt].items():
            if name == "text":
                assert body_text(message.message, "plain").strip() == value
            else:
                assert str(message.message[name]) == value, (rcpt, name)
        raw = without_trace_fields(message.raw.decode("utf-8", "replace"))
        for other, values in expected.items():
            if other != rcpt:
                assert other not in raw, f"{rcpt}'s message names {other}"
                for value in values.values():
                    assert value not in raw, f"{rcpt}'s message holds {other}'s {value!r}"


# ------------------------------------------------------------------------------ mailgun.js


HTML = '<p>Hello <b>reader</b></p><img alt="logo" src="cid:logo.png">'


def test_mailgun_js_sends_html_an_attachment_and_an_inline_image(service: Service) -> None:
    """mailgun.js's messages.create with text, HTML, a file attachment and an inline file:
    Mailgun's answer, and the message as it arrives (the inline part's Content-ID is its file name)."""
    rcpt = "mgjs-single@dest.example"
    rows = service.outbox_rows()
    answer = result_of(mailgun_js(service, "example.com", {
        "from": f"{SENDER_NAME} <{SENDER}>",
        "to": [rcpt],
        "subject": "Grüße from mailgun.js",
        "text": TEXT,
        "html": HTML,
        "h:X-Client": "mailgun.js",
        "o:tag": ["newsletter"],
        "attachment": [{"filename": ATTACHMENT_NAME, "contentType": "application/pdf", "base64": b64(ATTACHMENT)}],
        "inline": [{"filename": "logo.png", "contentType": "image/png", "base64": b64(LOGO)}],
    }))  # fmt: skip
    assert answer["status"] == 200 and answer["message"] == "Queued. Thank you.", answer
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", answer["id"]), answer
    assert service.outbox_rows() == rows + 1  # queued in the outbox
    sink = arrived(service.bed, rcpt)[rcpt]
    check_message(
        sink, sender=SENDER, to=rcpt, subject="Grüße from mailgun.js", text=TEXT, html=HTML, cid="logo.png",
        attachment=ATTACHMENT_NAME,
    )  # fmt: skip
    assert parseaddr(str(sink.message["From"]))[0] == SENDER_NAME
    assert str(sink.message["Message-ID"]).strip() == answer["id"]
    assert str(sink.message["X-Client"]) == "mailgun.js"
    assert str(sink.message["X-Mailgun-Tag"]) == "newsletter"


def test_mailgun_js_recipient_variables_batch(service: Service) -> None:
    """A ``recipient-variables`` batch through mailgun.js: one message per recipient, each with
    only its own address in To and its own ``%recipient.NAME%`` values."""
    ann, bob = "mgjs-ann@dest.example", "mgjs-bob@dest.example"
    variables = {ann: {"name": "Ann Abbot", "code": "A-1111"}, bob: {"name": "Bob Burns", "code": "B-2222"}}
    answer = result_of(mailgun_js(service, "example.com", {
        "from": SENDER,
        "to": [ann, bob],
        "subject": "Hello %recipient.name%",
        "text": "Your code is %recipient.code%.",
        "html": "<p>Dear %recipient.name%, your code is %recipient.code%.</p>",
        "h:X-Code": "%recipient.code%",
        "recipient-variables": json.dumps(variables),
    }))  # fmt: skip
    assert answer["status"] == 200 and answer["message"].startswith("Queued. Thank you."), answer
    assert answer["id"].startswith("<") and "refused" not in answer, answer
    messages = arrived(service.bed, ann, bob)
    check_batch(messages, {
        rcpt: {"Subject": f"Hello {v['name']}", "text": f"Your code is {v['code']}.", "X-Code": v["code"]}
        for rcpt, v in variables.items()
    })  # fmt: skip
    for rcpt, v in variables.items():
        assert body_text(messages[rcpt].message, "html").strip() == f"<p>Dear {v['name']}, your code is {v['code']}.</p>"
    ids = {str(m.message["Message-ID"]).strip() for m in messages.values()}
    assert len(ids) == 2 and answer["id"] in ids


def ghost_newsletter(recipients: dict[str, dict[str, str]], **changes: Any) -> dict[str, Any]:
    """The fields Ghost's MailgunClient (ghost/core, services/lib/mailgun-client.js) gives
    mailgun.js for one newsletter batch, with Ghost's own replacement variables."""
    data = {
        "to": list(recipients),
        "from": f"{SENDER_NAME} <{SENDER}>",
        "h:Reply-To": SENDER,
        "subject": "Issue 42 for %recipient.name%",
        "html": '<p>Hi %recipient.name%</p><a href="%recipient.unsubscribe_url%">Unsubscribe</a>',
        "text": "Hi %recipient.name%\nUnsubscribe: %recipient.unsubscribe_url%",
        "recipient-variables": json.dumps(recipients),
        "h:Sender": f"{SENDER_NAME} <{SENDER}>",
        "h:Auto-Submitted": "auto-generated",
        "h:X-Auto-Response-Suppress": "OOF, AutoReply",
        "h:List-Unsubscribe": "<%recipient.list_unsubscribe%>, <%tag_unsubscribe_email%>",
        "h:List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "v:email-id": "email-42",
        "o:tag": ["ghost-email", "newsletter"],
        # Ghost spreads a newsletter over its delivery window with Date.toUTCString() ("... GMT").
        "o:deliverytime": format_datetime(datetime.now(timezone.utc), usegmt=True),
    }
    data.update(changes)
    return data


def test_mailgun_js_ghost_newsletter_batch(service: Service) -> None:
    """A newsletter batch shaped as Ghost sends it through mailgun.js, scheduled for now: Sender
    naming the from mailbox is dropped, Mailgun's own %tag_unsubscribe_email% leaves
    List-Unsubscribe, and each member gets their own name and unsubscribe link."""
    ann, bob = "ghost-ann@dest.example", "ghost-bob@dest.example"
    members = {
        rcpt: {
            "name": name,
            "unsubscribe_url": f"https://blog.example/unsubscribe/?uuid={uuid}",
            "list_unsubscribe": f"https://blog.example/unsubscribe/?uuid={uuid}&key=k{uuid}",
        }
        for rcpt, name, uuid in ((ann, "Ann Abbot", "u-ann"), (bob, "Bob Burns", "u-bob"))
    }
    answer = result_of(mailgun_js(service, "example.com", ghost_newsletter(members)))
    assert answer["status"] == 200 and answer["message"] == "Queued. Thank you.", answer
    messages = arrived(service.bed, ann, bob)
    check_batch(messages, {
        rcpt: {
            "Subject": f"Issue 42 for {m['name']}",
            "text": f"Hi {m['name']}\nUnsubscribe: {m['unsubscribe_url']}",
            "List-Unsubscribe": f"<{m['list_unsubscribe']}>",
        }
        for rcpt, m in members.items()
    })  # fmt: skip
    for rcpt, message in messages.items():
        headers = message.message
        assert parseaddr(str(headers["From"])) == (SENDER_NAME, SENDER)
        assert headers["Sender"] is None and addresses(headers, "Reply-To") == [SENDER]
        assert str(headers["Auto-Submitted"]) == "auto-generated"
        assert str(headers["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
        assert json.loads(str(headers["X-Mailgun-Variables"])) == {"email-id": "email-42"}
        assert str(headers["X-Mailgun-Tag"]) == "ghost-email, newsletter"
        assert "%" not in message.raw.decode("utf-8", "replace"), f"a variable was left in {rcpt}'s message"


def test_mailgun_js_testmode_answers_with_the_message_it_would_send(service: Service) -> None:
    """Ghost's ``bulkEmail.mailgun.testmode`` (``o:testmode: true``, which mailgun.js sends as
    ``yes``): the answer holds, per recipient, the exact message and envelope, and nothing was
    queued or sent (the outbox, which records every message, holds no new row)."""
    ann, bob = "ghost-test-ann@dest.example", "ghost-test-bob@dest.example"
    members = {ann: {"name": "Ann Abbot"}, bob: {"name": "Bob Burns"}}
    rows = service.outbox_rows()
    answer = result_of(mailgun_js(service, "example.com", ghost_newsletter(members, **{"o:testmode": True})))
    assert answer["status"] == 200 and answer["message"] == "Queued. Thank you.", answer
    dry = answer["dry_run"]
    assert isinstance(dry, list) and len(dry) == 2, answer
    for rcpt, entry in zip((ann, bob), dry):
        built = BytesParser(policy=email.policy.default).parsebytes(base64.b64decode(entry["message"]))
        assert addresses(built, "To") == [rcpt]
        assert str(built["Subject"]) == f"Issue 42 for {members[rcpt]['name']}"
        assert entry["envelope"] == {"from": SENDER, "to": [rcpt]}
    assert service.outbox_rows() == rows


def test_mailgun_js_sends_a_mime_message(service: Service) -> None:
    """mailgun.js with ``message`` (a ready MIME message) posts to ``messages.mime``: it arrives as built."""
    rcpt = "mgjs-mime@dest.example"
    mime = EmailMessage()
    mime["From"] = SENDER
    mime["To"] = rcpt
    mime["Subject"] = "Ready-made MIME"
    mime["Date"] = "Wed, 02 Dec 2026 01:00:00 +0000"
    mime["Message-ID"] = "<ready-made.1@example.com>"
    mime.set_content(TEXT)
    mime.add_attachment(ATTACHMENT, maintype="application", subtype="pdf", filename=ATTACHMENT_NAME)
    answer = result_of(mailgun_js(service, "example.com", {"to": rcpt, "message": b64(mime.as_bytes())}))
    assert answer["status"] == 200 and answer["message"] == "Queued. Thank you.", answer
    sink = arrived(service.bed, rcpt)[rcpt]
    assert str(sink.message["Subject"]) == "Ready-made MIME"
    assert str(sink.message["Message-ID"]).strip() == "<ready-made.1@example.com>" == answer["id"]
    assert body_text(sink.message, "plain").strip() == TEXT.strip()
    files = [(p.get_filename(), p.get_payload(decode=True)) for p in leaves(sink.message)]
    assert files == [(ATTACHMENT_NAME, ATTACHMENT)]


def test_mailgun_js_refused_sender_raises_its_api_error(service: Service) -> None:
    """A ``from`` the key may not send as: mailgun.js rejects with its APIError, the status and
    ``details`` being the sidecar's answer."""
    fields = {"from": OTHER, "to": "mgjs-refused@dest.example", "subject": "not mine", "text": "x"}
    error = error_of(mailgun_js(service, "example.com", fields))
    status, body = raw_mailgun(service, "example.com", list(fields.items()))
    assert (status, body.get("code")) == (403, "smtp_unauthorized_sender"), body
    assert error["type"] == "MailgunAPIError" and error["status"] == 403, error
    assert error["details"] == body["message"] and OTHER in body["message"], error


# ------------------------------------------------------------------------------ postmark.js


def postmark_message(rcpt: str, **changes: Any) -> dict[str, Any]:
    """A full Postmark message: text, HTML, an attachment and an inline image."""
    message = {
        "From": f"{SENDER_NAME} <{SENDER}>",
        "To": rcpt,
        "Subject": "Grüße from postmark.js",
        "TextBody": TEXT,
        "HtmlBody": HTML,
        "Headers": [{"Name": "X-Client", "Value": "postmark.js"}],
        "Tag": "welcome",
        "Metadata": {"order": "1234"},
        "MessageStream": "outbound",
        "Attachments": [
            {"Name": ATTACHMENT_NAME, "Content": b64(ATTACHMENT), "ContentType": "application/pdf"},
            {"Name": "logo.png", "Content": b64(LOGO), "ContentType": "image/png", "ContentID": "cid:logo.png"},
        ],
    }
    message.update(changes)
    return message


def check_postmark_result(result: dict[str, Any], rcpt: str) -> None:
    assert result["ErrorCode"] == 0 and result["To"] == rcpt, result
    assert result["Message"] in ("OK", "Message accepted, but delivery may be delayed."), result
    assert result["MessageID"] and result["SubmittedAt"], result


def test_postmark_js_sends_html_an_attachment_and_an_inline_image(service: Service) -> None:
    """postmark.js's sendEmail with every common field: Postmark's answer, and what arrives."""
    rcpt = "pmjs-single@dest.example"
    result = result_of(postmark_js(service, "sendEmail", postmark_message(rcpt)))
    check_postmark_result(result, rcpt)
    sink = arrived(service.bed, rcpt)[rcpt]
    check_message(
        sink, sender=SENDER, to=rcpt, subject="Grüße from postmark.js", text=TEXT, html=HTML, cid="logo.png",
        attachment=ATTACHMENT_NAME,
    )  # fmt: skip
    assert str(sink.message["Message-ID"]).strip() == f"<{result['MessageID']}>"
    assert str(sink.message["X-Client"]) == "postmark.js"
    assert str(sink.message["X-PM-Tag"]) == "welcome"
    assert str(sink.message["X-PM-Metadata-order"]) == "1234"


def test_postmark_js_batch_one_result_per_message(service: Service) -> None:
    """sendEmailBatch with two messages and one the key may not send: one result per message in
    order, the refused one with Postmark's error code, the two others delivered to their own recipient."""
    ann, bob = "pmjs-ann@dest.example", "pmjs-bob@dest.example"
    def one(sender: str, rcpt: str, name: str, code: str) -> dict[str, Any]:
        headers = [{"Name": "X-Code", "Value": code}]
        return {"From": sender, "To": rcpt, "Subject": f"For {name}", "TextBody": f"Code {code}", "Headers": headers}

    batch = [
        one(SENDER, ann, "Ann Abbot", "A-1111"),
        one(OTHER, "pmjs-refused@dest.example", "nobody", "X-0000"),
        one(SENDER, bob, "Bob Burns", "B-2222"),
    ]
    results = result_of(postmark_js(service, "sendEmailBatch", batch))
    assert isinstance(results, list) and len(results) == 3, results
    check_postmark_result(results[0], ann)
    check_postmark_result(results[2], bob)
    assert results[1]["ErrorCode"] == 400 and OTHER in results[1]["Message"], results[1]
    assert results[0]["MessageID"] != results[2]["MessageID"]
    messages = arrived(service.bed, ann, bob)
    check_batch(messages, {
        ann: {"Subject": "For Ann Abbot", "text": "Code A-1111", "X-Code": "A-1111"},
        bob: {"Subject": "For Bob Burns", "text": "Code B-2222", "X-Code": "B-2222"},
    })  # fmt: skip
    for rcpt, result in ((ann, results[0]), (bob, results[2])):
        assert str(messages[rcpt].message["Message-ID"]).strip() == f"<{result['MessageID']}>"


def test_postmark_js_refused_sender_raises_a_postmark_error(service: Service) -> None:
    """A ``From`` the key may not send as: postmark.js rejects with its ApiInputError (HTTP 422)
    carrying the sidecar's ErrorCode and Message."""
    message = {"From": OTHER, "To": "pmjs-refused@dest.example", "Subject": "not mine", "TextBody": "x"}
    error = error_of(postmark_js(service, "sendEmail", message))
    status, body = raw_postmark(service, message)
    assert (status, body["ErrorCode"]) == (422, 400), body
    assert error["postmarkError"] is True and error["class"] == "ApiInputError", error
    assert (error["statusCode"], error["code"], error["message"]) == (422, 400, body["Message"]), error
    assert OTHER in body["Message"]


# ------------------------------------------------------------------------------ django-anymail


def anymail_message(rcpt: str, subject: str, **changes: Any) -> dict[str, Any]:
    """A full message for AnymailMessage: text, HTML with the inline image, an attachment."""
    message = {
        "from_email": f"{SENDER_NAME} <{SENDER}>",
        "to": [rcpt],
        "subject": subject,
        "body": TEXT,
        "html": '<p>Hello <b>reader</b></p><img alt="logo" src="cid:{inline0}">',
        "inline": [{"filename": "logo.png", "base64": b64(LOGO)}],
        "attachments": [{"filename": ATTACHMENT_NAME, "mimetype": "application/pdf", "base64": b64(ATTACHMENT)}],
        "headers": {"X-Client": "django-anymail"},
        "tags": ["welcome"],
    }
    message.update(changes)
    return message


@pytest.mark.parametrize("esp", ["mailgun", "postmark"])
def test_anymail_sends_html_an_attachment_and_an_inline_image(service: Service, esp: str) -> None:
    """anymail's backend sends an AnymailMessage with an inline image made by attach_inline_image:
    anymail reports it queued or sent with the message's id, and it arrives whole."""
    rcpt = f"anymail-{esp}-single@dest.example"
    subject = f"Grüße from anymail's {esp} backend"
    result = result_of(anymail(service, esp, anymail_message(rcpt, subject)))
    assert result["sent"] == 1 and result["status"] in (["queued"], ["sent"]), result
    assert list(result["recipients"]) == [rcpt] and result["recipients"][rcpt]["message_id"] == result["message_id"]
    [cid] = result["cids"]
    sink = arrived(service.bed, rcpt)[rcpt]
    html = f'<p>Hello <b>reader</b></p><img alt="logo" src="cid:{cid}">'
    check_message(sink, sender=SENDER, to=rcpt, subject=subject, text=TEXT, html=html, cid=cid, attachment=ATTACHMENT_NAME)
    message_id = str(sink.message["Message-ID"]).strip()
    assert message_id == (result["message_id"] if esp == "mailgun" else f"<{result['message_id']}>")
    assert str(sink.message["X-Client"]) == "django-anymail"


def test_anymail_mailgun_merge_data_batch(service: Service) -> None:
    """anymail's Mailgun batch: ``merge_data`` becomes ``recipient-variables`` and
    ``merge_headers`` ``h:`` fields; each recipient gets their own message and values."""
    ann, bob = "anymail-mg-ann@dest.example", "anymail-mg-bob@dest.example"
    merge = {ann: {"name": "Ann Abbot", "code": "A-3333"}, bob: {"name": "Bob Burns", "code": "B-4444"}}
    result = result_of(anymail(service, "mailgun", {
        "from_email": SENDER,
        "to": [ann, bob],
        "subject": "Hello %recipient.name%",
        "body": "Your code is %recipient.code%.",
        "merge_data": merge,
        "merge_headers": {ann: {"X-Seat": "1A"}, bob: {"X-Seat": "2B"}},
    }))  # fmt: skip
    assert result["sent"] == 1 and result["status"] == ["queued"], result
    assert set(result["recipients"]) == {ann, bob}
    messages = arrived(service.bed, ann, bob)
    check_batch(messages, {
        ann: {"Subject": "Hello Ann Abbot", "text": "Your code is A-3333.", "X-Seat": "1A"},
        bob: {"Subject": "Hello Bob Burns", "text": "Your code is B-4444.", "X-Seat": "2B"},
    })  # fmt: skip


def test_anymail_postmark_batch(service: Service) -> None:
    """anymail's Postmark batch without a template (``merge_metadata`` and ``merge_headers``) goes
    to ``/email/batch`` with one message per recipient; each result is reported per recipient."""
    ann, bob = "anymail-pm-ann@dest.example", "anymail-pm-bob@dest.example"
    result = result_of(anymail(service, "postmark", {
        "from_email": SENDER,
        "to": [ann, bob],
        "subject": "Your seat",
        "body": "See the X-Seat header.",
        "merge_metadata": {ann: {"customer": "c-ann"}, bob: {"customer": "c-bob"}},
        "merge_headers": {ann: {"X-Seat": "1A"}, bob: {"X-Seat": "2B"}},
    }))  # fmt: skip
    assert result["sent"] == 1 and result["status"] in (["queued"], ["sent"]), result
    assert set(result["recipients"]) == {ann, bob}
    ids = {result["recipients"][r]["message_id"] for r in (ann, bob)}
    assert len(ids) == 2 and None not in ids, result
    messages = arrived(service.bed, ann, bob)
    check_batch(messages, {
        ann: {"X-Seat": "1A", "X-PM-Metadata-customer": "c-ann"},
        bob: {"X-Seat": "2B", "X-PM-Metadata-customer": "c-bob"},
    })  # fmt: skip
    for rcpt in (ann, bob):
        assert str(messages[rcpt].message["Message-ID"]).strip() == f"<{result['recipients'][rcpt]['message_id']}>"


@pytest.mark.parametrize("esp", ["mailgun", "postmark"])
def test_anymail_refused_sender_raises_anymail_api_error(service: Service, esp: str) -> None:
    """A ``from_email`` the key may not send as: anymail raises AnymailRequestsAPIError with the
    HTTP status and the sidecar's message."""
    rcpt = f"anymail-{esp}-refused@dest.example"
    error = error_of(anymail(service, esp, {"from_email": OTHER, "to": [rcpt], "subject": "not mine", "body": "x"}))
    if esp == "mailgun":
        fields = [("from", OTHER), ("to", rcpt), ("subject", "not mine"), ("text", "x")]
        status, body = raw_mailgun(service, "example.com", fields)
        message = body["message"]
    else:
        status, body = raw_postmark(service, {"From": OTHER, "To": rcpt, "Subject": "not mine", "TextBody": "x"})
        message = body["Message"]
    assert status == (403 if esp == "mailgun" else 422), body
    assert error["class"] == "AnymailRequestsAPIError" and error["api_error"] is True, error
    assert error["status_code"] == status and OTHER in message and message in error["text"], error
