"""Throughput benchmark: the sidecar over HTTP against direct SMTP and postfix's own ceiling, in one run.

    .venv/bin/python -m bench.run [--quick] [--json FILE]

Starts (or reuses) the postfix test bed of tests/testbed/testbed.sh with a fresh database, starts
one ``twistd -n smtpapi`` against it, and for every scenario (body size x concurrent clients x
recipients) measures these paths one after the other, under the same conditions:

    ceiling          postfix's smtp-source into the plain port (no TLS, no AUTH, connections reused)
    direct-reused    smtplib, one STARTTLS+AUTH connection per client, reused for every message
    direct-new       smtplib, new connection + STARTTLS + AUTH per message (port 10587)
    direct-new-465   smtplib, new implicit-TLS connection + AUTH per message (port 10465)
    direct-new-25    smtplib, new plain connection per message, no AUTH (port 10025)
    sidecar-587/465/25  HTTP POST /api/v1/send/email, keep-alive connections, one per client

and prints msgs/s, latency percentiles, CPU seconds per 1,000 messages (the sidecar, the load
generator, postfix, smtp-sink, dovecot, MariaDB and the whole machine), the sidecar's peak RSS,
and every sidecar figure as a ratio to the baselines. Speed is reported, never asserted.
Everything listens on and talks to 127.0.0.1 only. bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `tests` and `mailcow_smtp_api` importable
    sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"
SUBMISSION_PORT = 10587
SMTPS_PORT = 10465
PLAIN_PORT = 10025
SEND_PATH = "/api/v1/send/email"

SENDER_DOMAIN = "bench.example"
SENDER = f"sender@{SENDER_DOMAIN}"
RECIPIENT_DOMAIN = "sink.example"  # postfix relays everything to smtp-sink; nothing resolves it

CLIENT_TIMEOUT = 300.0  # seconds one HTTP request or SMTP step may take (5 MB at 100 clients is slow)
READY_TIMEOUT = 120.0  # all clients connected (100 STARTTLS+AUTH handshakes on a busy machine)
MIN_FREE_BYTES = 2 * 1024**3  # refuse to start a phase with less free disk than this under the bed
LINE_LENGTH = 76  # body lines, newline included: under the 78 that keeps the sidecar's MIME 7bit

KB = 1024
MB = 1024 * 1024


# ================================================================================ pure helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between closest ranks.

    Rank ``q/100 * (n-1)`` of the sorted values, as numpy's default; one value is its own percentile.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99/mean/max of latencies given in seconds, in milliseconds; None without values."""
    if not seconds:
        return None
    return {
        "p50": percentile(seconds, 50) * 1000,
        "p95": percentile(seconds, 95) * 1000,
        "p99": percentile(seconds, 99) * 1000,
        "mean": sum(seconds) / len(seconds) * 1000,
        "max": max(seconds) * 1000,
    }


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is unknown or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def per_thousand(amount: float | None, messages: int) -> float | None:
    """``amount`` per 1,000 messages, or None when unknown or nothing was sent."""
    if amount is None or messages <= 0:
        return None
    return amount * 1000 / messages


def format_number(value: float | None, digits: int = 1) -> str:
    """A table cell: '-' for unknown, thousands separators, ``digits`` decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 0) -> str:
    """A plain-text table: columns from index ``numeric_from`` on are right-aligned, others left.

    Every row must have as many cells as there are headers; a dashed line separates the header.
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns: {row!r}")
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i >= numeric_from else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def machine_busy_ticks(proc_stat_text: str) -> int:
    """Ticks all CPUs spent on anything but idle and iowait, from the first line of /proc/stat.

    user nice system idle iowait irq softirq steal; guest time is already inside user (proc(5)).
    """
    first = proc_stat_text.splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError("not the text of /proc/stat")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return user + nice + system + irq + softirq + steal


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the benchmark uses (proc(5))."""

    pid: int
    comm: str
    ppid: int
    own_ticks: int  # utime + stime
    reaped_ticks: int  # cutime + cstime: children it has waited for


def parse_proc_stat(stat_text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; the name in parentheses may hold spaces or ')'."""
    pid_text, _, rest = stat_text.partition(" (")
    comm, _, tail = rest.rpartition(") ")
    fields = tail.split()
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        ppid=int(fields[1]),
        own_ticks=int(fields[11]) + int(fields[12]),
        reaped_ticks=int(fields[13]) + int(fields[14]),
    )


def families_of(table: Mapping[int, ProcStat], roots: Mapping[int, str], unrooted: str = "other") -> dict[int, str]:
    """Each pid's family: the name of the first root among its ancestors (itself included), else ``unrooted``."""
    families: dict[int, str | None] = {}

    def family(pid: int) -> str | None:
        chain: list[int] = []
        # Bounded: a pid reused between two reads of /proc could otherwise close a loop.
        while pid in table and pid not in families and pid not in roots and len(chain) <= len(table):
            chain.append(pid)
            pid = table[pid].ppid
        found = roots[pid] if pid in roots else families.get(pid)
        for member in chain:
            families[member] = found
        return found

    return {pid: family(pid) or unrooted for pid in table}


def family_ticks(table: Mapping[int, ProcStat], roots: Mapping[int, str], unrooted: str = "other") -> dict[str, int]:
    """CPU ticks per family: every process whose ancestry reaches a root pid counts for that root's name.

    Each process counts its own ticks plus those of the children it has reaped: a short-lived
    smtpd that exits is added to postfix's master, so the difference of two such sums covers
    processes that came and went between them. Processes under no root count for ``unrooted``.
    Names without a running root are absent.
    """
    totals: dict[str, int] = {}
    for pid, name in families_of(table, roots, unrooted).items():
        totals[name] = totals.get(name, 0) + table[pid].own_ticks + table[pid].reaped_ticks
    return totals


def family_deltas(
    before: Mapping[int, ProcStat],
    after: Mapping[int, ProcStat],
    roots: Mapping[int, str],
    per_process: Sequence[str] = ("kernel",),
) -> dict[str, int]:
    """CPU ticks each family spent between two process tables.

    The difference of the family sums (``family_ticks``) is right wherever exited processes are
    reaped inside their family. Kernel threads are never reaped that way: one that exits takes its
    ticks out of the sum. Families in ``per_process`` are therefore counted process by process:
    the growth of those in both tables plus everything of those that appeared (an exited one loses
    only what it spent after ``before``).
    """
    start, end = family_ticks(before, roots), family_ticks(after, roots)
    deltas = {name: end.get(name, 0) - start.get(name, 0) for name in set(start) | set(end)}
    members = families_of(after, roots)
    for name in per_process:
        grown = 0
        for pid, stat in after.items():
            if members[pid] == name:
                earlier = before.get(pid)
                grown += stat.own_ticks - (earlier.own_ticks if earlier is not None else 0)
        deltas[name] = grown
    return deltas


