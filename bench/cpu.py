"""CPU per message: the sidecar's, postfix's beside it, and the floors of the sidecar's stack, in one run.

    .venv/bin/python -m bench.cpu [--quick] [--json FILE] [--profile FILE] [--ab-base DIR]

For every scenario (1 KB paced at 200 msg/s; 1 KB saturated with 1, 10 and 100 clients; 100 KB
and 5 MB with 10 clients) it measures these paths one after the other, with bench/run.py's test
bed, load generator and /proc accounting:

    sidecar-587 / -465 / -25   POST /api/v1/send/email to a fresh twistd smtpapi (pooled sessions)
    direct-reused             smtplib, one STARTTLS+AUTH session per client, reused (the baseline)
    floor-resource            bench/floor.py: a bare twisted.web Resource doing json.loads and answering
    floor-klein               the same handler on a Klein route
    floor-app                 bench/floor.py: that Resource, a fixed-header text message and pipelined
                              pooled STARTTLS sessions to the same postfix: the whole job at its least

and prints, per path and scenario, the CPU microseconds per message of the process under test,
of postfix with dovecot, their ratio, the sidecar over the floors, and msg/s over direct-reused,
then the issue's goals with the figures that meet or miss them. ``--ab-base DIR`` instead runs
two sidecars at once on the same load, one on DIR's ``src`` and one on this tree's, and prints
the per-message CPU of both (every other repetition with the two places swapped). ``--profile
FILE`` samples the CPU time of a sidecar (587 unless ``--profile-path``) under the first
scenario's load with yappi and prints its top entries. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench`, `tests` and `mailcow_smtp_api` importable
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    DIRECT_PATHS,
    DIRECT_REUSED,
    KB,
    MB,
    SENDER,
    SIDECAR_PATHS,
    Bench,
    HttpSender,
    Meter,
    PhaseResult,
    Scenario,
    Sender,
    SmtpSender,
    add_matrix_options,
    bed_lock,
    build_message,
    check_disk,
    db_connection_limit,
    family_roots,
    format_number,
    format_table,
    logs_trimmed,
    make_body,
    machine_facts,
    prepare_bed,
    probe_sidecar,
    progress,
    recipients_for,
    run_clients,
    selected,
    send_payload,
    size_label,
    source_fingerprint,
    start_sidecar,
)

FLOOR_PATHS = {"floor-resource": "resource", "floor-klein": "klein", "floor-app": "app"}
ALL_PATHS = [*SIDECAR_PATHS, DIRECT_REUSED, *FLOOR_PATHS]
PACED_RATE = 200.0  # msg/s: the paced load
WARM_SECONDS = 1.0  # before each measured phase, the same load for this long, not counted
POSTFIX_FAMILIES = ("postfix", "dovecot")

# ================================================================================ pure helpers


def plan(quick: bool) -> list[Scenario]:
    """1 KB paced and saturated at 1/10/100 clients, 100 KB and 5 MB at 10 clients."""
    seconds = 2.5 if quick else 6.0
    scale = 0.25 if quick else 1.0

    def count(full: int) -> int:
        return max(5, int(full * scale))

    return [
        Scenario("paced-1KB", 1 * KB, 10, 1, int(PACED_RATE * seconds), seconds, rate=PACED_RATE),
        Scenario("clients-1", 1 * KB, 1, 1, count(3000), seconds),
        Scenario("clients-10", 1 * KB, 10, 1, count(6000), seconds),
        Scenario("clients-100", 1 * KB, 100, 1, count(6000), seconds),
        Scenario("size-100KB", 100 * KB, 10, 1, count(3000), seconds),
        Scenario("size-5MB", 5 * MB, 10, 1, 8 if quick else 40, 4.0 if quick else 10.0),
    ]


def warm_scenario(scenario: Scenario) -> Scenario:
    """The same load for ``WARM_SECONDS``: opens the sidecar's pooled sessions and warms its caches."""
    return replace(scenario, name=f"{scenario.name}-warm", max_seconds=WARM_SECONDS)


def micros_per_message(seconds: float | None, messages: int) -> float | None:
    """CPU ``seconds`` per message in microseconds; None when unknown or nothing was sent."""
    if seconds is None or messages <= 0:
        return None
    return seconds * 1_000_000 / messages


