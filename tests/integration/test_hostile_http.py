"""Hostile HTTP against a real ``twistd smtpapi``: oversized, chunked, slow and lying bodies, floods
of recipients and attachments, and a schema fuzzer over the live OpenAPI document.

Each is refused early (413 or a coded 400), the process's peak RSS stays bounded, and the service
keeps answering: after every test a normal request is still delivered through the real postfix.
The fuzzer's service submits only to a scripted loopback SMTP server, so it sends no real mail.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from .conftest import HOST, SUBMISSION_PORT, Sidecar, Testbed
from .test_faults import (
    API_KEY,
    Certificates,
    FaultServer,
    assert_no_secret,
    certificates,  # noqa: F401
    starttls_server,  # noqa: F401
    message,
    send,
)
from .test_load import status_kib

pytestmark = pytest.mark.integration

LIMIT = 1024 * 1024  # --max-request-bytes for these tests
IO_TIMEOUT = 20.0


@pytest.fixture
def service(bed: Testbed, sidecar: Callable[..., Sidecar]) -> Sidecar:
    """A service with a 1 MiB body limit against the bed."""
    return sidecar("--max-request-bytes", str(LIMIT))


def head(length: int | None, *extra: str) -> bytes:
    """A request head for the send route with the valid key."""
    lines = ["POST /api/v1/send/email HTTP/1.1", "Host: test", "Content-Type: application/json", f"X-API-Key: {API_KEY}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = IO_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (Content-Length, chunked or until close); bounded by ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if "content-length" in headers:
        while len(rest) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[: int(headers["content-length"])]
    else:
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, position = b"", 0
        while True:
            size_end = rest.index(b"\r\n", position)
            size = int(rest[position:size_end], 16)
            if size == 0:
                break
            body += rest[size_end + 2 : size_end + 2 + size]
            position = size_end + 2 + size + 2
    return int(status_line.split()[1]), headers, body


def closed_soon(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection within ``timeout`` (reading and dropping data)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def still_serving(service: Sidecar, bed: Testbed, token: str) -> None:
    """A normal request is delivered through postfix, exactly once."""
    answer = send(service.url, message(token, smtp_port=SUBMISSION_PORT))
    assert answer.status == 200, answer.body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        subjects = [str(m.message["Subject"]) for m in bed.messages()]
        if f"fault test {token}" in subjects:
            break
        time.sleep(0.1)
    assert subjects.count(f"fault test {token}") == 1
    assert len(subjects) == 1, subjects


def peak_rss_mib(service: Sidecar) -> float:
    """The service process's peak resident set size so far."""
    return status_kib(service.process.pid, "VmHWM") / 1024


# --------------------------------------------------------------------------- size limits


UPLOAD = 8 * 1024 * 1024  # what a client without Expect: 100-continue sends before it reads


def test_urllib_uploading_a_large_body_reads_the_413(service: Sidecar, bed: Testbed) -> None:
    """urllib (like requests and Node's fetch) sends the whole body before reading: with 8 MiB over
    the 1 MiB limit it still gets the 413 answer, not a broken pipe or a reset, because the server
    reads and drops the rest of the body before it closes (a lingering close)."""
    body = b'{"from": "' + b"x" * UPLOAD + b'"}'
    request = urllib.request.Request(
        f"{service.url}/api/v1/send/email",
        data=body,
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=IO_TIMEOUT)
    assert refused.value.code == 413
    answer = json.loads(refused.value.read())
    assert answer[0]["msg"] == "smtp_request_too_large"
    assert refused.value.headers["X-Request-Id"] == answer[0]["log"][2]["request_id"]
    still_serving(service, bed, "after urllib oversize")


def test_http_client_streaming_a_large_chunked_body_reads_the_413(service: Sidecar, bed: Testbed) -> None:
    """A chunked upload that passes the limit midway gets the 413 too, once it has sent the rest."""
    connection = http.client.HTTPConnection(HOST, service.port, timeout=IO_TIMEOUT)
    try:
        chunks = (b"x" * 65536 for _ in range(UPLOAD // 65536))
        connection.request(
            "POST",
            "/api/v1/send/email",
            body=chunks,
            headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
            encode_chunked=True,
        )
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())[0]["msg"] == "smtp_request_too_large"
    finally:
        connection.close()
    still_serving(service, bed, "after chunked oversize")


def test_declared_oversize_is_refused_before_the_body(service: Sidecar, bed: Testbed) -> None:
    """A Content-Length over the limit, even with Expect: 100-continue, answers 413 at once without
    reading any body, and the connection closes; the service goes on serving."""
    with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head(50 * LIMIT, "Expect: 100-continue"))
        status, _headers, body = read_response(sock)
        assert status == 413
        assert json.loads(body)[0]["msg"] == "smtp_request_too_large"
        assert closed_soon(sock)
    still_serving(service, bed, "after declared oversize")