def status_kb(status_text: str, name: str) -> int | None:
    """A ``kB`` value such as VmRSS or VmHWM from the text of /proc/<pid>/status, or None."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    return None


def make_body(size: int) -> str:
    """ASCII text of exactly ``size`` bytes: numbered lines of LINE_LENGTH bytes, the last one shorter.

    Lines stay short so that the sidecar sends the body as 7bit, as smtplib does here: both paths
    then put the same bytes on the wire. No line starts with '.', so no dot-stuffing differs.
    """
    if size < 1:
        raise ValueError("a body needs at least one byte")
    filler = "abcdefghijklmnopqrstuvwxyz0123456789" * 3
    lines = []
    for number in range(size // LINE_LENGTH):
        lines.append(f"{number:08d} {filler}"[: LINE_LENGTH - 1] + "\n")
    rest = size % LINE_LENGTH
    if rest:
        lines.append(f"{filler}"[: rest - 1] + "\n")
    return "".join(lines)


def recipients_for(count: int) -> list[str]:
    """``count`` distinct recipient addresses in the sink's domain."""
    return [f"rcpt{number}@{RECIPIENT_DOMAIN}" for number in range(1, count + 1)]


def build_message(sender: str, recipients: Sequence[str], body: str) -> bytes:
    """The message the direct SMTP paths send: CRLF, 7bit, headers like the sidecar's (no Bcc)."""
    message = EmailMessage(policy=email_policy.SMTP.clone(cte_type="7bit"))
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = "bench"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=SENDER_DOMAIN)
    message.set_content(body, subtype="plain", charset="utf-8", cte="7bit")
    return message.as_bytes()


def send_payload(recipients: Sequence[str], body: str, password: str, smtp_port: int) -> bytes:
    """The JSON body of one POST /api/v1/send/email."""
    request = {
        "from": SENDER,
        "to": list(recipients),
        "subject": "bench",
        "body": body,
        "password": password,
        "smtp_port": smtp_port,
    }
    return json.dumps(request).encode("utf-8")


def http_outcome(status: int, data: bytes) -> str | None:
    """None when the sidecar accepted every recipient, else a short label such as ``HTTP 403 code``.

    A 200 whose entry is not ``success`` (a partial acceptance is ``danger``) counts as an error.
    The label holds only the status and the error code: bodies never go into the results.
    """
    try:
        decoded = json.loads(data)
    except ValueError:
        return f"HTTP {status} (not JSON)"
    entry = decoded[0] if isinstance(decoded, list) and decoded else decoded
    kind = entry.get("type") if isinstance(entry, dict) else None
    if status == 200 and kind == "success":
        return None
    message = entry.get("msg") if isinstance(entry, dict) else None
    code = message[0] if isinstance(message, list) and message else message
    return f"HTTP {status} {code if isinstance(code, str) else kind}"


def split_clients(concurrency: int, processes: int) -> list[int]:
    """Spread ``concurrency`` clients over at most ``processes`` processes, as evenly as possible."""
    if concurrency < 1 or processes < 1:
        raise ValueError("need at least one client and one process")
    count = min(concurrency, processes)
    base, extra = divmod(concurrency, count)
    return [base + (1 if index < extra else 0) for index in range(count)]


@dataclass(frozen=True)
class Scenario:
    """One point of the matrix; every path runs it with the same limits."""

    name: str
    size: int
    concurrency: int
    recipients: int
    max_messages: int
    max_seconds: float
    rate: float = 0.0  # messages per second over all clients (paced load); 0: as fast as they can


def size_label(size: int) -> str:
    """1024 -> '1KB', 5 MiB -> '5MB' (binary units)."""
    if size >= MB and size % MB == 0:
        return f"{size // MB}MB"
    if size >= KB and size % KB == 0:
        return f"{size // KB}KB"
    return f"{size}B"


def plan(quick: bool) -> list[Scenario]:
    """Sizes at 10 clients; 1 vs 10 vs 20 vs 100 clients and 1 vs 50 recipients at 1 KB.

    20 clients is where the issue states its goal for port 25 against the ceiling.

    Each phase stops taking new messages at ``max_messages`` or after ``max_seconds``, whichever
    comes first, so the full matrix fits in 10 minutes and --quick in about two.
    """
    seconds = 1.5 if quick else 5.0
    large_seconds = 4.0 if quick else 10.0
    scale = 0.15 if quick else 1.0

    def count(full: int) -> int:
        return max(5, int(full * scale))

    return [
        Scenario("size-1KB", 1 * KB, 10, 1, count(3000), seconds),
        Scenario("size-100KB", 100 * KB, 10, 1, count(1500), seconds),
        Scenario("size-5MB", 5 * MB, 10, 1, 8 if quick else 40, large_seconds),
        Scenario("clients-1", 1 * KB, 1, 1, count(1500), seconds),
        Scenario("clients-20", 1 * KB, 20, 1, count(3000), seconds),
        Scenario("clients-100", 1 * KB, 100, 1, count(4000), seconds),
        Scenario("rcpt-50", 1 * KB, 10, 50, count(1500), seconds),
    ]


CEILING = "ceiling"
DIRECT_REUSED = "direct-reused"
DIRECT_NEW = "direct-new"
# path -> (postfix port, starttls | tls | plain, one session reused per client); the baselines (2) use 10587.
DIRECT_PATHS: dict[str, tuple[int, str, bool]] = {
    DIRECT_REUSED: (SUBMISSION_PORT, "starttls", True),
    DIRECT_NEW: (SUBMISSION_PORT, "starttls", False),
    "direct-new-465": (SMTPS_PORT, "tls", False),
    "direct-new-25": (PLAIN_PORT, "plain", False),
}
SIDECAR_PATHS: dict[str, int] = {"sidecar-587": SUBMISSION_PORT, "sidecar-465": SMTPS_PORT, "sidecar-25": PLAIN_PORT}
# The direct path on the same postfix port as each sidecar path, for the "x port" ratio.
SAME_PORT_BASELINE = {"sidecar-587": DIRECT_NEW, "sidecar-465": "direct-new-465", "sidecar-25": "direct-new-25"}
ALL_PATHS = [CEILING, *DIRECT_PATHS, *SIDECAR_PATHS]