def postfix_seconds(result: PhaseResult) -> float | None:
    """CPU seconds of postfix and dovecot together (None when neither was accounted)."""
    values = [result.family_cpu_s[name] for name in POSTFIX_FAMILIES if name in result.family_cpu_s]
    return sum(values) if values else None


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``; None when either is unknown or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


@dataclass(frozen=True)
class CpuRow:
    """The figures of one path in one scenario, derived from its PhaseResult."""

    scenario: str
    path: str
    sent: int
    errors: int
    msgs_per_s: float | None
    vs_reused: float | None  # msg/s over direct-reused's
    own_us: float | None  # the process under test: sidecar or floor (client CPU for direct-reused)
    postfix_us: float | None  # postfix + dovecot
    own_vs_postfix: float | None
    vs_floor_resource: float | None
    vs_floor_klein: float | None
    vs_floor_app: float | None
    machine_us: float | None
    other_us: float | None  # every process outside the bed and this run: other users' load competing


def own_seconds(result: PhaseResult) -> float | None:
    """The CPU of the process under test: the sidecar or floor server, or smtplib's client processes."""
    if result.path == DIRECT_REUSED:
        return result.client_cpu_s
    return result.sidecar_cpu_s


def cpu_rows(results: Sequence[PhaseResult]) -> list[CpuRow]:
    """One row per phase; ratios against the floors and direct-reused of the same scenario."""
    by_scenario: dict[str, dict[str, PhaseResult]] = {}
    for result in results:
        by_scenario.setdefault(result.scenario, {})[result.path] = result

    def usable(result: PhaseResult | None) -> PhaseResult | None:
        return result if result is not None and result.status == "ok" and result.sent > 0 else None

    def own_us(result: PhaseResult | None) -> float | None:
        return micros_per_message(own_seconds(result), result.sent) if result is not None else None

    rows = []
    for result in results:
        group = by_scenario[result.scenario]
        own = usable(result)
        reused = usable(group.get(DIRECT_REUSED))
        mine = own_us(own)
        floors = {path: own_us(usable(group.get(path))) for path in FLOOR_PATHS}
        postfix = micros_per_message(postfix_seconds(own), own.sent) if own is not None else None
        rows.append(
            CpuRow(
                scenario=result.scenario,
                path=result.path,
                sent=result.sent,
                errors=result.errors,
                msgs_per_s=result.msgs_per_s,
                vs_reused=ratio(own.msgs_per_s if own else None, reused.msgs_per_s if reused else None),
                own_us=mine,
                postfix_us=postfix if result.path not in FLOOR_PATHS or result.path == "floor-app" else None,
                own_vs_postfix=ratio(mine, postfix) if result.path in (*SIDECAR_PATHS, "floor-app") else None,
                vs_floor_resource=ratio(mine, floors["floor-resource"]) if result.path in SIDECAR_PATHS else None,
                vs_floor_klein=ratio(mine, floors["floor-klein"]) if result.path in SIDECAR_PATHS else None,
                vs_floor_app=ratio(mine, floors["floor-app"]) if result.path in SIDECAR_PATHS else None,
                machine_us=micros_per_message(own.machine_cpu_s, own.sent) if own is not None else None,
                other_us=micros_per_message(own.family_cpu_s.get("other"), own.sent) if own is not None else None,
            )
        )
    return rows


CPU_HEADERS = [
    "scenario", "path", "sent", "err", "msg/s", "x reused", "own us/msg", "postfix+dovecot us/msg",
    "own / postfix", "x floor-resource", "x floor-klein", "x floor-app", "machine us/msg", "other us/msg",
]  # fmt: skip


def render_cpu_table(rows: Sequence[CpuRow]) -> str:
    """The main table; 'own' is the sidecar or floor server (for direct-reused: the smtplib clients)."""
    return format_table(
        CPU_HEADERS,
        [
            [
                row.scenario,
                row.path,
                format_number(row.sent),
                format_number(row.errors),
                format_number(row.msgs_per_s),
                format_number(row.vs_reused, 2),
                format_number(row.own_us, 0),
                format_number(row.postfix_us, 0),
                format_number(row.own_vs_postfix, 2),
                format_number(row.vs_floor_resource, 2),
                format_number(row.vs_floor_klein, 2),
                format_number(row.vs_floor_app, 2),
                format_number(row.machine_us, 0),
                format_number(row.other_us, 0),
            ]
            for row in rows
        ],
        numeric_from=2,
    )


@dataclass(frozen=True)
class Goal:
    """One of the issue's goals, as measured: met is None when a figure is missing."""

    text: str
    measured: str
    met: bool | None