def test_chunked_and_slow_oversize_bodies_are_cut_off(service: Sidecar, bed: Testbed) -> None:
    """A chunked body and a slowly trickling one are counted as they arrive: 413 once past the limit,
    the connection closes, the service's memory does not follow the upload, and it keeps serving."""
    before = peak_rss_mib(service)
    for pause in (0.0, 0.002):
        with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(head(None, "Transfer-Encoding: chunked"))
            chunk = b"%x\r\n" % 8192 + b"a" * 8192 + b"\r\n"
            sent = 0
            try:
                for _ in range(4 * LIMIT // 8192):
                    sock.sendall(chunk)
                    sent += 8192
                    if pause:
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert LIMIT <= sent <= 4 * LIMIT
            status, _headers, body = read_response(sock)
            assert status == 413 and json.loads(body)[0]["msg"] == "smtp_request_too_large"
    assert peak_rss_mib(service) - before < 32
    still_serving(service, bed, "after chunked oversize")


def test_content_length_lies_send_nothing(service: Sidecar, bed: Testbed) -> None:
    """Declaring more than is sent (then hanging up) and declaring less than is sent: no message goes
    out, the short declaration gets a coded 400, and the service keeps serving."""
    body = json.dumps(message("lie", smtp_port=SUBMISSION_PORT)).encode()
    with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head(len(body) + 500) + body)
        time.sleep(0.3)
    with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head(len(body) - 40) + body)
        status, _headers, answer = read_response(sock)
        assert status == 400 and json.loads(answer)[0]["msg"] == "smtp_invalid_json"
    time.sleep(0.5)
    assert bed.messages() == []
    still_serving(service, bed, "after lies")


def test_slow_sender_does_not_block_others(service: Sidecar, bed: Testbed) -> None:
    """While one client trickles a body byte by byte, other clients are served at once."""
    body = json.dumps(message("slow", smtp_port=SUBMISSION_PORT)).encode()
    with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as slow:
        slow.sendall(head(len(body)))
        for byte in body[:20]:
            slow.sendall(bytes([byte]))
            time.sleep(0.01)
        started = time.monotonic()
        still_serving(service, bed, "while a slow sender trickles")
        assert time.monotonic() - started < 10
        slow.sendall(body[20:])
        status, _headers, _answer = read_response(slow)
        assert status == 200


def test_floods_of_recipients_and_attachments_are_refused_with_bounded_memory(
    bed: Testbed, sidecar: Callable[..., Sidecar]
) -> None:
    """Thousands of recipients or attachments in a body under the limit: 400 with the count code,
    quickly, no SMTP connection, peak RSS within 64 MiB of where it started; and then a normal send."""
    service = sidecar("--max-request-bytes", str(8 * LIMIT))
    before = peak_rss_mib(service)
    connects_before = bed.log_text("postfix").count("connect from")
    recipients = [f"r{i}@example.net" for i in range(5000)]
    cases = [
        ({"to": recipients}, "smtp_too_many_recipients"),
        ({"to": recipients[:50], "cc": recipients[50:100], "bcc": recipients[100:5000]}, "smtp_too_many_recipients"),
        ({"attachments": [{"filename": f"f{i}.txt", "content": "YWJj"} for i in range(5000)]}, "smtp_too_many_attachments"),
    ]
    for changes, code in cases:
        started = time.monotonic()
        answer = send(service.url, message(smtp_port=SUBMISSION_PORT, **changes))
        assert (answer.status, answer.code) == (400, code)
        assert time.monotonic() - started < 10
    assert bed.log_text("postfix").count("connect from") == connects_before
    assert peak_rss_mib(service) - before < 64
    still_serving(service, bed, "after floods")


def test_attachment_over_the_limit_is_413(service: Sidecar, bed: Testbed) -> None:
    """An attachment that makes the body larger than the limit answers 413 and nothing is sent."""
    big = "QUJD" * (LIMIT // 3)
    data = json.dumps(message(smtp_port=SUBMISSION_PORT, attachments=[{"filename": "big.bin", "content": big}])).encode()
    with socket.create_connection((HOST, service.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(head(len(data)))
        status, _headers, body = read_response(sock)
    assert status == 413 and json.loads(body)[0]["msg"] == "smtp_request_too_large"
    assert bed.messages() == []
    still_serving(service, bed, "after a big attachment")


# --------------------------------------------------------------------------- schema fuzzing


FUZZ_EXAMPLES = 150


def test_schema_fuzzing_of_the_live_openapi_document(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    certificates: Certificates,  # noqa: F811
    starttls_server: FaultServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """schemathesis generates valid and invalid requests for every operation of the served
    /api/v1/openapi.json: no 5xx, no traceback, answers match the document, invalid data is refused;
    only the scripted loopback SMTP server is allowed, so no real mail is sent."""
    port = starttls_server.port
    service = sidecar(
        "--smtp-port", str(port), "--smtp-allow", f"{HOST}:{port}", "--smtp-ca", str(certificates.ca), "--smtp-timeout", "5"
    )
    schema = schemathesis.openapi.from_url(f"{service.url}/api/v1/openapi.json")
    seen: list[tuple[str, int]] = []
    texts: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/send/email", "/healthz", "/readyz"}
    for operation in operations:
        # Negative data needs something to break: only the send route takes a body.
        send_route = operation.path == "/api/v1/send/email"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if send_route else (GenerationMode.POSITIVE,):

            @settings(
                max_examples=FUZZ_EXAMPLES if send_route else 5,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(base_url=service.url, headers={"X-API-Key": API_KEY}, timeout=30)
                seen.append((case.operation.path, response.status_code))
                texts.append(response.text)
                assert response.status_code < 500, response.text
                assert "Traceback" not in response.text
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            run()
    sends = [status for path, status in seen if path == "/api/v1/send/email"]
    assert len(sends) >= 50
    assert any(400 <= status < 500 for status in sends)
    assert_no_secret(texts + [service.log_text()], (API_KEY,))
    assert bed.messages() == []
    accepted = sends.count(200)
    assert len(starttls_server.counts.messages) == accepted
    # The figures, for the report.
    (tmp_path / "schema-fuzz.json").write_text(json.dumps({"requests": len(seen), "send_requests": len(sends),
                                                           "accepted": accepted}))
    print(f"\nSCHEMA FUZZ: {len(seen)} requests, {len(sends)} to the send route, {accepted} accepted")
