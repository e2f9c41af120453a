"""Load through the real postfix: many concurrent clients, exact-once accounting, and memory.

Every request carries a unique token in its subject. After a run the sink is read back: every 200
answer must match exactly one delivered message, every error answer none, and no token may arrive
twice. Answers that say the outcome is unknown (no reply after the final dot, ``outcome_unknown``)
are counted apart: they may or may not have been delivered, but never twice. The runs repeat with
postfix restarted, and with mailcow's database (a private MariaDB) restarted, in the middle.

Sizes fit the 10-minute suite on two cores (200 clients x 2 messages, one longer run of 1,000); the
figures go to the test report (``record_property``) and to ``load-summary.json`` in pytest's base
temporary folder (or the file named by $SMTPAPI_LOAD_SUMMARY).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from mailcow_smtp_api.core.errors import CODES

from .conftest import SUBMISSION_PORT, Sidecar, Testbed
from .test_faults import (  # noqa: F401
    API_KEY,
    PASSWORD,
    SENDER,
    PrivateMariaDB,
    private_mariadb,
    send,
)

pytestmark = [pytest.mark.integration, pytest.mark.load]

CLIENTS = 200
PER_CLIENT = 2
SUBJECT_PREFIX = "load "
SETTLE_TIMEOUT = 90.0
# postfix opens one MariaDB connection per smtpd process (sender map) and dovecot one per auth worker
# and passdb; a bound on the service's SMTP sessions keeps the bed's shared MariaDB (151 connections
# by default) from running out, which would otherwise show up as 451s and refused logins.
SESSION_BOUND = ("--smtp-max-connections", "20")


@dataclass(frozen=True)
class Outcome:
    """One request: its token, the HTTP status (0: no answer), the code, and whether it may have been sent."""

    token: str
    status: int
    code: str
    unknown: bool
    seconds: float


@dataclass
class Figures:
    """What a run did, for the report."""

    name: str
    requests: int
    ok: int
    errors: int
    unknown: int
    no_answer: int
    delivered: int
    delivered_of_unknown: int
    duplicates: int
    codes: dict[str, int]
    seconds: float
    peak_rss_mib: float
    median_ms: float
    p99_ms: float


class RssSampler:
    """Samples a process's resident set size every ``interval`` seconds, in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_kib(self.pid, "VmRSS")
            if rss:
                self.samples.append(rss)
            self._stop.wait(self.interval)


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def one_request(url: str, port: int) -> Outcome:
    """Send one small message with a fresh token; never raises."""
    token = secrets.token_hex(8)
    body = {
        "from": SENDER,
        "to": ["rcpt@example.net"],
        "subject": SUBJECT_PREFIX + token,
        "body": f"token {token}\n.\nQUIT\n",
        "password": PASSWORD,
        "smtp_port": port,
    }
    started = time.monotonic()
    try:
        answer = send(url, body, timeout=120)
    except (OSError, ValueError) as exc:
        return Outcome(token, 0, type(exc).__name__, True, time.monotonic() - started)
    unknown = bool(answer.detail.get("outcome_unknown"))
    where = answer.detail.get("phase")
    code = str(answer.code) + (f" at {where} ({answer.detail.get('reason') or answer.detail.get('smtp_code')})" if where else "")
    return Outcome(token, answer.status, code, unknown, time.monotonic() - started)


def run_clients(
    url: str, clients: int, per_client: int, port: int = SUBMISSION_PORT, during: Callable[[list[Outcome]], None] | None = None
) -> list[Outcome]:
    """``clients`` threads each send ``per_client`` messages one after another, all starting together.

    ``during``, if given, runs in the calling thread while the clients are sending and sees the
    outcomes list as it grows (to time a restart).
    """
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        barrier.wait(60)
        for _ in range(per_client):
            outcome = one_request(url, port)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    if during is not None:
        during(outcomes)
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "a client did not finish"
    return outcomes


_POSTFIX_QUEUE_ID = re.compile(rb"by mail\.testbed\.invalid \(Postfix\) with E?SMTPS?A? id ([0-9A-Za-z]+)")


def delivered_tokens(bed: Testbed) -> Counter[str]:
    """How many separate submissions of each token reached postfix and arrived in the sink.

    Counted by postfix's queue id in its Received header: a second submission by the sidecar gets
    a new queue id, while postfix delivering one queue file to the sink again after it was stopped
    mid-delivery (its own at-least-once delivery) keeps the id and counts once.
    """
    submissions: dict[str, set[bytes]] = {}
    for message in bed.messages():
        subject = str(message.message["Subject"] or "")
        if subject.startswith(SUBJECT_PREFIX):
            match = _POSTFIX_QUEUE_ID.search(message.raw)
            queue_id = match.group(1) if match else message.path.name.encode()
            submissions.setdefault(subject[len(SUBJECT_PREFIX):], set()).add(queue_id)
    return Counter({token: len(ids) for token, ids in submissions.items()})


