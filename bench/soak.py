"""Soak of the durable outbox: many asynchronous sends through two replicas while postfix restarts
and one replica is killed, then count what arrived.

    .venv/bin/python -m bench.soak [--quick] [--messages N] [--json FILE]

Two ``twistd -n smtpapi`` processes share one MariaDB state database (a database of their own,
dropped at the end) and follow postfix's real log (``--postfix-log file:<the bed's log>``).
Client threads send ``N`` messages with ``Prefer: respond-async``, alternating the replicas, each
with a Message-ID of its own (the request's ``message_id``). Meanwhile postfix is restarted every
``--restart-every`` seconds (``testbed.sh restart-postfix``), and once a share of the messages was
sent the second replica is killed with SIGKILL and started again. A send whose connection broke
is looked up in the state database: stored means accepted, else it is sent again (to the other
replica). When the outbox has drained it reports:

- accepted: messages the sidecars stored (answered 202, or found in the state database);
- lost: accepted Message-IDs that never arrived in the sink (must be 0);
- duplicated: Message-IDs handed to postfix more than once, i.e. copies in the sink from two of
  postfix's queue files (must be 0); copies of one queue file that postfix delivered again
  itself, after a restart cut its delivery agent off, are counted apart;
- the time from acceptance (the record's ``created_at``) to the arrival in the sink (the sink
  file's time) at p50/p99, and the final states of the records.

Everything listens on and talks to 127.0.0.1 only. bench/README.md ("Soak of the outbox") explains
the run and has the figures of one. The pure helpers (planning, counting, the table) are tested in
tests/unit/test_bench_soak.py; ``tests/integration/test_soak_quick.py`` runs ``--quick``'s plan in
the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `tests` and `mailcow_smtp_api` importable
    sys.path.insert(0, str(REPO))

from bench.run import format_number, format_table, percentile  # noqa: E402

HOST = "127.0.0.1"
SEND_PATH = "/api/v1/send/email"
RESPOND_ASYNC = {"Prefer": "respond-async"}
RECIPIENT = "soak@sink.example"  # postfix relays every domain to smtp-sink
HELO = ("replica-a.soak", "replica-b.soak")  # each replica's EHLO name: postfix's Received header shows who handed over
WAITING = ("scheduled", "queued", "sending")
STATE_DB = "smtpapi_state_soak"
SEND_ATTEMPTS = 20  # tries per message (broken connections, 503) before it counts as refused


# ================================================================================ pure helpers


@dataclass(frozen=True)
class Plan:
    """What one run does."""

    messages: int
    clients: int
    rate: float  # messages per second offered, all clients together (0: as fast as they are answered)
    restart_every: float  # seconds between postfix restarts while messages are being sent
    kill_at: float  # share of the messages sent when the second replica is killed (0..1)
    smtp_timeout: int  # --smtp-timeout: the outbox lease is 8 x this + 10 s
    drain_timeout: float  # seconds to wait for the outbox to drain after the last send

    @property
    def lease(self) -> float:
        """How long a killed replica's claims block its messages (core.outbox.outbox_lease)."""
        return self.smtp_timeout * 8 + 10.0


# What a value given on the command line must be: (test, how the rule reads).
_BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "messages": (lambda v: v >= 1, "at least 1"),
    "rate": (lambda v: v >= 0, "0 or more"),
    "restart_every": (lambda v: v > 0, "more than 0"),
    "clients": (lambda v: v >= 1, "at least 1"),
}


def make_plan(
    quick: bool,
    messages: int | None = None,
    rate: float | None = None,
    restart_every: float | None = None,
    clients: int | None = None,
) -> Plan:
    """The full soak (10,000 messages at 60/s, postfix restarted every 30 s) or ``--quick``'s
    (300 at 15/s, every 8 s, lease 26 s: under a minute); given values override either."""
    if quick:
        base = Plan(messages=300, clients=4, rate=15.0, restart_every=8.0, kill_at=0.3, smtp_timeout=2, drain_timeout=90.0)
    else:
        base = Plan(messages=10_000, clients=8, rate=60.0, restart_every=30.0, kill_at=0.5, smtp_timeout=5, drain_timeout=600.0)
    given = {"messages": messages, "rate": rate, "restart_every": restart_every, "clients": clients}
    changes = {name: value for name, value in given.items() if value is not None}
    for name, value in changes.items():
        allowed, rule = _BOUNDS[name]
        if not allowed(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}")
    return Plan(**{**asdict(base), **changes})