def goals(rows: Sequence[CpuRow]) -> list[Goal]:
    """The issue's goals against this run's rows."""
    index = {(row.scenario, row.path): row for row in rows}

    def get(scenario: str, path: str) -> CpuRow | None:
        return index.get((scenario, path))

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def show(value: float | None, unit: str = "", digits: int = 0) -> str:
        return "-" if value is None else f"{format_number(value, digits)}{unit}"

    found: list[Goal] = []
    paced = get("paced-1KB", "sidecar-587")
    us = paced.own_us if paced else None
    share = paced.own_vs_postfix if paced else None
    found.append(Goal("587 paced: sidecar <= 900 us/msg", show(us, " us"), at_most(us, 900)))
    found.append(Goal("587 paced: sidecar <= 0.5x postfix+dovecot", show(share, "x", 2), at_most(share, 0.5)))
    saturated = get("clients-10", "sidecar-587")
    us = saturated.own_us if saturated else None
    found.append(Goal("587 saturated (10 clients): sidecar <= 600 us/msg", show(us, " us"), at_most(us, 600)))
    scenarios = sorted({row.scenario for row in rows}, key=[s.name for s in plan(False)].index)
    for scenario in scenarios:
        plain, submission = get(scenario, "sidecar-25"), get(scenario, "sidecar-587")
        if plain is None or submission is None:
            continue
        a, b = plain.own_us, submission.own_us
        cheaper = None if a is None or b is None else a < b
        found.append(Goal(f"port 25 cheaper than 587 ({scenario})", f"{show(a, ' us')} vs {show(b, ' us')}", cheaper))
    plain = get("paced-1KB", "sidecar-25")
    us = plain.own_us if plain else None
    found.append(Goal("port 25 paced: sidecar <= 600 us/msg", show(us, " us"), at_most(us, 600)))
    for scenario, limit in (("size-100KB", 1.0), ("size-5MB", 0.5)):
        row = get(scenario, "sidecar-587")
        share = row.own_vs_postfix if row else None
        found.append(Goal(f"{scenario} 587: sidecar <= {limit:g}x postfix+dovecot", show(share, "x", 2), at_most(share, limit)))
    for scenario in ("clients-1", "clients-10", "clients-100"):
        row = get(scenario, "sidecar-587")
        times = row.vs_reused if row else None
        met = None if times is None else times >= 1.0
        found.append(Goal(f"{scenario} 587: msg/s >= 1.0x direct-reused", show(times, "x", 2), met))
    return found


def floor_lines(rows: Sequence[CpuRow]) -> list[str]:
    """The sidecar against floor-app, the whole job at its least on this machine, where both ran."""
    index = {(row.scenario, row.path): row for row in rows}
    lines = []
    for (scenario, path), row in index.items():
        floor = index.get((scenario, "floor-app"))
        times = row.vs_floor_app  # known only when both figures are (and the floor's is not zero)
        if path not in SIDECAR_PATHS or times is None or floor is None or row.own_us is None or floor.own_us is None:
            continue
        lines.append(
            f"  {scenario:12} {path:12} {format_number(row.own_us, 0)} us = {times:.2f}x floor-app's "
            f"{format_number(floor.own_us, 0)} us ({format_number(row.own_us - floor.own_us, 0)} us above it)"
        )
    return lines


def render_goals(found: Sequence[Goal]) -> str:
    """The goals as a table: met, missed, or '-' when not measured in this run."""
    return format_table(
        ["goal", "measured", "met"],
        [[goal.text, goal.measured, {True: "yes", False: "no", None: "-"}[goal.met]] for goal in found],
    )


# -------------------------------------------------------------------------------- A/B


def ab_summary(samples: Mapping[str, Sequence[float]], swapped: Sequence[bool] = ()) -> dict[str, float | None]:
    """Median per-message CPU of A and B over repeated phases, and their paired differences.

    ``samples`` maps "a" and "b" to µs per message of each repetition (paired by index);
    ``swapped[i]`` is True when repetition i ran B in the first sidecar's place. Two processes
    under the same load need not cost the same in each place (which core, who started first):
    with as many swapped repetitions as not, the mean of B - A cancels that, and ``position_us``
    estimates it (the second place's cost over the first's, the same sources in both).
    """
    a, b = list(samples.get("a", ())), list(samples.get("b", ()))
    pairs = [y - x for x, y in zip(a, b)]
    flags = list(swapped) + [False] * (len(pairs) - len(swapped))
    straight = [d for d, flag in zip(pairs, flags) if not flag]
    crossed = [d for d, flag in zip(pairs, flags) if flag]
    balanced = bool(straight) and len(straight) == len(crossed)
    return {
        "a_us": statistics.median(a) if a else None,
        "b_us": statistics.median(b) if b else None,
        "b_minus_a_us": statistics.median(pairs) if pairs else None,
        "b_minus_a_mean_us": statistics.fmean(pairs) if balanced else None,
        "position_us": (statistics.fmean(straight) - statistics.fmean(crossed)) / 2 if balanced else None,
    }