@dataclass
class PhaseResult:
    """The raw numbers of one path in one scenario (what --json writes)."""

    scenario: str
    size: int
    concurrency: int
    recipients: int
    path: str
    status: str = "ok"  # ok | not available | failed
    sent: int = 0
    errors: int = 0
    error_samples: dict[str, int] = field(default_factory=dict)
    wall_s: float | None = None
    msgs_per_s: float | None = None
    latency_ms: dict[str, float] | None = None
    sidecar_cpu_s: float | None = None
    client_cpu_s: float | None = None
    family_cpu_s: dict[str, float] = field(default_factory=dict)  # by FAMILIES name
    machine_cpu_s: float | None = None
    sidecar_vmhwm_kb: int | None = None  # peak RSS: the sidecar runs only for this phase
    sidecar_source: str = ""  # fingerprint of the service's code this phase's sidecar started with
    client_processes: int = 0
    note: str = ""

    def cpu_s(self, which: str) -> float | None:
        """CPU seconds of 'sidecar', 'client', 'machine', a family, or 'rest'.

        'rest' is the machine's CPU that no process seen in both snapshots was charged with:
        interrupts, this run's own parent process, rounding of clock ticks (it can be slightly negative).
        """
        if which in ("sidecar", "client", "machine"):
            value: float | None = getattr(self, f"{which}_cpu_s")
            return value
        if which == "rest":
            if self.machine_cpu_s is None:
                return None
            known = [self.sidecar_cpu_s, self.client_cpu_s, *(self.family_cpu_s.get(name) for name in FAMILIES)]
            return self.machine_cpu_s - sum(v for v in known if v is not None)
        return self.family_cpu_s.get(which)

    def cpu_per_1k(self, which: str) -> float | None:
        """CPU seconds per 1,000 accepted messages (see ``cpu_s`` for ``which``)."""
        return per_thousand(self.cpu_s(which), self.sent)

    def cpu_share(self, which: str) -> float | None:
        """CPU (see ``cpu_s``) as a percentage of one core over the phase's wall time."""
        amount = self.cpu_s(which)
        if amount is None or not self.wall_s:
            return None
        return 100 * amount / self.wall_s


# Families reported; "other" is every process outside the bed, MariaDB and this run (other users).
FAMILIES = ("postfix", "sink", "dovecot", "mariadb", "kernel", "other")

SPEED_HEADERS = [
    "size", "clients", "rcpt", "path", "sent", "err", "msg/s", "p50 ms", "p95 ms", "p99 ms",
    "client CPU%", "sidecar CPU%", "machine CPU%",
]  # fmt: skip
COST_HEADERS = [
    "size", "clients", "rcpt", "path", "sidecar", "client", "postfix", "sink", "dovecot", "mariadb", "kernel",
    "other", "rest", "machine", "sidecar peak RSS MB",
]  # fmt: skip


def _row_head(result: PhaseResult) -> list[str]:
    return [size_label(result.size), str(result.concurrency), str(result.recipients), result.path]


def speed_row(result: PhaseResult) -> list[str]:
    """One line of the throughput and latency table."""
    head = _row_head(result)
    counts = [format_number(result.sent), format_number(result.errors)]
    if result.status != "ok":
        reason = result.status + (f": {result.note}" if result.note else "")
        return head + counts + [reason] + ["-"] * (len(SPEED_HEADERS) - 7)
    latency = result.latency_ms or {}
    return (
        head
        + counts
        + [
            format_number(result.msgs_per_s),
            format_number(latency.get("p50")),
            format_number(latency.get("p95")),
            format_number(latency.get("p99")),
            format_number(result.cpu_share("client"), 0),
            format_number(result.cpu_share("sidecar"), 0),
            format_number(result.cpu_share("machine"), 0),
        ]
    )


def cost_row(result: PhaseResult) -> list[str]:
    """One line of the cost table: CPU seconds per 1,000 messages by process family, and RSS."""
    if result.status != "ok":
        return _row_head(result) + ["-"] * (len(COST_HEADERS) - 4)
    rss = result.sidecar_vmhwm_kb / 1024 if result.sidecar_vmhwm_kb is not None else None
    cells = [
        format_number(result.cpu_per_1k(which), 2) for which in ("sidecar", "client", *FAMILIES, "rest", "machine")
    ]
    return _row_head(result) + cells + [format_number(rss, 0)]


RATIO_HEADERS = [
    "size", "clients", "rcpt", "path",
    "msg/s x ceil", "x reused", "x new", "x port",
    "p50 x reused", "x new", "x port", "p99 x reused", "x new",
    "machine CPU x ceil", "x reused", "x new", "sidecar CPU / client CPU x reused", "x new",
]  # fmt: skip


def ratios(result: PhaseResult, baselines: Mapping[str, PhaseResult]) -> dict[str, float | None]:
    """Each sidecar figure divided by the same figure of a baseline path of the same scenario.

    msg/s below 1 means slower than the baseline; latency and CPU above 1 mean slower / costlier.
    "port" is the direct new-connection path on the same postfix port; "sidecar CPU / client CPU"
    compares what the sidecar process spends with what a Python client spends submitting itself.
    """

    def usable(path: str) -> PhaseResult | None:
        base = baselines.get(path)
        return base if base is not None and base.status == "ok" and base.sent > 0 else None

    def latency(res: PhaseResult | None, key: str) -> float | None:
        return res.latency_ms.get(key) if res is not None and res.latency_ms else None

    def rate(res: PhaseResult | None) -> float | None:
        return res.msgs_per_s if res is not None else None

    def cpu(res: PhaseResult | None, which: str) -> float | None:
        return res.cpu_per_1k(which) if res is not None else None

    ceiling, reused, new = usable(CEILING), usable(DIRECT_REUSED), usable(DIRECT_NEW)
    port = usable(SAME_PORT_BASELINE.get(result.path, ""))
    own = result if result.status == "ok" and result.sent > 0 else None
    return {
        "msgs_per_s_vs_ceiling": ratio(rate(own), rate(ceiling)),
        "msgs_per_s_vs_reused": ratio(rate(own), rate(reused)),
        "msgs_per_s_vs_new": ratio(rate(own), rate(new)),
        "msgs_per_s_vs_port": ratio(rate(own), rate(port)),
        "p50_vs_reused": ratio(latency(own, "p50"), latency(reused, "p50")),
        "p50_vs_new": ratio(latency(own, "p50"), latency(new, "p50")),
        "p50_vs_port": ratio(latency(own, "p50"), latency(port, "p50")),
        "p99_vs_reused": ratio(latency(own, "p99"), latency(reused, "p99")),
        "p99_vs_new": ratio(latency(own, "p99"), latency(new, "p99")),
        "machine_cpu_vs_ceiling": ratio(cpu(own, "machine"), cpu(ceiling, "machine")),
        "machine_cpu_vs_reused": ratio(cpu(own, "machine"), cpu(reused, "machine")),
        "machine_cpu_vs_new": ratio(cpu(own, "machine"), cpu(new, "machine")),
        "sidecar_cpu_vs_client_reused": ratio(cpu(own, "sidecar"), cpu(reused, "client")),
        "sidecar_cpu_vs_client_new": ratio(cpu(own, "sidecar"), cpu(new, "client")),
    }


