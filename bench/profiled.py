"""Run twistd under yappi's CPU clock: where a process's CPU time goes, not its wall time.

    python bench/profiled.py STATS -- /path/to/twistd -n smtpapi ...

Starts yappi with ``clock_type="cpu"`` (per-thread CPU time, so a thread waiting for the GIL or
for I/O is not charged, as it is by a wall-clock sampler on a busy machine), then runs twistd in
this process. SIGUSR1 clears what was gathered so far (``bench/cpu.py`` sends it after the
warm-up); at exit the stats are written to STATS in pstats format. ``report`` summarises them:
exclusive time grouped by package and module, and the top functions.
"""

from __future__ import annotations

import atexit
import pstats
import signal
import sys
from pathlib import Path
from typing import Any

# (path fragment, group): the first fragment found in a function's file names its group.
GROUPS = (
    ("mailcow_smtp_api/core/mime", "MIME (ours)"),
    ("/email/", "MIME (email package)"),
    ("mailcow_smtp_api/core/validate", "validation"),
    ("mailcow_smtp_api/core/", "core (other)"),
    ("mailcow_smtp_api/smtp/", "SMTP client and pool"),
    ("mailcow_smtp_api/mailcow/", "mailcow adapters (db, caches, local auth)"),
    ("mailcow_smtp_api/web/", "web (ours)"),
    ("mailcow_smtp_api/", "service (ours)"),
    ("twisted/web/", "twisted.web"),
    ("twisted/logger/", "twisted.logger"),
    ("twisted/python/log", "twisted.logger"),
    ("twisted/internet/defer", "Deferred/coroutine glue"),
    ("twisted/protocols/tls", "TLS"),
    ("twisted/internet/_sslverify", "TLS"),
    ("OpenSSL/", "TLS"),
    ("twisted/internet/", "reactor"),
    ("twisted/enterprise", "database (adbapi)"),
    ("pymysql/", "database (PyMySQL)"),
    ("twisted/", "twisted (other)"),
    ("klein/", "Klein/werkzeug"),
    ("werkzeug/", "Klein/werkzeug"),
    ("prometheus_client/", "metrics"),
    ("/json/", "json"),
    ("/threading.py", "threads"),
    ("/queue.py", "threads"),
)


def group_of(filename: str, function: str) -> str:
    """The part of the stack a function belongs to, by its file (builtins by their name)."""
    if "/" not in filename:  # yappi names a builtin's module ("builtins", "_socket", "posix") as its file
        name = function.lower()
        if any(word in name for word in ("send", "recv", "epoll", "poll", "socket", "write", "read")):
            return "socket and I/O builtins"
        return "other builtins"
    for fragment, group in GROUPS:
        if fragment in filename:
            return group
    return "other Python"


def report(stats_path: Path, top: int, messages: int) -> str:
    """Exclusive CPU time by group and the top functions, in µs per message (and % of the total)."""
    stats: Any = pstats.Stats(str(stats_path))
    entries = stats.stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(value[2] for value in entries.values()) or 1e-12
    per = 1_000_000 / max(messages, 1)
    groups: dict[str, float] = {}
    for (filename, _line, function), value in entries.items():
        key = group_of(filename, function)
        groups[key] = groups.get(key, 0.0) + value[2]
    lines = [f"CPU time sampled: {total:.2f} s over {messages} messages = {total * per:.0f} us per message", ""]
    lines.append(f"{'part':45} {'us/msg':>8} {'share':>7}")
    for name, seconds in sorted(groups.items(), key=lambda item: -item[1]):
        lines.append(f"{name:45} {seconds * per:8.0f} {100 * seconds / total:6.1f}%")
    lines += ["", f"{'function (exclusive time)':80} {'us/msg':>8} {'calls/msg':>9}"]
    ranked = sorted(entries.items(), key=lambda item: -item[1][2])[:top]
    for (filename, line, function), value in ranked:
        where = f"{function} {Path(filename).name}:{line}" if "/" in filename else f"{filename}.{function}"
        lines.append(f"{where[:80]:80} {value[2] * per:8.1f} {value[1] / max(messages, 1):9.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Profile ``argv`` after ``--`` (a twistd command line) in this process."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m bench.profiled STATS -- TWISTD ARGS...", file=sys.stderr)
        return 2
    import yappi

    from twisted.application import app

    output = argv[0]

    def save() -> None:
        if yappi.is_running():
            yappi.stop()
            yappi.get_func_stats().save(output, type="pstat")

    yappi.set_clock_type("cpu")
    yappi.start(builtins=True, profile_threads=True)
    signal.signal(signal.SIGUSR1, lambda *_: yappi.clear_stats())
    atexit.register(save)
    # After SIGTERM, twistd ends by raising the signal again (app._exitWithSignal): no atexit then.
    exit_with_signal = app._exitWithSignal

    def save_then_exit(sig: int) -> None:
        save()
        exit_with_signal(sig)

    app._exitWithSignal = save_then_exit
    sys.argv = argv[2:]
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # run as a script: bench/'s modules must not shadow anything twistd imports
    from twisted.scripts.twistd import run

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