# ================================================================================ measuring


class AlternatingSender:
    """One client with a keep-alive connection to each of two sidecars, sending to them in turn.

    Both sidecars then see the same load at the same time, which is what an A/B comparison needs:
    whatever else the machine does affects both alike.
    """

    def __init__(self, first: HttpSender, second: HttpSender, turns: Any = None) -> None:
        self.senders = (first, second)
        self.turn = 0
        # A counter shared by every client of the phase (a multiprocessing Value made before the
        # clients fork): the turns alternate over all messages, not per client, so that a phase
        # of fewer messages than clients still gives each sidecar half.
        self.turns = turns

    def open(self) -> None:
        """Connect to both."""
        for sender in self.senders:
            sender.open()

    def send(self) -> str | None:
        """Send the next message to the sidecar whose turn it is."""
        if self.turns is not None:
            with self.turns.get_lock():
                self.turn, self.turns.value = self.turns.value % 2, self.turns.value + 1
        sender = self.senders[self.turn]
        self.turn ^= 1
        return sender.send()

    def close(self) -> None:
        """Close both connections."""
        for sender in self.senders:
            sender.close()


@contextlib.contextmanager
def floor_server(kind: str, workdir: Path, extra: Sequence[str] = ()) -> Iterator[Any]:
    """bench/floor.py on a free port (``extra``: its further arguments), as a child process, stopped afterwards."""
    from tests.integration.conftest import SIDECAR_START_TIMEOUT, Sidecar, _healthy, free_port

    port = free_port()
    log_path = workdir / f"floor-{kind}.log"
    argv = [sys.executable, "-m", "bench.floor", kind, str(port), *extra]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    server = Sidecar(port=port, process=process, log_path=log_path, argv=argv)
    try:
        deadline = time.monotonic() + SIDECAR_START_TIMEOUT
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() >= deadline:
                raise SystemExit(f"bench: the floor server did not start:\n{server.log_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def measure(
    result: PhaseResult,
    scenario: Scenario,
    make: Callable[[], Sender],
    processes: int,
    meter: Meter,
    after_warm: Callable[[], None] | None = None,
) -> None:
    """The same load for ``WARM_SECONDS`` (not counted), then the measured phase into ``result``."""
    warm = PhaseResult(result.scenario, result.size, result.concurrency, result.recipients, result.path)
    run_clients(warm, warm_scenario(scenario), make, processes, Meter(None, meter.roots))
    if after_warm is not None:
        after_warm()
    run_clients(result, scenario, make, processes, meter)