def ratio_row(result: PhaseResult, values: Mapping[str, float | None]) -> list[str]:
    """One line of the ratio table, in RATIO_HEADERS order."""
    head = [size_label(result.size), str(result.concurrency), str(result.recipients), result.path]
    return head + [format_number(value, 2) for value in values.values()]


def render_report(results: Sequence[PhaseResult]) -> str:
    """The main table, then the ratio table of the sidecar paths (groups in run order)."""
    speed = format_table(SPEED_HEADERS, [speed_row(r) for r in results], numeric_from=4)
    cost = format_table(COST_HEADERS, [cost_row(r) for r in results], numeric_from=4)
    groups: dict[tuple[str, int, int, int], dict[str, PhaseResult]] = {}
    for result in results:
        groups.setdefault((result.scenario, result.size, result.concurrency, result.recipients), {})[result.path] = (
            result
        )
    ratio_rows = [
        ratio_row(result, ratios(result, group))
        for group in groups.values()
        for result in group.values()
        if result.path in SIDECAR_PATHS
    ]
    ratio_table = format_table(RATIO_HEADERS, ratio_rows, numeric_from=4)
    problems = [
        f"  {size_label(r.size)} c={r.concurrency} rcpt={r.recipients} {r.path}: "
        + ", ".join(f"{label} x{count}" for label, count in sorted(r.error_samples.items()))
        for r in results
        if r.error_samples
    ]
    errors = ("\n\nErrors (counted in 'err', excluded from latencies):\n" + "\n".join(problems)) if problems else ""
    return (
        f"Throughput and latency:\n{speed}{errors}\n\n"
        f"CPU seconds per 1,000 messages, by process family:\n{cost}\n\n"
        f"Sidecar figures as ratios to the baselines of the same scenario:\n{ratio_table}"
    )


# ================================================================================ measuring


