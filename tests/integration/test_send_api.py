"""End to end: real HTTP to a real ``twistd smtpapi``, real postfix + dovecot, mail read from the sink.

The curl examples are those of the API document, run with curl itself; only the URL changes.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import API_KEY, PASSWORD, SENDER, Sidecar, Testbed

pytestmark = pytest.mark.integration

HTTP_TIMEOUT = 60

# The examples from the API document, verbatim but for the URL ($URL), which points at the test server.
CURL_EXAMPLES = {
    "basic": r"""curl -X POST "$URL/api/v1/send/email" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: YOUR-API-KEY" \
  -d '{
    "from": "sender@example.com",
    "to": ["recipient@example.com"],
    "subject": "Test Email",
    "body": "This is a test email sent via the SMTP API."
  }'""",
    "authenticated": r"""curl -X POST "$URL/api/v1/send/email" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: YOUR-API-KEY" \
  -d '{
    "from": "sender@example.com",
    "to": ["recipient@example.com"],
    "subject": "Test Email",
    "body": "This is a test email.",
    "smtp_port": 587,
    "password": "your-mailbox-password"
  }'""",
    "html_cc_bcc": r"""curl -X POST "$URL/api/v1/send/email" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: YOUR-API-KEY" \
  -d '{
    "from": "sender@example.com",
    "to": ["recipient@example.com"],
    "cc": ["cc@example.com"],
    "bcc": ["bcc@example.com"],
    "subject": "HTML Email",
    "body": "Plain text version",
    "html_body": "<html><body><h1>Hello!</h1><p>This is an HTML email.</p></body></html>",
    "password": "your-mailbox-password"
  }'""",
    "attachment": r"""# First, base64 encode your file
FILE_CONTENT=$(base64 -w 0 document.pdf)

curl -X POST "$URL/api/v1/send/email" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: YOUR-API-KEY" \
  -d "{
    \"from\": \"sender@example.com\",
    \"to\": [\"recipient@example.com\"],
    \"subject\": \"Email with Attachment\",
    \"body\": \"Please find the attached document.\",
    \"password\": \"your-mailbox-password\",
    \"attachments\": [{
      \"filename\": \"document.pdf\",
      \"content\": \"${FILE_CONTENT}\",
      \"content_type\": \"application/pdf\"
    }]
  }"
""",
}


@pytest.fixture
def service(bed: Testbed, sidecar: Callable[..., Sidecar]) -> Sidecar:
    """A running sidecar against the bed, on 587 by default."""
    return sidecar()


def run_curl(script: str, url: str, cwd: Path) -> tuple[int, Any]:
    """Run an example with bash (curl -s -w to learn the status); returns (status, JSON body)."""
    script = script.replace("$URL", url).replace("curl -X POST", "curl -s -S -o body.json -w '%{http_code}' --max-time 60 -X POST")
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=HTTP_TIMEOUT + 5, check=False)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip()), json.loads((cwd / "body.json").read_text())


