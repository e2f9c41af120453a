"""Operating the service: health, readiness, metrics, JSON logs, request ids, HTTPS, the OpenAPI document."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Sidecar, Testbed, free_port, twistd_path
from .test_send_api import API_KEY, PASSWORD, SENDER, example_body, post

pytestmark = pytest.mark.integration


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_health_and_readiness(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """/healthz is always 200; /readyz is 200 with database and postfix up, 503 naming postfix when it is not."""
    running = sidecar()
    assert get(running.url + "/healthz")[:2] == (200, b'{"status":"ok"}')
    status, body, _ = get(running.url + "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    port = closed_port()
    broken = sidecar("--smtp-port", str(port), "--smtp-allow", f"127.0.0.1:{port}")
    status, body, _ = get(broken.url + "/readyz")
    assert (status, json.loads(body)) == (
        503,
        {"status": "unavailable", "failing": ["postfix"], "reasons": {"postfix": "connection refused"}},
    )
    assert b"127.0.0.1" not in body and b"mysql" not in body


@pytest.mark.parametrize(
    ("options", "part", "wanted"),
    [
        (("--smtp-tls-name", "mail.example.org"), "postfix", "TLS name mismatch"),
        (("--smtp-ca", ""), "postfix", "certificate not trusted"),
        (("--db", "mysql://root:Wrong-Pass-42@127.0.0.1:3306/smtpapi_testbed"), "database", "database access denied"),
    ],
)
def test_readiness_says_why_a_part_fails(
    bed: Testbed, sidecar: Callable[..., Sidecar], options: tuple[str, ...], part: str, wanted: str
) -> None:
    """A wrong TLS name, an untrusted certificate (no --smtp-ca for the bed's own CA) and a wrong
    database password each answer 503 with the reason, and no secret or address."""
    running = sidecar(*options)
    status, body, _ = get(running.url + "/readyz")
    answer = json.loads(body)
    assert status == 503 and answer["failing"] == [part], answer
    assert answer["reasons"][part].startswith(wanted), answer
    for secret in (b"Wrong-Pass-42", b"root", b"127.0.0.1", b"mail.example.org", b"localhost"):
        assert secret not in body


def test_metrics_on_their_own_endpoint(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """--metrics-listen serves Prometheus text with request, latency, SMTP and auth figures; the API port does not."""
    metrics_port = free_port()
    running = sidecar("--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1")
    assert post(running.url, example_body())[0] == 200
    assert post(running.url, example_body(), key="WRONG-KEY")[0] == 401
    assert post(running.url, example_body(password="wrong"))[0] == 403
    status, text, headers = get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    page = text.decode()
    assert 'smtpapi_http_requests_total{code="smtp_mail_sent",route="send",status="200"} 1.0' in page
    assert 'smtpapi_http_requests_total{code="smtp_auth_failed",route="send",status="403"} 1.0' in page
    assert 'smtpapi_auth_failures_total{kind="api_key"} 1.0' in page
    assert 'smtpapi_auth_failures_total{kind="mailbox"} 1.0' in page
    assert 'smtpapi_smtp_outcomes_total{outcome="2xx"} 1.0' in page
    assert 'smtpapi_smtp_outcomes_total{outcome="5xx"} 1.0' in page
    assert "smtpapi_send_duration_seconds_count 3.0" in page
    assert get(running.url + "/metrics")[0] == 404


def test_json_logs_carry_request_ids_and_no_secrets(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """--log-format json writes one JSON object per line; the send line has the request id, login and queue id."""
    running = sidecar("--log-format", "json")
    status, body, headers = post(running.url, example_body(subject="logged"))
    assert status == 200
    request_id = headers["X-Request-Id"]
    (message,) = bed.wait_for_messages(1)
    # The request id is in the delivered mail too, so an admin can match it in postfix's log.
    assert message.message["X-Request-Id"] == request_id
    records = [json.loads(line) for line in running.log_text().splitlines() if line.strip()]
    sends = [r for r in records if r.get("request_id") == request_id]
    assert len(sends) == 1
    assert sends[0]["login"] == SENDER and sends[0]["queue_id"] == body[0]["queue_id"] and sends[0]["status"] == 200
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    assert PASSWORD not in running.log_text() and API_KEY not in running.log_text()


def test_https_listener(bed: Testbed, tmp_path: Path) -> None:
    """--listen ssl:... serves the API over TLS; a client verifying the certificate can send."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    port = free_port()
    argv = [
        str(twistd_path()), "-n", "--pidfile=", "smtpapi",
        "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        "--db", bed.db_url, "--smtp-host", "127.0.0.1", "--smtp-port", "10587", "--smtp-allow", "127.0.0.1:10587",
        "--smtp-ca", str(bed.cert_path), "--smtp-tls-name", "localhost",
    ]
    log_path = tmp_path / "https.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        url = f"https://localhost:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(url + "/healthz", context)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        request = urllib.request.Request(
            url + "/api/v1/send/email",
            data=json.dumps(example_body(subject="over https")).encode(),
            headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            assert response.status == 200
        assert bed.wait_for_messages(1)[0].message["Subject"] == "over https"
        # Plain HTTP on the TLS port gets no API answer.
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        process.terminate()
        process.wait(10)


def test_openapi_document_is_served_and_complete(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """/api/v1/openapi.json is OpenAPI 3.1 and names every error code the README lists."""
    running = sidecar()
    status, body, _ = get(running.url + "/api/v1/openapi.json")
    assert status == 200
    document = json.loads(body)
    assert document["openapi"] == "3.1.0"
    text = json.dumps(document)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for code in ("smtp_invalid_from", "smtp_unauthorized_sender", "smtp_error", "smtp_request_too_large"):
        assert code in text and code in readme


def test_revoked_key_stops_working_within_the_cache_ttl(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """With --db-cache-ttl 2 a deleted API key is refused at most about 2 s later."""
    running = sidecar("--db-cache-ttl", "2")
    assert post(running.url, example_body())[0] == 200
    bed.execute("DELETE FROM api WHERE api_key = %s", (API_KEY,))
    deleted = time.monotonic()
    while post(running.url, example_body())[0] == 200:
        # 2 s of cache, plus one request's time and polling slack.
        assert time.monotonic() - deleted < 3.5, "the revoked key kept working past the cache bound"
        time.sleep(0.2)
    assert post(running.url, example_body())[:2] == (401, {"type": "error", "msg": "authentication failed"})