def run_phase(
    bench: Bench,
    scenario: Scenario,
    path: str,
    processes: int,
    launcher: Sequence[str] = (),
    after_warm: Callable[[int], None] | None = None,
    source: Path | None = None,
) -> PhaseResult:
    """Measure one path for one scenario, then empty postfix's queue and the sink.

    A sidecar path runs the service of ``source`` (a ``src`` folder; default this tree's) and may
    start twistd under ``launcher``; ``after_warm`` is then called with the sidecar's pid between
    the warm-up and the measured phase.
    """
    from tests.integration.conftest import run_testbed_script

    check_disk(bench.directory)
    result = PhaseResult(scenario.name, scenario.size, scenario.concurrency, scenario.recipients, path)
    body = make_body(scenario.size)
    recipients = recipients_for(scenario.recipients)
    if path == DIRECT_REUSED:
        port, security, reuse = DIRECT_PATHS[path]
        message = build_message(SENDER, recipients, body)

        def make_smtp() -> Sender:
            return SmtpSender(port, security, reuse, bench.cafile, SENDER, bench.password, recipients, message)

        measure(result, scenario, make_smtp, processes, Meter(None, bench.roots))
    elif path in FLOOR_PATHS:
        payload = send_payload(recipients, body, bench.password, SIDECAR_PATHS["sidecar-587"])
        kind = FLOOR_PATHS[path]
        with floor_server(kind, bench.workdir, [bench.cafile] if kind == "app" else []) as server:

            def make_floor() -> Sender:
                return HttpSender(server.port, payload, bench.api_key)

            measure(result, scenario, make_floor, processes, Meter(server.process.pid, bench.roots))
    else:
        payload = send_payload(recipients, body, bench.password, SIDECAR_PATHS[path])
        result.sidecar_source = source_fingerprint(source or REPO / "src")
        env = {"PYTHONPATH": str(source)} if source is not None else None
        sidecar = start_sidecar(bench, bench.sidecar_options, launcher=launcher, env_extra=env)
        try:
            problem = probe_sidecar(sidecar.port, payload, bench.api_key)
            if problem is not None:
                result.status, result.note = "failed", f"probe: {problem}"
            else:

                def make_http() -> Sender:
                    return HttpSender(sidecar.port, payload, bench.api_key)

                pid = sidecar.process.pid
                hook = (lambda: after_warm(pid)) if after_warm is not None else None
                measure(result, scenario, make_http, processes, Meter(pid, bench.roots), hook)
        finally:
            sidecar.stop()
    run_testbed_script(bench.directory, "clear-messages")
    return result


def run_ab_phase(
    bench: Bench,
    scenario: Scenario,
    path: str,
    processes: int,
    base_src: Path,
    new_src: Path | None = None,
    swap: bool = False,
) -> dict[str, float | None]:
    """Two sidecars at once on alternating requests: A on ``base_src``, B on ``new_src`` (default this
    tree). µs per message of each. ``swap`` starts B first, in the place A has otherwise."""
    if swap:
        figures = run_ab_phase(bench, scenario, path, processes, new_src or REPO / "src", base_src)
        return {**figures, "a": figures["b"], "b": figures["a"]}
    from tests.integration.conftest import run_testbed_script

    check_disk(bench.directory)
    payload = send_payload(recipients_for(scenario.recipients), make_body(scenario.size), bench.password, SIDECAR_PATHS[path])
    result = PhaseResult(scenario.name, scenario.size, scenario.concurrency, scenario.recipients, path)
    env_a = {"PYTHONPATH": str(base_src)}

    def own_state(side: str) -> list[str]:
        # Each its own state database: they share the work directory, where the default file lies.
        return [*bench.sidecar_options, "--state-db", f"sqlite:{bench.workdir / f'state-{side}.sqlite'}"]

    a = start_sidecar(bench, own_state("a"), env_extra=env_a, name="sidecar-a")
    try:
        env_b = {"PYTHONPATH": str(new_src)} if new_src is not None else None
        b = start_sidecar(bench, own_state("b"), env_extra=env_b, name="sidecar-b")
        try:
            for side in (a, b):
                problem = probe_sidecar(side.port, payload, bench.api_key)
                if problem is not None:
                    raise SystemExit(f"bench: probe of {side.log_path.name} failed: {problem}")

            turns = multiprocessing.get_context("fork").Value("q", 0)

            def make() -> Sender:
                return AlternatingSender(
                    HttpSender(a.port, payload, bench.api_key), HttpSender(b.port, payload, bench.api_key), turns
                )

            meter = Meter(None, bench.roots, apart={"a": a.process.pid, "b": b.process.pid})
            before: dict[str, int] = {}

            def count_before() -> None:
                before.update(a=sends_logged(a.log_path), b=sends_logged(b.log_path))

            measure(result, scenario, make, processes, meter, after_warm=count_before)
            # What each answered, from its own log: every client starts with A, so with few
            # messages per client the halves are not even.
            answered = {"a": sends_logged(a.log_path) - before["a"], "b": sends_logged(b.log_path) - before["b"]}
        finally:
            b.stop()
    finally:
        a.stop()
    run_testbed_script(bench.directory, "clear-messages")
    return {
        "a": micros_per_message(result.family_cpu_s.get("a"), answered["a"]),
        "b": micros_per_message(result.family_cpu_s.get("b"), answered["b"]),
        "errors": result.errors,
        "sent": result.sent,
    }


def sends_logged(log_path: Path) -> int:
    """How many sends a sidecar's log shows answered 200 (its ``send ... status=200`` lines)."""
    with open(log_path, "rb") as log:
        return sum(1 for line in log if b"] send " in line and b" status=200 " in line)