def message_id_for(run: str, index: int, domain: str) -> str:
    """The Message-ID of message ``index`` of run ``run``: unique, and tells the message apart."""
    return f"<soak.{run}.{index}@{domain}>"


def due_at(start: float, index: int, rate: float) -> float:
    """When message ``index`` may be sent: evenly spread at ``rate`` per second (at once for rate 0)."""
    return start if rate <= 0 else start + index / rate


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
# postfix's own Received header: "by HOST (Postfix) with ESMTP id 994AE20C261"
_POSTFIX_QUEUE_ID = re.compile(rb"\(Postfix\) with E?SMTP\w* id ([0-9A-Za-z]+)")


def sink_entry(capture: bytes) -> tuple[str | None, str | None]:
    """(Message-ID, postfix's queue id) of one smtp-sink capture (its records, smtp-sink's
    Received header, then the message as postfix delivered it).

    Only the header block is searched (up to the first empty line), so a body quoting such lines
    is not mistaken for them. The queue id is the one postfix's Received header names: the queue
    file this copy came from. None for what is missing.
    """
    end = _HEADER_END.search(capture)
    header = capture[: end.start()] if end else capture
    message_id = _MESSAGE_ID.search(header)
    queue_id = _POSTFIX_QUEUE_ID.search(header)
    return (
        message_id.group(1).decode("ascii", "replace") if message_id else None,
        queue_id.group(1).decode("ascii") if queue_id else None,
    )


@dataclass
class Tally:
    """What became of the accepted messages.

    A copy in the sink comes from one of postfix's queue files. Two copies from two queue files
    mean the message was handed to postfix twice: ``duplicated``, the outbox's failure. Two copies
    from the same queue file mean postfix delivered it again itself (its delivery agent was
    stopped by a restart after the sink had the message and before postfix noted it):
    ``redelivered``, postfix's at-least-once delivery, counted apart.
    """

    accepted: int
    arrived: int  # accepted Message-IDs found in the sink
    lost: list[str]  # accepted, never arrived
    duplicated: dict[str, int]  # Message-ID -> queue files (> 1): handed to postfix more than once
    redelivered: dict[str, int]  # Message-ID -> copies beyond one per queue file (postfix's own repeats)
    strangers: int  # copies in the sink of Message-IDs that were not accepted

    @property
    def extra_copies(self) -> int:
        """Copies beyond the first, all Message-IDs together, whatever their cause."""
        return sum(self.duplicated.values()) - len(self.duplicated) + sum(self.redelivered.values())


def tally(accepted: Sequence[str], copies: Mapping[str, Sequence[str | None]]) -> Tally:
    """Compare the accepted Message-IDs with the sink's copies (Message-ID -> the queue id of each
    copy; a copy without a known queue id counts as a queue file of its own)."""
    wanted = set(accepted)
    duplicated: dict[str, int] = {}
    redelivered: dict[str, int] = {}
    for mid, queue_ids in sorted(copies.items()):
        if mid not in wanted or not queue_ids:
            continue
        files = len({q for q in queue_ids if q is not None}) + sum(1 for q in queue_ids if q is None)
        if files > 1:
            duplicated[mid] = files
        if len(queue_ids) > files:
            redelivered[mid] = len(queue_ids) - files
    return Tally(
        accepted=len(wanted),
        arrived=sum(1 for mid in wanted if copies.get(mid)),
        lost=sorted(mid for mid in wanted if not copies.get(mid)),
        duplicated=duplicated,
        redelivered=redelivered,
        strangers=sum(len(q) for mid, q in copies.items() if mid not in wanted),
    )


def delivery_latencies(created: Mapping[str, float], first_arrival: Mapping[str, float]) -> list[float]:
    """Seconds from each record's creation to its first copy in the sink (messages that arrived)."""
    return [max(0.0, first_arrival[mid] - at) for mid, at in created.items() if mid in first_arrival]