def settle(bed: Testbed, expected: set[str]) -> Counter[str]:
    """Wait (bounded) until every expected token arrived and the sink stops growing."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = -1
    while True:
        found = delivered_tokens(bed)
        total = sum(found.values())
        if expected <= set(found) and total == last:
            return found
        if time.monotonic() > deadline:
            return found
        last = total
        time.sleep(0.5)


def account(name: str, bed: Testbed, outcomes: list[Outcome], seconds: float, peak_kib: int) -> Figures:
    """Match answers with deliveries and assert the exact-once rules; return the figures."""
    ok = {o.token for o in outcomes if o.status == 200}
    unknown = {o.token for o in outcomes if o.status != 200 and o.unknown}
    failed = {o.token for o in outcomes if o.status != 200 and not o.unknown}
    found = settle(bed, ok)
    assert len(ok) + len(unknown) + len(failed) == len(outcomes), "a token was used twice"
    missing = ok - set(found)
    assert not missing, f"{len(missing)} answered 200 but never arrived"
    wrongly = failed & set(found)
    assert not wrongly, f"{len(wrongly)} answered with an error but arrived: {sorted(wrongly)[:3]}"
    duplicates = {token: n for token, n in found.items() if n > 1}
    assert not duplicates, f"delivered more than once: {duplicates}"
    strays = set(found) - ok - unknown - failed
    assert not strays, f"messages nobody asked for: {sorted(strays)[:3]}"
    for outcome in outcomes:
        assert outcome.status != 500, outcome
        if outcome.status not in (0, 200):
            assert outcome.code.split(" ")[0] in CODES, outcome
    latencies = sorted(o.seconds for o in outcomes)
    return Figures(
        name=name,
        requests=len(outcomes),
        ok=len(ok),
        errors=len(failed) - sum(1 for o in outcomes if o.status == 0 and not o.unknown),
        unknown=sum(1 for o in outcomes if o.unknown and o.status != 0),
        no_answer=sum(1 for o in outcomes if o.status == 0),
        delivered=sum(found.values()),
        delivered_of_unknown=len(unknown & set(found)),
        duplicates=0,
        codes=dict(Counter(f"{o.status} {o.code}" for o in outcomes)),
        seconds=round(seconds, 2),
        peak_rss_mib=round(peak_kib / 1024, 1),
        median_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        p99_ms=round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
    )


@pytest.fixture(scope="module")
def summary_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the figures of every run are collected (one JSON object per line)."""
    path = Path(os.environ.get("SMTPAPI_LOAD_SUMMARY") or tmp_path_factory.getbasetemp() / "load-summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def report(figures: Figures, record_property: Callable[[str, Any], None], summary_path: Path) -> None:
    """Put the figures into the JUnit properties, the summary file and the captured output."""
    data = asdict(figures)
    record_property(f"load_{figures.name}", json.dumps(data, sort_keys=True))
    with open(summary_path, "a") as handle:
        handle.write(json.dumps(data, sort_keys=True) + "\n")
    print(f"\nLOAD {figures.name}: {json.dumps(data, sort_keys=True)}")


def _run(name: str, service: Sidecar, bed: Testbed, during: Callable[[list[Outcome]], None] | None = None,
         clients: int = CLIENTS, per_client: int = PER_CLIENT) -> Figures:
    started = time.monotonic()
    with RssSampler(service.process.pid):
        outcomes = run_clients(service.url, clients, per_client, during=during)
    seconds = time.monotonic() - started
    return account(name, bed, outcomes, seconds, status_kib(service.process.pid, "VmHWM"))


def when_done(outcomes: list[Outcome], count: int, timeout: float = 120.0) -> None:
    """Wait (bounded) until ``count`` answers are in."""
    deadline = time.monotonic() + timeout
    while len(outcomes) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_concurrent_clients_each_message_exactly_once(
    bed: Testbed, sidecar: Callable[..., Sidecar], record_property: Callable[[str, Any], None], summary_path: Path
) -> None:
    """200 concurrent clients x 2 messages through postfix: every 200 is one delivery, errors none."""
    service = sidecar("--smtp-timeout", "60", *SESSION_BOUND)
    figures = _run("steady", service, bed)
    report(figures, record_property, summary_path)
    # The bed's MariaDB is shared with other test sessions: a few refusals can come from there.
    assert figures.ok >= figures.requests * 0.5, figures.codes


def test_postfix_restart_during_load(
    bed: Testbed, sidecar: Callable[..., Sidecar], record_property: Callable[[str, Any], None], summary_path: Path
) -> None:
    """postfix restarts while 200 clients send: answers stay coded, accounting stays exact-once, and
    sending resumes (the last answers are 200 again) without restarting the service."""
    service = sidecar("--smtp-timeout", "30", *SESSION_BOUND)

    def restart(outcomes: list[Outcome]) -> None:
        when_done(outcomes, CLIENTS * PER_CLIENT // 4)
        bed.restart_postfix()

    figures = _run("postfix_restart", service, bed, during=restart)
    report(figures, record_property, summary_path)
    assert figures.ok > 0
    after = one_request(service.url, SUBMISSION_PORT)
    assert after.status == 200, after


def test_mariadb_restart_during_load(
    bed: Testbed,
    sidecar: Callable[..., Sidecar],
    private_mariadb: PrivateMariaDB,  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, Any], None],
    summary_path: Path,
) -> None:
    """mailcow's database (private MariaDB; postfix keeps the shared one) restarts while 200 clients
    send: errors are coded 503 smtp_db_unavailable, accounting stays exact-once, sending resumes."""
    rows = private_mariadb.rows(tmp_path)
    rows.add_domain("example.com")
    rows.add_mailbox(SENDER, PASSWORD)
    rows.add_api_key(API_KEY, allow_from="127.0.0.1")
    service = sidecar("--db", private_mariadb.url, "--smtp-timeout", "30", "--db-cache-ttl", "0", *SESSION_BOUND)

    def restart(outcomes: list[Outcome]) -> None:
        when_done(outcomes, CLIENTS * PER_CLIENT // 4)
        private_mariadb.stop()
        time.sleep(1.0)
        private_mariadb.start()

    figures = _run("mariadb_restart", service, bed, during=restart)
    report(figures, record_property, summary_path)
    assert figures.ok > 0
    answered = {code.split(" at ")[0] for code in figures.codes if not code.startswith("0 ")}
    # 503 smtp_error: postfix's own lookups in the shared MariaDB may fail under this load (451).
    assert answered <= {"200 smtp_mail_sent", "503 smtp_db_unavailable", "503 smtp_error"}, figures.codes
    assert "503 smtp_db_unavailable" in answered, figures.codes
    deadline = time.monotonic() + 20
    after = one_request(service.url, SUBMISSION_PORT)
    while after.status != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = one_request(service.url, SUBMISSION_PORT)
    assert after.status == 200, after


def test_memory_stays_bounded_over_a_long_run(
    bed: Testbed, sidecar: Callable[..., Sidecar], record_property: Callable[[str, Any], None], summary_path: Path
) -> None:
    """1,000 messages from 20 clients: the service's RSS levels off (the last quarter grows less than
    32 MiB over the first) and its peak stays under 400 MiB."""
    service = sidecar("--smtp-timeout", "60", *SESSION_BOUND)
    started = time.monotonic()
    with RssSampler(service.process.pid) as sampler:
        outcomes = run_clients(service.url, 20, 50)
    figures = account("long_run", bed, outcomes, time.monotonic() - started, status_kib(service.process.pid, "VmHWM"))
    report(figures, record_property, summary_path)
    samples = sampler.samples
    assert len(samples) >= 8
    quarter = len(samples) // 4
    first, last = max(samples[:quarter]), max(samples[-quarter:])
    record_property("rss_first_quarter_mib", round(first / 1024, 1))
    record_property("rss_last_quarter_mib", round(last / 1024, 1))
    assert last - first < 32 * 1024, (first, last)
    assert figures.peak_rss_mib < 400
    assert figures.ok >= figures.requests * 0.5, figures.codes


def listen_backlog(port: int) -> int:
    """The accept-queue size of the TCP listener on 127.0.0.1:``port`` (``ss`` shows it as Send-Q)."""
    result = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True)
    fields = result.stdout.split()
    assert fields and fields[0] == "LISTEN", result.stdout
    return int(fields[2])


def test_listener_accepts_a_burst_of_200_clients(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """The HTTP listener's accept queue holds a burst of 200 connecting clients."""
    service = sidecar()
    assert listen_backlog(service.port) >= CLIENTS


@pytest.fixture(autouse=True)
def _postfix_left_running(testbed: Testbed) -> Iterator[None]:
    """After a load test postfix is restarted: it runs again whatever the test did to it, and the idle
    smtpd processes the burst left behind give their MariaDB connections back (the bed is shared)."""
    yield
    testbed.restart_postfix()