# -------------------------------------------------------------------------------- profile


def profile_launcher(output: Path) -> list[str]:
    """The argv prefix that runs twistd under bench/profiled.py, writing yappi's stats to ``output``."""
    return [sys.executable, str(REPO / "bench" / "profiled.py"), str(output), "--"]


# ================================================================================ the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2.5 s phases (4 s for 5 MB) and a quarter of the counts")
    parser.add_argument("--json", metavar="FILE", help="write every phase's raw numbers and the derived rows to FILE")
    add_matrix_options(parser, [s.name for s in plan(False)], ALL_PATHS)
    parser.add_argument(
        "--source",
        metavar="DIR",
        help="run the sidecars on DIR/src (e.g. an export of another commit) instead of this tree's",
    )
    parser.add_argument(
        "--ab-base",
        metavar="DIR",
        help="A/B: run a sidecar on DIR/src beside one on this tree, same load, alternating requests",
    )
    parser.add_argument("--ab-new", metavar="DIR", help="A/B: run B on DIR/src instead of this tree's")
    parser.add_argument(
        "--repeat", type=int, default=4, help="A/B: phases per scenario and path, every other one with the places swapped (default 4)"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="instead of the matrix: yappi CPU-time profile of a sidecar (--profile-path) under the first scenario, stats to FILE",
    )
    parser.add_argument("--top", type=int, default=25, help="--profile: how many functions to print")
    parser.add_argument(
        "--profile-path", default="sidecar-587", choices=list(SIDECAR_PATHS), help="--profile: the sidecar path profiled"
    )
    parser.add_argument("--db-max-connections", type=int, default=500, metavar="N", help="as bench.run's option")
    parser.add_argument("--keep-bed", action="store_true", help="leave the test bed running at the end")
    return parser.parse_args(argv)


@contextlib.contextmanager
def bed(options: argparse.Namespace) -> Iterator[Bench]:
    """The bed of bench/run.py with its lock, logs trimmed, MariaDB's connection limit raised."""
    from tests.integration.conftest import run_testbed_script, testbed_dir

    directory = testbed_dir()
    if os.geteuid() != 0:
        raise SystemExit("bench: the test bed needs root (postfix's and dovecot's masters drop privileges)")
    check_disk(directory.parent)
    with contextlib.ExitStack() as stack:
        stack.enter_context(bed_lock(directory))
        stack.enter_context(logs_trimmed(directory))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpapi-bench-cpu-"))
        previous_limit = stack.enter_context(db_connection_limit(options.db_max_connections))
        bench = prepare_bed(directory, Path(work))
        bench.sidecar_options = options.sidecar_option
        bench.roots = family_roots(directory)
        progress(f"bed {'started' if bench.started_bed else 'reused'} in {directory}")
        try:
            yield bench
        finally:
            run_testbed_script(directory, "clear-messages")
            if bench.started_bed and not options.keep_bed:
                run_testbed_script(directory, "stop")
            elif previous_limit is not None:
                run_testbed_script(directory, "restart-postfix")


def run(options: argparse.Namespace) -> int:
    """Measure the selected phases, print the tables and goals, write the JSON."""
    scenarios = plan(options.quick)
    chosen = selected(options.scenarios, [s.name for s in scenarios], "scenarios")
    scenarios = [s for s in scenarios if s.name in chosen]
    paths = selected(options.paths, ALL_PATHS, "paths")
    processes = options.client_procs or 2 * (os.cpu_count() or 1)
    facts = machine_facts()
    began = time.monotonic()
    document: dict[str, Any] = {"meta": {**facts, "command": sys.orig_argv, "options": vars(options)}}
    with bed(options) as bench:
        if options.profile:
            return run_profile(bench, scenarios[0], options.profile_path, processes, Path(options.profile), options.top)
        if options.ab_base:
            return run_ab(bench, scenarios, [p for p in paths if p in SIDECAR_PATHS], processes, options, document)
        source = source_folder(options.source) if options.source else None
        results = []
        for scenario in scenarios:
            for path in paths:
                result = run_phase(bench, scenario, path, processes, source=source)
                results.append(result)
                progress(f"{scenario.name:12} {path:15} {result.status:7} sent={result.sent} err={result.errors}")
    rows = cpu_rows(results)
    found = goals(rows)
    elapsed = time.monotonic() - began
    print("CPU per message (us): own = the sidecar or floor server; for direct-reused, the smtplib clients")
    print(render_cpu_table(rows))
    errors = [f"  {r.scenario} {r.path}: {r.error_samples}" for r in results if r.error_samples]
    if errors:
        print("\nErrors (left out of the figures):\n" + "\n".join(errors))
    print("\nGoals of issue 16:\n" + render_goals(found))
    above_floor = floor_lines(rows)
    if above_floor:
        print("\nThe stack's floor in this run (floor-app: HTTP, JSON, a plain message, pooled pipelined STARTTLS):")
        print("\n".join(above_floor))
    sources = sorted({r.sidecar_source for r in results if r.sidecar_source})
    print(f"\nWhole run {elapsed:.0f} s on {facts['cpus']} CPUs ({facts['cpu']}); {facts['date']}; source {', '.join(sources)}")
    if options.json:
        document["phases"] = [asdict(r) for r in results]
        document["rows"] = [asdict(r) for r in rows]
        document["goals"] = [asdict(g) for g in found]
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.status != "failed" for r in results) else 1


