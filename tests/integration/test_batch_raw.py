"""End to end: the native batch, raw and dry-run routes through a real ``twistd smtpapi`` and a real
postfix + dovecot; what arrives is read from the sink."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import API_KEY, PASSWORD, SENDER, Sidecar, Testbed
from .test_send_api import HTTP_TIMEOUT, example_body

pytestmark = pytest.mark.integration


def call(service: Sidecar, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{service.url}/api/v1/send/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_batch_delivers_each_good_message_and_answers_each(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    service = sidecar()
    messages = [
        example_body(to=[f"batch{i}@example.com"], subject=f"batch {i}") for i in range(4)
    ]
    messages[2]["from"] = "nobody-owns-this@example.com"
    messages[2]["smtp_user"] = SENDER
    status, body = call(service, "batch", {"messages": messages})
    assert status == 200, body
    assert [r["code"] for r in body["results"]] == ["smtp_mail_sent", "smtp_mail_sent", "smtp_unauthorized_sender", "smtp_mail_sent"]
    arrived = bed.wait_for_messages(3)
    assert sorted(m.message["Subject"] for m in arrived) == ["batch 0", "batch 1", "batch 3"]
    by_subject = {m.message["Subject"]: m for m in arrived}
    assert by_subject["batch 3"].rcpt_to == ("batch3@example.com",)
    assert by_subject["batch 0"].message["Message-ID"] == body["results"][0]["message_id"]
    time.sleep(0.3)
    assert len(bed.messages()) == 3


def test_a_raw_message_arrives_as_written_without_its_bcc(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    service = sidecar()
    raw = (
        f"From: Sender <{SENDER}>\nTo: recipient@example.com\nBcc: hidden@example.com\n"
        "Subject: raw route\nX-Own: kept\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
        "Hello from a message the caller built.\n"
    ).encode()
    status, body = call(
        service,
        "raw",
        {
            "message": base64.b64encode(raw).decode(),
            "envelope": {"to": ["recipient@example.com", "hidden@example.com"]},
            "password": PASSWORD,
        },
    )
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert message.mail_from == SENDER
    assert sorted(message.rcpt_to) == ["hidden@example.com", "recipient@example.com"]
    assert b"hidden@example.com" not in message.raw
    assert message.message["X-Own"] == "kept"
    assert message.message["Message-ID"] == body[0]["message_id"]
    assert message.message.get_content().strip() == "Hello from a message the caller built."


def test_a_dry_run_sends_nothing_and_shows_what_would_arrive(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    service = sidecar()
    status, body = call(service, "email", example_body(subject="dry", dry_run=True))
    assert status == 200, body
    built = base64.b64decode(body[0]["message"])
    assert b"Subject: dry\r\n" in built
    assert body[0]["envelope"] == {"from": SENDER, "to": ["recipient@example.com"]}
    time.sleep(0.5)
    assert bed.messages() == []