def post(url: str, body: Any, key: str = API_KEY, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """POST JSON; returns (status, parsed body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/api/v1/send/email",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": key, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def example_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": SENDER,
        "to": ["recipient@example.com"],
        "subject": "Test Email",
        "body": "This is a test email.",
        "password": PASSWORD,
    }
    body.update(changes)
    return body


def test_basic_example_without_password_asks_for_credentials(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The unauthenticated example answers smtp_auth_required on the default (587) target and sends nothing."""
    status, body = run_curl(CURL_EXAMPLES["basic"], service.url, tmp_path)
    assert status == 400
    assert body[0]["msg"] == "smtp_auth_required"
    assert bed.messages() == []


def test_authenticated_example_arrives(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The authenticated example is delivered with the right headers and envelope."""
    status, body = run_curl(CURL_EXAMPLES["authenticated"].replace('"smtp_port": 587', '"smtp_port": 10587'), service.url, tmp_path)
    assert status == 200, body
    assert body[0]["msg"] == ["smtp_mail_sent", SENDER, "recipient@example.com"]
    (message,) = bed.wait_for_messages(1)
    assert message.mail_from == SENDER
    assert message.rcpt_to == ("recipient@example.com",)
    msg = message.message
    assert msg["From"] == SENDER and msg["To"] == "recipient@example.com"
    assert msg["Subject"] == "Test Email"
    assert msg["Date"] is not None
    assert msg["Message-ID"] == body[0]["message_id"]
    assert msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content().strip() == "This is a test email."
    assert body[0]["queue_id"] and body[0]["queue_id"] in bed.log_text("postfix")


def test_html_cc_bcc_example_keeps_bcc_out_of_headers(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """Text+HTML arrive as multipart/alternative; Bcc is an envelope recipient only."""
    status, body = run_curl(CURL_EXAMPLES["html_cc_bcc"], service.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert sorted(message.rcpt_to) == ["bcc@example.com", "cc@example.com", "recipient@example.com"]
    assert b"bcc@example.com" not in message.raw
    assert message.message["Cc"] == "cc@example.com"
    assert message.message.get_content_type() == "multipart/alternative"
    html = message.message.get_body(preferencelist=("html",))
    assert html is not None and "<h1>Hello!</h1>" in html.get_content()
    text = message.message.get_body(preferencelist=("plain",))
    assert text is not None and text.get_content().strip() == "Plain text version"


def test_attachment_example_delivers_exact_bytes(service: Sidecar, bed: Testbed, tmp_path: Path) -> None:
    """The attachment example's file arrives byte for byte with its name and type."""
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 300 + b"\n%%EOF\n"
    (tmp_path / "document.pdf").write_bytes(pdf)
    status, body = run_curl(CURL_EXAMPLES["attachment"], service.url, tmp_path)
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    attachments = list(message.message.iter_attachments())
    assert len(attachments) == 1
    assert attachments[0].get_filename() == "document.pdf"
    assert attachments[0].get_content_type() == "application/pdf"
    assert attachments[0].get_payload(decode=True) == pdf


def test_implicit_tls_port_delivers(service: Sidecar, bed: Testbed) -> None:
    """A request naming the 465-like port is submitted over implicit TLS and arrives."""
    status, body, _ = post(service.url, example_body(smtp_port=10465, subject="over implicit TLS"))
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert message.message["Subject"] == "over implicit TLS"


def test_app_password_and_display_names(service: Sidecar, bed: Testbed) -> None:
    """An app password logs in; display names and an IDN recipient domain survive."""
    bed.add_app_password(SENDER, "app-secret-1")
    body = example_body(
        **{
            "from": '"Doe, Jane" <sender@example.com>',
            "to": ["Zoë <kunde@bücher.example>"],
            "password": None,
            "app_password": "app-secret-1",
            "subject": "Grüße",
        }
    )
    status, answer, _ = post(service.url, body)
    assert status == 200, answer
    (message,) = bed.wait_for_messages(1)
    assert message.rcpt_to == ("kunde@xn--bcher-kva.example",)
    assert message.message["From"].addresses[0].display_name == "Doe, Jane"
    assert message.message["Subject"] == "Grüße"


def test_dot_lines_and_long_lines_arrive_exactly(service: Sidecar, bed: Testbed) -> None:
    """Lines of a single dot around 16 KiB chunk boundaries and 5000-character lines arrive intact."""
    filler = "a" * 70 + "\n"
    text = "".join(filler if i % 3 else ".\n" for i in range(1000)) + "." + "z" * 5000 + "\nQUIT\nRCPT TO:<x@evil.example>\n.\n"
    status, answer, _ = post(service.url, example_body(body=text))
    assert status == 200, answer
    (message,) = bed.wait_for_messages(1)
    assert message.rcpt_to == ("recipient@example.com",)
    assert message.message.get_content().replace("\r\n", "\n") == text


def test_wrong_password_is_auth_failed(service: Sidecar, bed: Testbed) -> None:
    """A wrong mailbox password answers 403 smtp_auth_failed with postfix's 535, and nothing is sent."""
    status, body, _ = post(service.url, example_body(password="wrong-password"))
    assert status == 403
    assert body[0]["msg"] == "smtp_auth_failed"
    assert body[0]["detail"]["smtp_code"] == 535
    assert "wrong-password" not in json.dumps(body)
    assert bed.messages() == []


def test_foreign_sender_is_refused_before_smtp(service: Sidecar, bed: Testbed) -> None:
    """A from the mailbox does not own is refused with 403 and no SMTP session is opened."""
    before = bed.log_text("postfix").count("connect from")
    status, body, _ = post(service.url, example_body(**{"from": "boss@example.com"}))
    assert status == 403
    assert body[0]["msg"] == "smtp_unauthorized_sender"
    assert bed.log_text("postfix").count("connect from") == before
    assert bed.messages() == []


def test_sender_allowed_through_an_alias(service: Sidecar, bed: Testbed) -> None:
    """An alias pointing at the mailbox may be used as from; postfix agrees and delivers."""
    bed.add_alias("team@example.com", f"{SENDER},other@example.com")
    status, body, _ = post(service.url, example_body(**{"from": "team@example.com", "smtp_user": SENDER}))
    assert status == 200, body
    (message,) = bed.wait_for_messages(1)
    assert message.mail_from == "team@example.com"


def test_api_key_failures_are_mailcow_shaped(service: Sidecar, bed: Testbed) -> None:
    """Wrong key -> 401; read-only key -> 403; key not allowed from this IP -> 401 naming the IP."""
    assert post(service.url, example_body(), key="WRONG-KEY")[:2] == (401, {"type": "error", "msg": "authentication failed"})
    ro = bed.add_api_key(access="ro")
    assert post(service.url, example_body(), key=ro)[:2] == (403, {"type": "error", "msg": "API read/write access denied"})
    elsewhere = bed.add_api_key(allow_from="192.0.2.10")
    assert post(service.url, example_body(), key=elsewhere)[:2] == (
        401,
        {"type": "error", "msg": "api access denied for ip 127.0.0.1"},
    )
    assert bed.messages() == []


def test_smtp_target_not_allowed_is_refused(service: Sidecar, bed: Testbed) -> None:
    """A host or port outside --smtp-allow is refused before any connection."""
    for changes in ({"smtp_host": "127.0.0.2"}, {"smtp_port": 2525}):
        status, body, _ = post(service.url, example_body(**changes))
        assert (status, body[0]["msg"]) == (403, "smtp_host_not_allowed")


def test_unreachable_postfix_is_503_with_retry_after(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """Nothing listening on the allowed port: 503 smtp_error with Retry-After."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    running = sidecar("--smtp-allow", f"127.0.0.1:10587,127.0.0.1:{closed_port}")
    status, body, headers = post(running.url, example_body(smtp_port=closed_port))
    assert status == 503
    assert body[0]["msg"] == "smtp_error"
    assert int(headers["Retry-After"]) > 0


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback TCP server that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_hanging_postfix_times_out_with_504(bed: Testbed, sidecar: Callable[..., Sidecar], silent_server: int) -> None:
    """A server that never greets: 504 smtp_error after --smtp-timeout, well within the bound."""
    running = sidecar("--smtp-allow", f"127.0.0.1:10587,127.0.0.1:{silent_server}", "--smtp-timeout", "2")
    started = time.monotonic()
    status, body, _ = post(running.url, example_body(smtp_port=silent_server))
    assert status == 504
    assert body[0]["msg"] == "smtp_error"
    assert body[0]["detail"]["phase"] == "greeting"
    assert time.monotonic() - started < 15


def test_no_secret_in_logs_or_responses(service: Sidecar, bed: Testbed) -> None:
    """Passwords and the API key never appear in the service's log or its answers."""
    answers = [
        post(service.url, example_body())[1],
        post(service.url, example_body(password="wrong-secret-xyz"))[1],
        post(service.url, example_body(), key="BAD-KEY-123456")[1],
    ]
    text = service.log_text() + json.dumps(answers)
    for secret in (PASSWORD, "wrong-secret-xyz", API_KEY, "BAD-KEY-123456", base64.b64encode(f"\0{SENDER}\0{PASSWORD}".encode()).decode()):
        assert secret not in text