def read_text(path: str) -> str:
    """The whole text of a /proc file."""
    with open(path) as handle:
        return handle.read()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) in seconds."""
    return parse_proc_stat(read_text(f"/proc/{pid}/stat")).own_ticks / CLOCK_TICKS


@dataclass(frozen=True)
class ProcessCpu:
    """One process's CPU counters: utime + stime (clock ticks, dead threads included) and, per
    live thread, its time on a CPU in nanoseconds (the first field of its ``schedstat``)."""

    ticks_seconds: float
    threads_ns: dict[int, int]

    @classmethod
    def read(cls, pid: int) -> ProcessCpu:
        """The counters of ``pid`` now (threads that exit while being read are skipped)."""
        threads = {}
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    threads[int(entry.name)] = int(read_text(f"/proc/{pid}/task/{entry.name}/schedstat").split()[0])
        return cls(process_cpu_seconds(pid), threads)


def cpu_seconds_between(before: ProcessCpu, after: ProcessCpu) -> float:
    """The CPU seconds one process spent between two readings.

    utime + stime count in clock ticks (10 ms at 100 Hz), too coarse for a phase of a few hundred
    messages; the threads' schedstat counts nanoseconds. It is used when every thread of the first
    reading is still there at the second (a thread's time goes with it when it exits); else the ticks.
    """
    if before.threads_ns and all(tid in after.threads_ns for tid in before.threads_ns):
        return sum(ns - before.threads_ns.get(tid, 0) for tid, ns in after.threads_ns.items()) / 1e9
    return after.ticks_seconds - before.ticks_seconds


def process_table() -> dict[int, ProcStat]:
    """Every process now running, by pid (processes that exit while being read are skipped)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = parse_proc_stat(read_text(f"/proc/{entry.name}/stat"))
                table[stat.pid] = stat
    return table


def pid_from_file(path: Path) -> int | None:
    """The pid in a daemon's pid file (postfix pads it with spaces), or None."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


KERNEL_THREADS_PID = 2  # kthreadd: every kernel thread (kworker, ksoftirqd...) is its child


def family_roots(directory: Path) -> dict[int, str]:
    """The roots of the families accounted: the bed's daemons, MariaDB, kernel threads, and this run.

    This process's own tree ("bench": the load generators and the sidecar) is measured apart and
    kept out of "other", which is then everything else running on the machine.
    """
    roots = {KERNEL_THREADS_PID: "kernel", os.getpid(): "bench"}
    for name, pid_file in (
        ("postfix", directory / "queue" / "pid" / "master.pid"),
        ("dovecot", directory / "dovecot" / "run" / "master.pid"),
        ("sink", directory / "sink" / "smtp-sink.pid"),
    ):
        pid = pid_from_file(pid_file)
        if pid is not None:
            roots[pid] = name
    for stat in process_table().values():
        if stat.comm in ("mariadbd", "mysqld"):
            roots[stat.pid] = "mariadb"
    return roots


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    return machine_busy_ticks(read_text("/proc/stat")) / CLOCK_TICKS


@dataclass
class Meter:
    """What a phase accounts: the sidecar (on sidecar paths only) and the families of ``roots``."""

    sidecar_pid: int | None
    roots: dict[int, str]
    # Further processes measured on their own (utime + stime), by name: e.g. a second sidecar
    # under the same load; their CPU lands in the result's family_cpu_s under that name.
    apart: dict[str, int] = field(default_factory=dict)


@dataclass
class Snapshot:
    """CPU counters at one moment: the sidecar's and the machine's (seconds), and every process."""

    sidecar_cpu: ProcessCpu | None
    processes: dict[int, ProcStat]
    machine_cpu: float
    roots: dict[int, str]
    apart: dict[str, ProcessCpu] = field(default_factory=dict)

    @classmethod
    def take(cls, meter: Meter) -> Snapshot:
        """Read the counters now."""
        return cls(
            sidecar_cpu=ProcessCpu.read(meter.sidecar_pid) if meter.sidecar_pid is not None else None,
            processes=process_table(),
            machine_cpu=machine_cpu_seconds(),
            roots=meter.roots,
            apart={name: ProcessCpu.read(pid) for name, pid in meter.apart.items()},
        )


def fill_cpu(result: PhaseResult, before: Snapshot, after: Snapshot) -> None:
    """Store the CPU seconds the sidecar, each family and the machine spent between two snapshots."""
    if before.sidecar_cpu is not None and after.sidecar_cpu is not None:
        result.sidecar_cpu_s = cpu_seconds_between(before.sidecar_cpu, after.sidecar_cpu)
    deltas = family_deltas(before.processes, after.processes, after.roots)
    result.family_cpu_s = {name: deltas[name] / CLOCK_TICKS for name in FAMILIES if name in deltas}
    for name, reading in after.apart.items():
        if name in before.apart:
            result.family_cpu_s[name] = cpu_seconds_between(before.apart[name], reading)
    result.machine_cpu_s = after.machine_cpu - before.machine_cpu


# -------------------------------------------------------------------------------- clients


class Sender(Protocol):
    """One client: connect once, then submit one message per ``send``."""

    def open(self) -> None:
        """Connect (and, for a reused SMTP session, STARTTLS and AUTH) before the clock starts."""

    def send(self) -> str | None:
        """Submit one message; None on success, else a short error label without secrets."""

    def close(self) -> None:
        """Disconnect politely."""


class HttpSender:
    """A keep-alive HTTP/1.1 connection to the sidecar posting the same request each time."""

    def __init__(self, port: int, payload: bytes, api_key: str) -> None:
        self.port = port
        self.payload = payload
        self.headers = {"Content-Type": "application/json", "X-API-Key": api_key}
        self.connection = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)

    def open(self) -> None:
        """Open the TCP connection now, so the first request does not pay for it."""
        self.connection.connect()

    def send(self) -> str | None:
        """POST one message and classify the answer."""
        try:
            self.connection.request("POST", SEND_PATH, body=self.payload, headers=self.headers)
            response = self.connection.getresponse()
            return http_outcome(response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()  # the next request reconnects
            return type(exc).__name__

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def smtp_error_label(exc: BaseException) -> str:
    """Exception class and SMTP code only: smtplib's texts may quote the session."""
    code = getattr(exc, "smtp_code", None)
    return f"{type(exc).__name__}" + (f" {code}" if code is not None else "")


@dataclass
class SmtpSender:
    """smtplib towards postfix: one session reused for every message, or a new one per message."""

    port: int
    security: str  # starttls | tls | plain
    reuse: bool
    cafile: str
    login: str
    password: str
    recipients: list[str]
    message: bytes
    session: smtplib.SMTP | None = None
    context: ssl.SSLContext | None = None

    def _connect(self) -> smtplib.SMTP:
        if self.context is None:
            # postfix's certificate carries IP:127.0.0.1, the name smtplib checks.
            self.context = ssl.create_default_context(cafile=self.cafile)
        if self.security == "tls":
            session: smtplib.SMTP = smtplib.SMTP_SSL(
                HOST, self.port, local_hostname="bench.localhost", timeout=CLIENT_TIMEOUT, context=self.context
            )
        else:
            session = smtplib.SMTP(HOST, self.port, local_hostname="bench.localhost", timeout=CLIENT_TIMEOUT)
            if self.security == "starttls":
                session.starttls(context=self.context)
        if self.security != "plain":
            session.login(self.login, self.password)
        return session

    def open(self) -> None:
        """Reused sessions connect, STARTTLS and AUTH here, outside the measured time."""
        if self.reuse:
            self.session = self._connect()

    def send(self) -> str | None:
        """Submit one message (over a fresh session unless reusing one)."""
        try:
            if not self.reuse:
                with self._connect() as session:
                    session.sendmail(SENDER, self.recipients, self.message)
                return None
            if self.session is None:
                self.session = self._connect()
            self.session.sendmail(SENDER, self.recipients, self.message)
            return None
        except (OSError, smtplib.SMTPException) as exc:
            if self.reuse:
                self._drop()
            return smtp_error_label(exc)

    def _drop(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self.session.close()
            self.session = None

    def close(self) -> None:
        """QUIT a reused session."""
        if self.session is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self.session.quit()
            self._drop()


@dataclass
class Shared:
    """What the client processes share with the parent (multiprocessing primitives, fork context)."""

    tickets: Any  # Value('q'): messages handed out so far
    start: Any  # Value('d'): time.monotonic() when the clock started
    go: Any  # Event: the clock has started
    out: Any  # Queue: ("ready"|"done", pid, payload)
    max_messages: int
    max_seconds: float
    rate: float = 0.0  # paced load: ticket n is due n / rate seconds after the start; 0: no pacing


def ticket_due(start: float, number: int, rate: float) -> float:
    """When ticket ``number`` (0, 1, ...) may be used under a rate of ``rate`` per second; ``start`` without pacing."""
    return start + number / rate if rate > 0 else start


def take_ticket(shared: Shared) -> bool:
    """True when another message may be sent: under the count and before the deadline.

    Under a rate, the ticket's holder first waits until the ticket is due, so that all clients
    together send at that rate (as long as enough of them are free); a ticket due after the
    deadline is not handed out.
    """
    start = shared.start.value
    if time.monotonic() >= start + shared.max_seconds:
        return False
    with shared.tickets.get_lock():
        if shared.tickets.value >= shared.max_messages:
            return False
        number = shared.tickets.value
        shared.tickets.value += 1
    if shared.rate <= 0:
        return True
    due = ticket_due(start, number, shared.rate)
    if due >= start + shared.max_seconds:
        return False
    time.sleep(max(0.0, due - time.monotonic()))
    return True


@dataclass
class ThreadTally:
    """What one client thread did."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    last_end: float = 0.0


def _client_thread(sender: Sender, shared: Shared, ready: threading.Barrier, tally: ThreadTally) -> None:
    try:
        sender.open()
    except (OSError, smtplib.SMTPException, http.client.HTTPException) as exc:
        tally.errors[f"connect: {smtp_error_label(exc)}"] += 1
        ready.wait()
        return
    ready.wait()
    shared.go.wait()
    while take_ticket(shared):
        began = time.monotonic()
        problem = sender.send()
        tally.last_end = time.monotonic()
        if problem is None:
            tally.latencies.append(tally.last_end - began)
        else:
            tally.errors[problem] += 1
    with contextlib.suppress(OSError, smtplib.SMTPException):
        sender.close()


def _client_process(make_sender: Callable[[], Sender], threads: int, shared: Shared) -> None:
    """One load-generating process: ``threads`` clients, each with its own connection."""
    tallies = [ThreadTally() for _ in range(threads)]
    ready = threading.Barrier(threads + 1)
    workers = [
        threading.Thread(target=_client_thread, args=(make_sender(), shared, ready, tally), daemon=True)
        for tally in tallies
    ]
    for worker in workers:
        worker.start()
    ready.wait(READY_TIMEOUT)
    shared.out.put(("ready", os.getpid(), None))
    shared.go.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for worker in workers:
        worker.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    payload = {
        "latencies": [value for tally in tallies for value in tally.latencies],
        "errors": dict(errors),
        "last_end": max(tally.last_end for tally in tallies),
        "cpu": cpu,
    }
    shared.out.put(("done", os.getpid(), payload))


def run_clients(
    result: PhaseResult, scenario: Scenario, make_sender: Callable[[], Sender], processes: int, meter: Meter
) -> None:
    """Run ``scenario.concurrency`` clients in forked processes and fill ``result`` with what they saw.

    Clients connect first; the clock starts once every one of them is ready. This process runs
    no threads of its own, so forking it is safe.
    """
    context = multiprocessing.get_context("fork")
    shared = Shared(
        tickets=context.Value("q", 0),
        start=context.Value("d", 0.0),
        go=context.Event(),
        out=context.Queue(),
        max_messages=scenario.max_messages,
        max_seconds=scenario.max_seconds,
        rate=scenario.rate,
    )
    shares = split_clients(scenario.concurrency, processes)
    children = [context.Process(target=_client_process, args=(make_sender, n, shared), daemon=True) for n in shares]
    result.client_processes = len(children)
    for child in children:
        child.start()
    try:
        for _ in children:
            shared.out.get(timeout=READY_TIMEOUT)
        before = Snapshot.take(meter)
        shared.start.value = time.monotonic()
        shared.go.set()
        done = [shared.out.get(timeout=scenario.max_seconds + 2 * CLIENT_TIMEOUT) for _ in children]
        after = Snapshot.take(meter)
        for child in children:
            child.join(30)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5)
    latencies = [value for _, _, payload in done for value in payload["latencies"]]
    errors: Counter[str] = Counter()
    for _, _, payload in done:
        errors.update(payload["errors"])
    last_end = max(payload["last_end"] for _, _, payload in done)
    result.sent = len(latencies)
    result.errors = sum(errors.values())
    result.error_samples = dict(errors)
    result.wall_s = max(last_end - shared.start.value, 1e-9) if result.sent or result.errors else None
    result.msgs_per_s = result.sent / result.wall_s if result.wall_s and result.sent else None
    result.latency_ms = latency_summary(latencies)
    result.client_cpu_s = sum(payload["cpu"] for _, _, payload in done)
    fill_cpu(result, before, after)
    if result.sent == 0:
        result.status = "failed"
        result.note = ", ".join(sorted(errors)) or "nothing sent"


def run_ceiling(result: PhaseResult, scenario: Scenario, meter: Meter) -> None:
    """postfix's smtp-source into the plain port: -d reuses each session, -s sessions in parallel.

    smtp-source measures no latencies; its own CPU is the rusage of the reaped child.
    """
    command = [
        "smtp-source",
        "-d",
        "-s", str(scenario.concurrency),
        "-m", str(scenario.max_messages),
        "-l", str(scenario.size),
        "-r", str(scenario.recipients),
        "-f", SENDER,
        "-t", f"rcpt@{RECIPIENT_DOMAIN}",
        "-M", "bench.localhost",
        f"{HOST}:{PLAIN_PORT}",
    ]  # fmt: skip
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = Snapshot.take(meter)
    began = time.monotonic()
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10 * scenario.max_seconds + 120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        result.status, result.note = "failed", "smtp-source timed out"
        return
    wall = time.monotonic() - began
    after = Snapshot.take(meter)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        result.status = "failed"
        result.note = f"smtp-source exit {completed.returncode}: {completed.stderr.strip()[-200:]}"
        return
    result.client_processes = 1
    result.sent = scenario.max_messages
    result.wall_s = wall
    result.msgs_per_s = scenario.max_messages / wall
    result.client_cpu_s = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    fill_cpu(result, before, after)


# ================================================================================ the bed and the sidecar


@contextlib.contextmanager
def bed_lock(directory: Path) -> Iterator[None]:
    """The lock the integration tests take (tests/integration/conftest.py): one user of the bed."""
    from tests.integration import conftest

    try:
        with conftest.bed_lock(directory, lambda: progress(f"waiting for {directory}.lock (a test session is using the bed)")):
            yield
    except conftest.LockTimeout as exc:
        raise SystemExit(f"bench: {exc}") from None


@dataclass
class Bench:
    """Everything one run set up: the bed, its rows, the sidecar, and where its log goes."""

    directory: Path
    workdir: Path
    api_key: str
    password: str
    started_bed: bool
    sidecar_options: Sequence[str] = ()
    roots: dict[int, str] = field(default_factory=dict)  # process families accounted (family_roots)

    @property
    def cafile(self) -> str:
        """The bed's self-signed certificate, the CA the clients trust."""
        return str(self.directory / "tls" / "cert.pem")


def progress(text: str) -> None:
    """One progress line on stderr (the tables go to stdout)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def bed_running(directory: Path) -> bool:
    """True when testbed.sh status finds postfix, dovecot and smtp-sink running."""
    from tests.integration.conftest import SCRIPT

    env = dict(os.environ, SMTPAPI_TESTBED_DIR=str(directory))
    status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, timeout=30, check=False)
    return status.returncode == 0


def prepare_bed(directory: Path, workdir: Path) -> Bench:
    """Recreate the database, start (or reuse) the bed, and add the sender's rows.

    The mailbox's password is stored as {PLAIN}: the bed disables dovecot's auth cache, and a
    bcrypt check per AUTH would make dovecot's hashing what the SMTP paths measure.
    """
    from tests.integration.conftest import Testbed, create_database, new_api_key, run_testbed_script

    reused = bed_running(directory)
    create_database()
    run_testbed_script(directory, "start", timeout=300)
    bed = Testbed(directory)
    password = secrets.token_urlsafe(18)
    bed.add_domain(SENDER_DOMAIN)
    bed.add_mailbox(SENDER, password, "PLAIN")
    api_key = bed.add_api_key(new_api_key(), allow_from=HOST)
    if bed._connection is not None:
        bed._connection.close()
    run_testbed_script(directory, "clear-messages")
    return Bench(directory=directory, workdir=workdir, api_key=api_key, password=password, started_bed=not reused)


@contextlib.contextmanager
def running_sidecar(bench: Bench) -> Iterator[Any]:
    """A fresh sidecar for one phase, so that its VmHWM (a process-lifetime peak) is that phase's peak RSS."""
    sidecar = start_sidecar(bench, bench.sidecar_options)
    try:
        yield sidecar
    finally:
        sidecar.stop()


def start_sidecar(
    bench: Bench,
    extra: Sequence[str],
    *,
    launcher: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
    name: str = "sidecar",
) -> Any:
    """``twistd -n smtpapi`` with the options of the integration tests' ``sidecar`` fixture.

    ``launcher`` goes before twistd's path (e.g. a profiler's wrapper), ``env_extra`` into its
    environment (e.g. PYTHONPATH for another version of the service's source); its output goes
    to ``<name>.log`` in the run's work directory.
    """
    from tests.integration.conftest import SIDECAR_START_TIMEOUT, Sidecar, Testbed, _healthy, free_port, twistd_path

    bed = Testbed(bench.directory)
    port = free_port()
    log_path = bench.workdir / f"{name}.log"
    argv = [
        *launcher, str(twistd_path()), "-n", "--pidfile=", "smtpapi",
        "--listen", f"tcp:{port}:interface={HOST}",
        "--db", bed.db_url,
        "--smtp-host", HOST,
        "--smtp-port", str(SUBMISSION_PORT),
        "--smtp-allow", f"{HOST}:{SUBMISSION_PORT},{HOST}:{SMTPS_PORT}/tls,{HOST}:{PLAIN_PORT}/plain",
        "--smtp-ca", bench.cafile,
        "--smtp-tls-name", "localhost",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_")} | dict(env_extra or {})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=bench.workdir, env=env
        )
    sidecar = Sidecar(port=port, process=process, log_path=log_path, argv=argv)
    deadline = time.monotonic() + SIDECAR_START_TIMEOUT
    while not _healthy(port):
        if process.poll() is not None or time.monotonic() >= deadline:
            sidecar.stop()
            raise SystemExit(f"bench: the sidecar did not start:\n{sidecar.log_text()[-3000:]}")
        time.sleep(0.1)
    return sidecar


@contextlib.contextmanager
def db_connection_limit(minimum: int) -> Iterator[int | None]:
    """Raise MariaDB's max_connections to ``minimum`` for the run (runtime only), then restore it.

    mailcow's MariaDB allows 500 connections (data/conf/mysql/my.cnf, ``max-connections``); the
    server's default is 151. The bed's postfix also holds one connection per smtpd process (its map
    is ``mysql:``, where mailcow shares connections through ``proxy:mysql:``), and dovecot's auth
    workers hold their own: at 100 clients the default runs out and postfix answers 451.
    Yields the value that was there before (None when left alone).
    """
    from tests.integration.conftest import Testbed, testbed_dir

    def execute(sql: str) -> Any:
        # A new connection each time: the run outlasts MariaDB's idle timeouts.
        with Testbed(testbed_dir()).connect(database=False) as connection, connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()

    previous = int(execute("SELECT @@GLOBAL.max_connections")[0]) if minimum > 0 else None
    if previous is None or previous >= minimum:
        yield None
        return
    execute(f"SET GLOBAL max_connections = {int(minimum)}")
    try:
        yield previous
    finally:
        execute(f"SET GLOBAL max_connections = {previous}")


@contextlib.contextmanager
def logs_trimmed(directory: Path) -> Iterator[None]:
    """Cut the bed's logs back to their sizes before the run: a full run adds ~40 MB to postfix's log.

    Only what this run appended goes (it holds the bed's lock, so no one else wrote meanwhile);
    postfix's postlogd and dovecot append, so a log that is still open keeps working.
    """
    folder = directory / "log"
    sizes = {path: path.stat().st_size for path in folder.glob("*.log")} if folder.is_dir() else {}
    try:
        yield
    finally:
        for path in folder.glob("*.log") if folder.is_dir() else ():
            with contextlib.suppress(OSError):
                if path.stat().st_size > sizes.get(path, 0):
                    os.truncate(path, sizes.get(path, 0))


def source_fingerprint(folder: Path = REPO / "src") -> str:
    """A short hash of the service's Python sources (names and contents), to tell code versions apart."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def check_disk(directory: Path) -> None:
    """Stop before the queue and the sink could fill the disk."""
    free = shutil.disk_usage(directory).free
    if free < MIN_FREE_BYTES:
        raise SystemExit(f"bench: only {free / MB:.0f} MB free under {directory}; need {MIN_FREE_BYTES / MB:.0f} MB")


def probe_sidecar(port: int, payload: bytes, api_key: str) -> str | None:
    """One request before a sidecar phase (not counted): warms the database pool, finds 'not available'."""
    sender = HttpSender(port, payload, api_key)
    try:
        sender.open()
        return sender.send()
    except OSError as exc:
        return type(exc).__name__
    finally:
        sender.close()


def run_phase(bench: Bench, scenario: Scenario, path: str, processes: int) -> PhaseResult:
    """Measure one path for one scenario, then empty postfix's queue and the sink."""
    from tests.integration.conftest import run_testbed_script

    check_disk(bench.directory)
    result = PhaseResult(scenario.name, scenario.size, scenario.concurrency, scenario.recipients, path)
    body = make_body(scenario.size)
    recipients = recipients_for(scenario.recipients)
    if path == CEILING:
        run_ceiling(result, scenario, Meter(None, bench.roots))
    elif path in DIRECT_PATHS:
        port, security, reuse = DIRECT_PATHS[path]
        message = build_message(SENDER, recipients, body)

        def make_smtp() -> Sender:
            return SmtpSender(port, security, reuse, bench.cafile, SENDER, bench.password, recipients, message)

        run_clients(result, scenario, make_smtp, processes, Meter(None, bench.roots))
    else:
        payload = send_payload(recipients, body, bench.password, SIDECAR_PATHS[path])
        run_sidecar_phase(bench, result, scenario, payload, processes)
    # Queued mail would be delivered during the next phase and its files would pile up.
    run_testbed_script(bench.directory, "clear-messages")
    return result


def run_sidecar_phase(bench: Bench, result: PhaseResult, scenario: Scenario, payload: bytes, processes: int) -> None:
    """HTTP clients against a sidecar started for this phase; an unwired port 25 is 'not available'."""
    # Each phase starts its own sidecar: if the code changes during a run, the phases differ.
    result.sidecar_source = source_fingerprint()
    with running_sidecar(bench) as sidecar:
        problem = probe_sidecar(sidecar.port, payload, bench.api_key)
        if problem is not None and "smtp_port25_unavailable" in problem:
            result.status, result.note = "not available", "smtp_port25_unavailable"
        elif problem is not None:
            result.status, result.note = "failed", f"probe: {problem}"
        else:

            def make_http() -> Sender:
                return HttpSender(sidecar.port, payload, bench.api_key)

            run_clients(result, scenario, make_http, processes, Meter(sidecar.process.pid, bench.roots))
        result.sidecar_vmhwm_kb = status_kb(read_text(f"/proc/{sidecar.process.pid}/status"), "VmHWM")


# ================================================================================ the run


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in read_text("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    mem_kb = status_kb(read_text("/proc/meminfo"), "MemTotal")
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    postfix = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "memory_mb": mem_kb // 1024 if mem_kb else None,
        "python": platform.python_version(),
        "postfix": postfix.stdout.strip(),
        "commit": commit.stdout.strip(),
    }


def add_matrix_options(parser: argparse.ArgumentParser, scenarios: Sequence[str], paths: Sequence[str]) -> None:
    """The options that pick a run's phases and shape its load (bench.run's and bench.cpu's)."""
    parser.add_argument("--client-procs", type=int, default=0, help="load-generator processes (default: 2 per CPU)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of: {', '.join(scenarios)}")
    parser.add_argument("--paths", help=f"comma-separated subset of: {', '.join(paths)}")
    parser.add_argument(
        "--sidecar-option", action="append", default=[], metavar="OPT", help="extra twistd smtpapi option (repeatable)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts and 1.5 s phases (about two minutes)")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers of every phase to FILE")
    add_matrix_options(parser, [s.name for s in plan(False)], ALL_PATHS)
    parser.add_argument(
        "--db-max-connections",
        type=int,
        default=500,
        metavar="N",
        help="raise MariaDB's max_connections to N during the run, as mailcow configures it (0: leave it)",
    )
    parser.add_argument("--keep-bed", action="store_true", help="leave the test bed running at the end")
    parser.add_argument("--keep-logs", action="store_true", help="keep what the run appended to the bed's logs")
    return parser.parse_args(argv)


def selected(names: str | None, available: Sequence[str], what: str) -> list[str]:
    """The names picked by a comma-separated option, in the canonical order; all when not given."""
    if not names:
        return list(available)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise SystemExit(f"bench: unknown {what}: {', '.join(unknown)}")
    return [name for name in available if name in wanted]


def run(options: argparse.Namespace) -> int:
    """Set up, measure every selected phase, print the tables, write the JSON, tear down."""
    from tests.integration.conftest import run_testbed_script, testbed_dir

    scenarios = plan(options.quick)
    chosen = selected(options.scenarios, [s.name for s in scenarios], "scenarios")
    scenarios = [s for s in scenarios if s.name in chosen]
    paths = selected(options.paths, ALL_PATHS, "paths")
    processes = options.client_procs or 2 * (os.cpu_count() or 1)
    directory = testbed_dir()
    if os.geteuid() != 0:
        raise SystemExit("bench: the test bed needs root (postfix's and dovecot's masters drop privileges)")
    check_disk(directory.parent)
    facts = machine_facts()
    results: list[PhaseResult] = []
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(bed_lock(directory))
        if not options.keep_logs:
            stack.enter_context(logs_trimmed(directory))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpapi-bench-"))
        previous_limit = stack.enter_context(db_connection_limit(options.db_max_connections))
        if previous_limit is not None:
            progress(f"MariaDB max_connections {previous_limit} -> {options.db_max_connections} for this run")
        facts["db_max_connections"] = {"before": previous_limit, "during": options.db_max_connections}
        bench = prepare_bed(directory, Path(work))
        bench.sidecar_options = options.sidecar_option
        progress(f"bed {'started' if bench.started_bed else 'reused'} in {directory}")
        try:
            bench.roots = family_roots(directory)
            missing = sorted(set(FAMILIES) - set(bench.roots.values()) - {"other"})
            if missing:
                progress(f"not accounted (no running process found): {', '.join(missing)}")
            for scenario in scenarios:
                for path in paths:
                    result = run_phase(bench, scenario, path, processes)
                    results.append(result)
                    progress(
                        f"{scenario.name:12} {path:15} {result.status:13} sent={result.sent} "
                        f"err={result.errors} msg/s={format_number(result.msgs_per_s)}"
                    )
        finally:
            run_testbed_script(directory, "clear-messages")
            if bench.started_bed and not options.keep_bed:
                run_testbed_script(directory, "stop")
            elif previous_limit is not None:
                # Idle smtpd processes keep their MariaDB connections for up to 100 s: let them go
                # before the connection limit drops back.
                run_testbed_script(directory, "restart-postfix")
    elapsed = time.monotonic() - began
    print(render_report(results))
    sources = sorted({r.sidecar_source for r in results if r.sidecar_source})
    print(
        f"\nWhole run {elapsed:.0f} s on {facts['cpus']} CPUs ({facts['cpu']}); "
        f"at most {processes} load-generator processes; {facts['date']}; service source {', '.join(sources)}"
    )
    if len(sources) > 1:
        print("WARNING: the service's source changed during the run; its phases measured different code")
    if options.json:
        document = {
            "meta": {**facts, "command": sys.orig_argv, "elapsed_s": elapsed, "options": vars(options)},
            "scenarios": [asdict(s) for s in scenarios],
            "phases": [asdict(r) for r in results],
            "ratios": [
                {
                    "scenario": r.scenario,
                    "path": r.path,
                    **ratios(r, {b.path: b for b in results if b.scenario == r.scenario}),
                }
                for r in results
                if r.path in SIDECAR_PATHS
            ],
        }
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.status != "failed" for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    options = parse_args(argv)
    try:
        return run(options)
    except BaseException as exc:
        # The conftest helpers report a broken bed through pytest.fail (an OutcomeException).
        if type(exc).__name__ == "Failed":
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