def source_folder(tree: str) -> Path:
    """The ``src`` folder of another copy of the service (a worktree or an export of a commit)."""
    folder = Path(tree).resolve() / "src"
    if not (folder / "mailcow_smtp_api").is_dir():
        raise SystemExit(f"bench: {folder} holds no mailcow_smtp_api")
    return folder


def run_ab(
    bench: Bench,
    scenarios: Sequence[Scenario],
    paths: Sequence[str],
    processes: int,
    options: argparse.Namespace,
    document: dict[str, Any],
) -> int:
    """``--repeat`` A/B phases per scenario and sidecar path; medians and the paired difference."""
    base_src = source_folder(options.ab_base)
    new_src = source_folder(options.ab_new) if options.ab_new else None
    rows, raw = [], []
    for scenario in scenarios:
        for path in paths:
            samples: dict[str, list[float]] = {"a": [], "b": []}
            swapped: list[bool] = []
            for repetition in range(options.repeat):
                swap = repetition % 2 == 1  # every other run starts B first, in A's place
                figures = run_ab_phase(bench, scenario, path, processes, base_src, new_src, swap=swap)
                raw.append({"scenario": scenario.name, "path": path, "swapped": swap, **figures})
                if figures["a"] is not None and figures["b"] is not None:
                    samples["a"].append(figures["a"])
                    samples["b"].append(figures["b"])
                    swapped.append(swap)
                progress(
                    f"A/B {scenario.name:12} {path:12} a={figures['a']} b={figures['b']} swapped={swap} err={figures['errors']}"
                )
            summary = ab_summary(samples, swapped)
            rows.append(
                [
                    scenario.name,
                    path,
                    str(len(samples["a"])),
                    format_number(summary["a_us"], 0),
                    format_number(summary["b_us"], 0),
                    format_number(summary["b_minus_a_us"], 0),
                    format_number(summary["b_minus_a_mean_us"], 0),
                    format_number(summary["position_us"], 0),
                ]
            )
    print(f"A/B: A = {base_src}, B = {new_src or REPO / 'src'}; CPU us per message, medians over repetitions")
    print("(every other repetition swaps the places; with an even --repeat the mean cancels what a place costs)")
    headers = ["scenario", "path", "runs", "A us/msg", "B us/msg", "B - A (paired median)", "B - A (mean)", "place 2 - place 1"]
    print(format_table(headers, rows, numeric_from=2))
    if options.json:
        document["ab"] = raw
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


def run_profile(bench: Bench, scenario: Scenario, path: str, processes: int, output: Path, top: int) -> int:
    """One sidecar path under bench/profiled.py for one scenario; prints the top entries it wrote."""
    result = run_phase(
        bench,
        scenario,
        path,
        processes,
        launcher=profile_launcher(output.resolve()),
        after_warm=lambda pid: os.kill(pid, signal.SIGUSR1),  # bench/profiled.py: forget the warm-up
    )
    progress(f"profiled {scenario.name}: sent={result.sent} err={result.errors}")
    from bench.profiled import report

    print(report(output.resolve(), top, messages=result.sent))
    return 0 if result.status == "ok" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.cpu``."""
    options = parse_args(argv)
    try:
        return run(options)
    except BaseException as exc:
        if type(exc).__name__ == "Failed":  # the conftest helpers report a broken bed through pytest.fail
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