def latency_cells(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of latencies in seconds (None each without values)."""
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": percentile(seconds, 50), "p99": percentile(seconds, 99), "max": max(seconds)}


@dataclass
class Report:
    """The figures of one run (``render_report`` prints them, ``--json`` writes them)."""

    plan: Plan
    tally: Tally
    refused: dict[str, int]  # sends never accepted, by "status code"
    states: dict[str, int]  # the outbox records' final states
    accept_latency: dict[str, float | None]  # HTTP answer of the accepted sends, seconds
    delivery_latency: dict[str, float | None]  # acceptance to the sink, seconds
    send_seconds: float  # first send to last answer
    total_seconds: float  # first send until the outbox drained
    restarts: int  # postfix restarts during the run
    killed_in_flight: int  # rows claimed (by either replica) right after the kill
    retried_sends: int  # sends repeated after a broken connection or a 503
    handed_over: dict[str, int] = field(default_factory=dict)  # messages per replica EHLO name
    drained: bool = True


def render_report(report: Report) -> str:
    """The soak's table and the states of the records."""
    t = report.tally
    rows = [
        ["messages offered", format_number(report.plan.messages)],
        ["accepted (stored)", format_number(t.accepted)],
        ["refused", format_number(sum(report.refused.values()))],
        ["arrived in the sink", format_number(t.arrived)],
        ["lost (must be 0)", format_number(len(t.lost))],
        ["duplicated: handed to postfix twice (must be 0)", format_number(len(t.duplicated))],
        ["delivered again by postfix after its restart", format_number(len(t.redelivered))],
        ["extra copies in the sink, all causes", format_number(t.extra_copies)],
        ["foreign copies in the sink", format_number(t.strangers)],
        ["accept -> sink p50 s", format_number(report.delivery_latency["p50"], 2)],
        ["accept -> sink p99 s", format_number(report.delivery_latency["p99"], 2)],
        ["accept -> sink max s", format_number(report.delivery_latency["max"], 2)],
        ["HTTP 202 p50 ms", format_number(_ms(report.accept_latency["p50"]), 1)],
        ["HTTP 202 p99 ms", format_number(_ms(report.accept_latency["p99"]), 1)],
        ["sending took s", format_number(report.send_seconds, 1)],
        ["drained after s", format_number(report.total_seconds, 1) + ("" if report.drained else " (not drained)")],
        ["postfix restarts", format_number(report.restarts)],
        ["rows claimed at the kill", format_number(report.killed_in_flight)],
        ["sends repeated", format_number(report.retried_sends)],
    ]
    lines = [format_table(["soak", "value"], rows, numeric_from=1)]
    lines.append("record states: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.states.items())))
    if report.handed_over:
        lines.append("handed over by: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.handed_over.items())))
    if report.refused:
        lines.append("refused: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.refused.items())))
    if t.lost:
        lines.append("lost: " + ", ".join(t.lost[:10]) + (" ..." if len(t.lost) > 10 else ""))
    if t.duplicated:
        lines.append("duplicated: " + ", ".join(f"{k} x{v}" for k, v in list(t.duplicated.items())[:10]))
    if t.redelivered:
        lines.append("delivered again by postfix: " + ", ".join(f"{k} +{v}" for k, v in list(t.redelivered.items())[:10]))
    return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ================================================================================ the run


@dataclass
class Setup:
    """What the soak runs against: the bed, a sidecar starter, the state database, the sender."""

    bed: Any  # tests.integration.conftest.Testbed
    start_sidecar: Callable[..., Any]  # (*twistd options) -> a started conftest.Sidecar
    state_url: str
    state_connect: Callable[[], Any]  # a new autocommit pymysql connection to the state database
    api_key: str
    sender: str
    password: str


def progress(text: str) -> None:
    """One progress line on stderr (the table goes to stdout)."""
    print(f"soak: {text}", file=sys.stderr, flush=True)


class Replicas:
    """The two sidecars: their current ports, and killing and restarting the second."""

    def __init__(self, setup: Setup, plan: Plan) -> None:
        self.setup = setup
        self.options = [
            (
                "--state-db", setup.state_url,
                "--postfix-log", f"file:{setup.bed.log_path('postfix')}",
                "--smtp-timeout", str(plan.smtp_timeout),
                "--outbox-max-messages", str(max(10_000, 2 * plan.messages)),
                "--smtp-helo", helo,
            )  # fmt: skip
            for helo in HELO
        ]
        self.processes = [setup.start_sidecar(*options) for options in self.options]
        self.lock = threading.Lock()

    def port(self, which: int) -> int:
        with self.lock:
            return int(self.processes[which].port)

    def kill_and_restart(self, which: int, claimed: Callable[[], int]) -> int:
        """SIGKILL one replica, count the claims it left, start it again; the claims left."""
        process = self.processes[which].process
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        left = claimed()
        restarted = self.setup.start_sidecar(*self.options[which])
        with self.lock:
            self.processes[which] = restarted
        return left


def run_soak(setup: Setup, plan: Plan, run: str | None = None) -> Report:
    """Send, restart postfix, kill a replica, wait for the drain, count; the report."""
    from tests.integration.conftest import KeepAliveClient, run_testbed_script

    run = run or secrets.token_hex(4)
    domain = setup.sender.rpartition("@")[2]
    replicas = Replicas(setup, plan)
    accepted: dict[str, float] = {}  # Message-ID -> HTTP latency of its 202 (NaN: found stored)
    refused: Counter[str] = Counter()
    retried = [0]
    lock = threading.Lock()
    next_index = [0]
    sent = [0]
    stop = threading.Event()
    killed = threading.Event()
    killed_in_flight = [0]
    restarts = [0]

    def stored(connection: Any, message_id: str) -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM smtpapi_outbox WHERE message_id = %s", (message_id,))
            return int(cursor.fetchone()[0]) > 0

    def claimed_rows() -> int:
        connection = setup.state_connect()
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM smtpapi_outbox WHERE lease_token IS NOT NULL OR status = 'sending'")
            return int(cursor.fetchone()[0])

    def one(clients: list[Any], connection: Any, index: int) -> None:
        message_id = message_id_for(run, index, domain)
        body = {
            "from": setup.sender,
            "to": [RECIPIENT],
            "subject": f"soak {run} {index}",
            "body": f"message {index} of soak {run}",
            "password": setup.password,
            "message_id": message_id,
        }
        for attempt in range(SEND_ATTEMPTS):
            which = (index + attempt) % 2
            if clients[which] is None or clients[which].port != replicas.port(which):
                clients[which] = KeepAliveClient(replicas.port(which), timeout=30)
            began = time.monotonic()
            try:
                status, answer, headers = clients[which].request("POST", SEND_PATH, body, setup.api_key, RESPOND_ASYNC)
            except TimeoutError:
                # A live replica that did not answer may still store it: never sent again (a
                # stored copy counts as accepted all the same).
                with lock:
                    refused["no answer in time"] += 1
                return
            except (OSError, http.client.HTTPException):
                # The replica died (or was restarting) with the request in it: stored or not? Once
                # the process is gone the state database knows for good.
                time.sleep(0.5)
                if stored(connection, message_id):
                    with lock:
                        accepted[message_id] = float("nan")
                    return
                with lock:
                    retried[0] += 1
                continue
            if status == 202:
                with lock:
                    accepted[message_id] = time.monotonic() - began
                return
            if status in (503, 429):
                with lock:
                    retried[0] += 1
                time.sleep(min(5.0, float(headers.get("Retry-After") or 1)))
                continue
            with lock:
                refused[f"{status} {_code(answer)}"] += 1
            return
        with lock:
            refused["gave up"] += 1

    start = time.monotonic() + 0.5

    def client() -> None:
        clients: list[Any] = [None, None]
        connection = setup.state_connect()
        try:
            while True:
                with lock:
                    index = next_index[0]
                    if index >= plan.messages:
                        return
                    next_index[0] += 1
                delay = due_at(start, index, plan.rate) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                one(clients, connection, index)
                with lock:
                    sent[0] += 1
                    kill_now = not killed.is_set() and sent[0] >= plan.kill_at * plan.messages
                    if kill_now:
                        killed.set()
                if kill_now:
                    progress(f"killing replica {HELO[1]} after {sent[0]} messages")
                    killed_in_flight[0] = replicas.kill_and_restart(1, claimed_rows)
                    progress(f"{HELO[1]} restarted; {killed_in_flight[0]} rows were claimed when it died")
        finally:
            for one_client in clients:
                if one_client is not None:
                    one_client.close()
            connection.close()

    def restarter() -> None:
        while not stop.wait(plan.restart_every):
            progress(f"restarting postfix ({sent[0]} messages sent)")
            run_testbed_script(setup.bed.directory, "restart-postfix")
            restarts[0] += 1

    restart_thread = threading.Thread(target=restarter, daemon=True)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(plan.clients)]
    progress(f"run {run}: {plan.messages} messages, {plan.clients} clients, {plan.rate or 'unlimited'}/s")
    restart_thread.start()
    for thread in threads:
        thread.start()
    send_limit = plan.messages / plan.rate * 2 + 120 if plan.rate else plan.messages * 0.1 + 120
    for thread in threads:
        thread.join(max(1.0, start + send_limit - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        refused["clients still sending at the time limit"] += 1
    send_seconds = time.monotonic() - start
    stop.set()
    restart_thread.join(120)
    progress(f"sent in {send_seconds:.1f} s; waiting for the outbox to drain")

    drained = _wait_drained(setup, plan)
    total_seconds = time.monotonic() - start
    created, states = _records(setup)
    copies, first_arrival, handed_over = _sink(setup.bed.sink_dir)
    # Stored but unanswered (a replica died with the request in it) counts as accepted too.
    accepted_ids = sorted(set(accepted) | {mid for mid in created if mid.startswith(f"<soak.{run}.")})
    found = tally(accepted_ids, copies)
    http_latency = [s for s in accepted.values() if s == s]  # without NaN (found stored)
    ours = {mid: at for mid, at in created.items() if mid in set(accepted_ids)}
    report = Report(
        plan=plan,
        tally=found,
        refused=dict(refused),
        states=states,
        accept_latency=latency_cells(http_latency),
        delivery_latency=latency_cells(delivery_latencies(ours, first_arrival)),
        send_seconds=send_seconds,
        total_seconds=total_seconds,
        restarts=restarts[0],
        killed_in_flight=killed_in_flight[0],
        retried_sends=retried[0],
        handed_over=handed_over,
        drained=drained,
    )
    for process in replicas.processes:
        process.stop()
    return report


def _code(answer: Any) -> str:
    entry = answer[0] if isinstance(answer, list) and answer else answer
    if isinstance(entry, dict):
        msg = entry.get("msg")
        return str(msg[0] if isinstance(msg, list) else msg)
    return "?"


def _wait_drained(setup: Setup, plan: Plan) -> bool:
    """Until nothing waits in the outbox, postfix's queue is empty and the sink stops growing."""
    from tests.integration.conftest import postfix_queue

    deadline = time.monotonic() + plan.drain_timeout
    last_files = -1
    while time.monotonic() < deadline:
        connection = setup.state_connect()
        with connection, connection.cursor() as cursor:
            marks = ", ".join(["%s"] * len(WAITING))
            cursor.execute(f"SELECT COUNT(*) FROM smtpapi_outbox WHERE status IN ({marks})", WAITING)
            waiting = int(cursor.fetchone()[0])
        files = len(os.listdir(setup.bed.sink_dir))
        if waiting == 0 and not postfix_queue(setup.bed) and files == last_files:
            return True
        last_files = files
        time.sleep(2)
    return False


def _records(setup: Setup) -> tuple[dict[str, float], dict[str, int]]:
    """Message-ID -> created_at of every record, and how many records are in each state."""
    connection = setup.state_connect()
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT message_id, created_at, status FROM smtpapi_outbox")
        rows = list(cursor.fetchall())
    return {str(mid): float(at) for mid, at, _ in rows}, dict(Counter(str(status) for _, _, status in rows))


def _sink(folder: Path) -> tuple[dict[str, list[str | None]], dict[str, float], dict[str, int]]:
    """The sink's copies: Message-ID -> the queue id of each copy, each Message-ID's first arrival
    (file time), and copies per replica (the EHLO name in postfix's Received header)."""
    copies: dict[str, list[str | None]] = {}
    first: dict[str, float] = {}
    helos: Counter[str] = Counter()
    for entry in os.scandir(folder):
        try:
            data = Path(entry.path).read_bytes()
            at = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        message_id, queue_id = sink_entry(data)
        if message_id is None:
            continue
        copies.setdefault(message_id, []).append(queue_id)
        first[message_id] = min(at, first.get(message_id, at))
        helos.update(h for h in HELO if f"from {h} ".encode() in data)
    return copies, first, dict(helos)


# ================================================================================ the command


def _state_database() -> tuple[str, Callable[[], Any]]:
    """Create the soak's own MariaDB state database (dropped again by ``_drop_state_database``)."""
    import pymysql  # type: ignore[import-untyped]

    from tests.integration.conftest import DB_HOST, DB_PORT

    with pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", autocommit=True, connect_timeout=5) as connection:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{STATE_DB}`")
            cursor.execute(f"CREATE DATABASE `{STATE_DB}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")

    def connect() -> Any:
        return pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", database=STATE_DB, autocommit=True, connect_timeout=5)

    return f"mysql://root@{DB_HOST}:{DB_PORT}/{STATE_DB}", connect


def _drop_state_database() -> None:
    import pymysql

    from tests.integration.conftest import DB_HOST, DB_PORT

    with pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", autocommit=True, connect_timeout=5) as connection:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{STATE_DB}`")


@contextlib.contextmanager
def sidecars(bench: Any) -> Iterator[Callable[..., Any]]:
    """A starter of sidecars with ``bench.run``'s options (the integration fixture's), each in a
    folder and with a log of its own; every process started is stopped at the end."""
    from bench.run import start_sidecar

    started: list[Any] = []

    def start(*extra: str) -> Any:
        folder = bench.workdir / f"sidecar-{len(started) + 1}"
        folder.mkdir()
        started.append(start_sidecar(dataclasses.replace(bench, workdir=folder), extra))
        return started[-1]

    try:
        yield start
    finally:
        for sidecar in started:
            sidecar.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 messages in under a minute (what the test suite runs)")
    parser.add_argument("--messages", type=int, help="messages to send (default 10,000; --quick 300)")
    parser.add_argument("--rate", type=float, help="messages per second offered (default 60; --quick 15; 0: unlimited)")
    parser.add_argument("--restart-every", type=float, help="seconds between postfix restarts (default 30; --quick 8)")
    parser.add_argument("--clients", type=int, help="client threads (default 8; --quick 4)")
    parser.add_argument("--json", metavar="FILE", help="write the report's figures to FILE")
    parser.add_argument("--keep-bed", action="store_true", help="leave the test bed running at the end")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Set the bed up, run the soak, print the table; exit 1 when a message was lost or duplicated."""
    import tempfile

    from bench.run import SENDER, bed_lock, bed_running, logs_trimmed, prepare_bed
    from tests.integration.conftest import Testbed, run_testbed_script, testbed_dir

    options = parse_args(argv)
    try:
        plan = make_plan(options.quick, options.messages, options.rate, options.restart_every, options.clients)
    except ValueError as exc:
        raise SystemExit(f"soak: {exc}") from None
    if os.geteuid() != 0:
        raise SystemExit("soak: the test bed needs root (postfix's and dovecot's masters drop privileges)")
    directory = testbed_dir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(bed_lock(directory))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpapi-soak-")))
        stack.enter_context(logs_trimmed(directory))
        reused = bed_running(directory)
        bench = prepare_bed(directory, workdir)
        if not reused and not options.keep_bed:
            stack.callback(run_testbed_script, directory, "stop")
        state_url, connect = _state_database()
        stack.callback(_drop_state_database)
        start = stack.enter_context(sidecars(bench))
        setup = Setup(
            bed=Testbed(directory), start_sidecar=start, state_url=state_url, state_connect=connect,
            api_key=bench.api_key, sender=SENDER, password=bench.password,
        )  # fmt: skip
        report = run_soak(setup, plan)
        run_testbed_script(directory, "clear-messages")
    print(render_report(report))
    if options.json:
        Path(options.json).write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0 if not report.tally.lost and not report.tally.duplicated and report.drained else 1


if __name__ == "__main__":
    sys.exit(main())
