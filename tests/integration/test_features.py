"""End to end: inline images, custom headers, Message-ID, List-Unsubscribe and Idempotency-Key.

The curl examples are read from README.md (each follows an ``<!-- example: NAME -->`` line) and run
with curl itself against a real ``twistd smtpapi``, real postfix + dovecot; what postfix delivered
is read from the sink. Only the URL of the examples changes.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Sidecar, Testbed, twistd_path
from .test_send_api import API_KEY, HTTP_TIMEOUT, example_body, post

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://127.0.0.1:8080"
EXAMPLES = ("inline-image", "headers-and-threading", "message-id", "list-unsubscribe", "idempotency-key")
QUEUE_TIMEOUT = 15.0
STATE_DB = "smtpapi_state_features"


def readme_example(name: str) -> str:
    """The shell text of the README example named ``name``."""
    text = README.read_text()
    marker = f"<!-- example: {name} -->\n```sh\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("\n```", start)]


def run_example(name: str, url: str, cwd: Path) -> tuple[int, Any, dict[str, str]]:
    """Run a README example with bash; returns (HTTP status, JSON body, response headers in lower case)."""
    script = readme_example(name).replace(README_URL, url)
    script = script.replace(
        "curl -X POST", "curl -s -S -o body.json -D headers.txt -w '%{http_code}' --max-time 60 -X POST"
    )
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=HTTP_TIMEOUT + 5, check=False)
    assert result.returncode == 0, result.stderr
    headers = {}
    for line in (cwd / "headers.txt").read_text().splitlines()[1:]:
        name_, _, value = line.partition(":")
        if value:
            headers[name_.strip().lower()] = value.strip()
    return int(result.stdout.strip()), json.loads((cwd / "body.json").read_text()), headers


def png(width: int = 4, height: int = 3) -> bytes:
    """A small valid PNG (RGB, filter 0 rows) made with zlib, so the test needs no image library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(bytes((x * 60, y * 80, 200)) for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def settled_messages(bed: Testbed) -> list[Any]:
    """The sink's messages once postfix's queue is empty (polled every 50 ms, at most QUEUE_TIMEOUT s)."""
    deadline = time.monotonic() + QUEUE_TIMEOUT
    while True:
        queued = subprocess.run(
            ["postqueue", "-c", str(bed.directory / "postfix"), "-j"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
        if not queued or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert not queued, f"postfix still holds messages after {QUEUE_TIMEOUT} s: {queued[:500]}"
    return bed.messages()


@pytest.fixture
def service(bed: Testbed, sidecar: Callable[..., Sidecar]) -> Sidecar:
    """A running sidecar against the bed (its state database is a SQLite file in the test's folder)."""
    return sidecar()


def test_every_readme_example_is_run_here() -> None:
    """The README's named examples are exactly the ones this module runs."""
    assert tuple(re.findall(r"<!-- example: ([a-z0-9-]+) -->", README.read_text())) == EXAMPLES


# --------------------------------------------------------------------------- inline images


def test_inline_image_example_arrives_as_related_part(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The README's inline image arrives in multipart/related beside the HTML, its Content-ID matching the cid:."""
    logo = png()
    (tmp_path / "logo.png").write_bytes(logo)
    status, body, _ = run_example("inline-image", service.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    msg = message.message
    assert msg.get_content_type() == "multipart/alternative"
    text, related = msg.iter_parts()
    assert text.get_content().strip() == "Our new logo is attached."
    assert related.get_content_type() == "multipart/related"
    html, image = related.iter_parts()
    assert "src='cid:logo@example.com'" in html.get_content()
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_type() == "image/png"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == logo


def test_cid_without_a_part_is_refused_and_nothing_sent(service: Sidecar, bed: Testbed) -> None:
    """A cid: reference with no matching attachment answers 400 smtp_missing_inline_part before SMTP."""
    status, body, _ = post(service.url, example_body(html_body='<img src="cid:nothing@example.com">'))
    assert (status, body[0]["msg"], body[0]["field"]) == (400, "smtp_missing_inline_part", "html_body")
    assert settled_messages(bed) == []


# --------------------------------------------------------------------------- headers, ids, unsubscribe


def test_headers_and_threading_example_arrives(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """Custom headers and the In-Reply-To / References pair arrive as written."""
    status, body, _ = run_example("headers-and-threading", service.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    msg = message.message
    assert msg.get_all("X-Order-Id") == ["1234"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<order-1234@shop.example.com>"
    assert msg["References"] == "<order-1234@shop.example.com>"


@pytest.mark.parametrize("name", ["Bcc", "DKIM-Signature", "content-type", "X-Request-Id"])
def test_owned_headers_are_refused_before_smtp(service: Sidecar, bed: Testbed, name: str) -> None:
    """A header the service owns answers 400 smtp_header_not_allowed; nothing reaches postfix."""
    before = bed.log_text("postfix").count("connect from")
    status, body, _ = post(service.url, example_body(headers={name: "x@evil.example"}))
    assert (status, body[0]["msg"], body[0]["field"]) == (400, "smtp_header_not_allowed", f"headers.{name}")
    assert bed.log_text("postfix").count("connect from") == before
    assert settled_messages(bed) == []


def test_callers_message_id_arrives_unchanged(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The README's message_id is the delivered Message-ID and the answer's message_id."""
    status, body, _ = run_example("message-id", service.url, tmp_path)
    assert status == 200, body
    assert body[0]["message_id"] == "<invoice-2026-0042@example.com>"
    (message,) = bed.wait_for_messages(1)
    assert b"\nMessage-ID: <invoice-2026-0042@example.com>\n" in b"\n" + message.raw
    assert message.message.get_all("Message-ID") == ["<invoice-2026-0042@example.com>"]


def test_list_unsubscribe_example_writes_one_click_headers(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The README's list_unsubscribe gives List-Unsubscribe with both targets and the RFC 8058 POST header."""
    status, body, _ = run_example("list-unsubscribe", service.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    msg = message.message
    assert msg["List-Unsubscribe"] == "<https://example.com/unsubscribe?u=42&t=0f3a9c>, <mailto:unsubscribe@example.com>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_success_answer_reports_queue_id_and_each_recipient(service: Sidecar, bed: Testbed) -> None:
    """The answer names postfix's queue id (found in postfix's log) and each envelope recipient's reply."""
    status, body, _ = post(service.url, example_body(cc=["cc@example.com"], bcc=["bcc@example.com"]))
    assert status == 200, body
    answer = body[0]
    assert [r["address"] for r in answer["recipients"]] == ["recipient@example.com", "cc@example.com", "bcc@example.com"]
    assert all(r["smtp_code"] == 250 and r["smtp_text"] for r in answer["recipients"])
    assert re.fullmatch(r"[0-9A-Za-z]+", answer["queue_id"])
    bed.wait_for_messages(1)
    assert f"{answer['queue_id']}: message-id={answer['message_id']}" in bed.log_text("postfix")


# --------------------------------------------------------------------------- Idempotency-Key


def test_idempotency_example_twice_sends_one_message(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The README's keyed request run twice: one message delivered, the second answer replayed and marked."""
    first = run_example("idempotency-key", service.url, tmp_path)
    second = run_example("idempotency-key", service.url, tmp_path)
    assert first[0] == 200, first[1]
    assert "idempotent-replayed" not in first[2]
    assert (second[0], second[1]) == (first[0], first[1])
    assert second[2]["idempotent-replayed"] == "true"
    messages = settled_messages(bed)
    assert [m.message["Subject"] for m in messages] == ["Order 1234 confirmed"]
    assert messages[0].message["Message-ID"] == first[1][0]["message_id"]


def test_same_key_with_another_body_is_a_conflict(service: Sidecar, bed: Testbed) -> None:
    """A used key with a different body answers 409 and sends nothing more."""
    key = {"Idempotency-Key": "conflict-1"}
    assert post(service.url, example_body(), headers=key)[0] == 200
    status, body, _ = post(service.url, example_body(subject="something else"), headers=key)
    assert (status, body[0]["msg"]) == (409, "smtp_idempotency_mismatch")
    assert len(settled_messages(bed)) == 1


def concurrent_posts(urls: list[str], body: dict[str, Any], key: str) -> list[tuple[int, Any, Any]]:
    """POST the same body with the same key to each URL at the same moment (one thread each)."""
    start = threading.Barrier(len(urls))
    answers: list[Any] = [None] * len(urls)

    def one(index: int, url: str) -> None:
        start.wait(10)
        answers[index] = post(url, body, headers={"Idempotency-Key": key})

    threads = [threading.Thread(target=one, args=(i, url)) for i, url in enumerate(urls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HTTP_TIMEOUT + 5)
    assert all(answer is not None for answer in answers)
    return answers


def assert_sent_once(answers: list[tuple[int, Any, Any]]) -> None:
    """Exactly one answer is the original send; the others are in-flight refusals or marked replays."""
    originals = [a for a in answers if a[0] == 200 and a[2].get("Idempotent-Replayed") is None]
    assert len(originals) == 1, [(a[0], a[1]) for a in answers]
    for status, body, headers in answers:
        if status == 409:
            assert body[0]["msg"] == "smtp_idempotency_in_flight"
            assert int(headers["Retry-After"]) > 0
        else:
            assert status == 200 and body == originals[0][1]


def test_two_concurrent_requests_with_one_key_send_once(service: Sidecar, bed: Testbed) -> None:
    """Two simultaneous requests with the same key: one message; the other waits its turn (409) or replays."""
    answers = concurrent_posts([service.url, service.url], example_body(subject="concurrent"), "race-1")
    assert_sent_once(answers)
    assert [m.message["Subject"] for m in settled_messages(bed)] == ["concurrent"]


@pytest.fixture
def shared_state_db(bed: Testbed) -> Iterator[str]:
    """A fresh MariaDB database for the sidecars' state (not mailcow's), as several instances share it."""
    connection = bed.connect(database=False)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{STATE_DB}`")
        cursor.execute(f"CREATE DATABASE `{STATE_DB}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    try:
        yield f"mysql://root@127.0.0.1:3306/{STATE_DB}"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{STATE_DB}`")
        connection.close()


def test_instances_sharing_a_state_database_send_once(
    bed: Testbed, sidecar: Callable[..., Sidecar], shared_state_db: str
) -> None:
    """Two sidecars on one MariaDB state database: the same keyed request to both, at once, sends once."""
    first = sidecar("--state-db", shared_state_db)
    second = sidecar("--state-db", shared_state_db)
    body = example_body(subject="two instances")
    answers = concurrent_posts([first.url, second.url, first.url, second.url], body, "shared-1")
    assert_sent_once(answers)
    status, _, headers = post(second.url, body, headers={"Idempotency-Key": "shared-1"})
    assert (status, headers["Idempotent-Replayed"]) == (200, "true")
    assert [m.message["Subject"] for m in settled_messages(bed)] == ["two instances"]
    rows = bed.execute(f"SELECT idem_key, record_state, http_status FROM `{STATE_DB}`.smtpapi_idempotency")
    assert rows == [(b"shared-1", "done", 200)]
    assert API_KEY not in json.dumps([str(r) for r in bed.execute(f"SELECT * FROM `{STATE_DB}`.smtpapi_idempotency")])


def test_state_database_equal_to_mailcows_is_refused_at_start(bed: Testbed, tmp_path: Path) -> None:
    """--state-db naming mailcow's database stops the service at start with a one-line reason."""
    result = subprocess.run(
        [
            str(twistd_path()), "-n", "--pidfile=", "smtpapi",
            "--db", bed.db_url, "--state-db", bed.db_url, "--smtp-host", "127.0.0.1", "--smtp-port", "10587",
            "--smtp-allow", "127.0.0.1:10587",
        ],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    assert result.returncode != 0
    assert "--state-db must not be the --db database" in result.stdout + result.stderr
