"""No secret leaks: a session of varied calls, then every answer and every log line is searched.

The secrets are the mailbox password, an app password, wrong passwords that were tried, the valid
API key and the wrong keys that were presented, and the base64 forms in which SMTP carries them
(the AUTH PLAIN blob ``\\0login\\0password`` and the AUTH LOGIN password line). The calls cover
success on every port, refused logins, refused keys, malformed bodies, a scripted SMTP server that
quotes the AUTH line back in its error replies, and an unreachable database; the service runs once
with text logs and once with JSON logs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import (
    PLAIN_PORT,
    SMTPS_PORT,
    SUBMISSION_PORT,
    Sidecar,
    Testbed,
    free_port,
)
from .test_faults import (
    API_KEY,
    PASSWORD,
    SENDER,
    Certificates,
    Fault,
    FaultServer,
    certificates,  # noqa: F401
    starttls_server,  # noqa: F401
    message,
    send,
)

pytestmark = pytest.mark.integration

APP_PASSWORD = "app-Secret-7f3a9c1e"
WRONG_PASSWORDS = ("wrong-Secret-1b2c3d", "wr\u00f6ng-S\u00e9cret-\u65e5\u672c")
WRONG_KEYS = ("DEAD00-BEEF00-DEAD00-BEEF00-DEAD00", "x-" + API_KEY.lower() + "-junk")
LOGIN = SENDER


def every_secret() -> list[str]:
    """The secrets used in the session, in every encoding that could leak."""
    passwords = (PASSWORD, APP_PASSWORD, *WRONG_PASSWORDS)
    found = [*passwords, API_KEY, API_KEY.lower(), *WRONG_KEYS]
    for password in passwords:
        found.append(base64.b64encode(f"\0{LOGIN}\0{password}".encode()).decode())  # AUTH PLAIN
        found.append(base64.b64encode(password.encode()).decode())  # AUTH LOGIN password line
    return found


@pytest.fixture
def bed(bed: Testbed) -> Testbed:
    """The shared rows plus an app password of the sender."""
    bed.add_app_password(SENDER, APP_PASSWORD)
    return bed


def session_of_calls(service: Sidecar, echo: FaultServer, quoted: list[bytes]) -> list[str]:
    """Run the varied calls; return every answer's status line, headers and body as text.

    ``quoted`` collects the AUTH lines the echo server received (and quoted back)."""
    texts: list[str] = []

    def call(body: Any, key: str = API_KEY, expect: int | None = None) -> None:
        answer = send(service.url, body, key=key)
        texts.append(f"{answer.status} {json.dumps(answer.headers)} {answer.raw.decode('utf-8', 'replace')}")
        if expect is not None:
            assert answer.status == expect, answer.body

    call(message("587", smtp_port=SUBMISSION_PORT), expect=200)
    call(message("465", smtp_port=SMTPS_PORT), expect=200)
    call(message("25", smtp_port=PLAIN_PORT), expect=200)
    call(message("app", smtp_port=SUBMISSION_PORT, password=None, app_password=APP_PASSWORD), expect=200)
    for wrong in WRONG_PASSWORDS:
        call(message(smtp_port=SUBMISSION_PORT, password=wrong), expect=403)
        call(message(smtp_port=PLAIN_PORT, password=wrong), expect=403)
    for key in WRONG_KEYS:
        call(message(smtp_port=SUBMISSION_PORT), key=key, expect=401)
    call(message(smtp_port=SUBMISSION_PORT, password=PASSWORD, app_password=WRONG_PASSWORDS[0]), expect=400)
    call(message(smtp_port=SUBMISSION_PORT, password=[PASSWORD]), expect=400)
    call(message(smtp_port=SUBMISSION_PORT, password=PASSWORD + "\0"), expect=400)
    call(json.dumps(message(smtp_port=SUBMISSION_PORT)).encode()[:-7], expect=400)
    call(message(smtp_port=SUBMISSION_PORT, **{"from": "not an address"}), expect=400)
    for phase, reply in (("auth", b"535 5.7.8 refused:"), ("auth", b"454 4.7.0 try later:"),
                         ("mail", b"451 4.3.0 you said:"), ("rcpt", b"550 5.1.1 you said:"),
                         ("message", b"554 5.6.0 you said:")):
        echo.reset(Fault(phase, "echo", reply))
        call(message(smtp_port=echo.port))
        quoted.extend(echo.counts.auth_lines)
    echo.reset(Fault("capabilities", "mechanisms", b"LOGIN"))
    call(message("login", smtp_port=echo.port), expect=200)
    quoted.extend(echo.counts.auth_lines)
    return texts


def start_service(
    sidecar: Callable[..., Sidecar], bed: Testbed, certificates: Certificates, echo: FaultServer, *extra: str  # noqa: F811
) -> Sidecar:
    """A service that may also submit to the echo server, trusting postfix's certificate and the test CA."""
    bundle = certificates.ca.parent / "bed-and-test-ca.pem"
    bundle.write_bytes(bed.cert_path.read_bytes() + certificates.ca.read_bytes())
    allow = f"127.0.0.1:{SUBMISSION_PORT},127.0.0.1:{SMTPS_PORT}/tls,127.0.0.1:{PLAIN_PORT}/plain,127.0.0.1:{echo.port}"
    # No session reuse: every call authenticates, so every call can leak.
    return sidecar("--smtp-allow", allow, "--smtp-ca", str(bundle), "--smtp-timeout", "20", "--smtp-pool-size", "0", *extra)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_answer_or_log_line(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    certificates: Certificates,  # noqa: F811
    starttls_server: FaultServer,  # noqa: F811
    log_format: str,
) -> None:
    """Across successes, refusals, malformed input and a server that echoes AUTH: no secret in any
    answer (body or header) or any line the service logged."""
    service = start_service(sidecar, bed, certificates, starttls_server, "--log-format", log_format)
    quoted: list[bytes] = []
    texts = session_of_calls(service, starttls_server, quoted)
    # The echo server really received the credentials (AUTH PLAIN, and AUTH LOGIN's two lines).
    assert len(quoted) >= 6 and any(line.startswith(b"AUTH PLAIN ") for line in quoted)
    assert len(bed.wait_for_messages(4)) == 4
    log = service.log_text()
    assert "send " in log or '"send' in log  # the calls were logged
    haystack = texts + log.splitlines()
    for secret in every_secret():
        leaks = [text[:160] for text in haystack if secret in text]
        assert not leaks, f"secret {secret[:4]}... found in: {leaks[:2]}"


def test_no_secret_when_the_database_is_unreachable(
    bed: Testbed, sidecar: Callable[..., Sidecar]
) -> None:
    """A database URL with a password that cannot be reached: answers are 503 and neither the answers
    nor the log show the database password or the presented secrets."""
    db_password = "db-Secret-5e6f7a8b"
    service = sidecar("--db", f"mysql://smtpapi:{db_password}@127.0.0.1:{free_port()}/mailcow")
    answer = send(service.url, message(smtp_port=SUBMISSION_PORT))
    assert (answer.status, answer.code) == (503, "smtp_db_unavailable")
    text = answer.raw.decode() + json.dumps(answer.headers) + service.log_text()
    for secret in [db_password, *every_secret()]:
        assert secret not in text, secret[:4]
