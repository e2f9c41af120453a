"""Memory benchmark: how much the sidecar's resident memory grows to send one large attachment.

    .venv/bin/python -m bench.memory [--size-mb 20] [--port 10587] [--json FILE]

Starts (or reuses) the postfix test bed and a fresh ``twistd -n smtpapi``, exactly as
``bench.run`` does, warms the sidecar with one small message, then sends one message whose
attachment has ``--size-mb`` MiB of random bytes and reports:

- the sidecar's resident memory before the request (VmRSS) and its peak during it (VmHWM, reset to
  the current RSS just before the request by writing 5 to /proc/<pid>/clear_refs);
- the growth (peak minus before) as a multiple of the attachment's size;
- the sidecar's resident memory one second after its answer (what it keeps of the peak once the
  message is gone; the allocator keeps up to 32 MiB of freed memory for reuse, see
  ``tap.keep_freed_memory``);
- the same for a direct ``smtplib`` sender in this process (building the message with the standard
  library and sending it over one STARTTLS session), measured the same way, as the baseline;
- the wall time of each.

Figures are printed, never asserted. The request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import smtplib
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402  (after the path fix above)
    HOST,
    SEND_PATH,
    SENDER,
    SENDER_DOMAIN,
    SUBMISSION_PORT,
    bed_lock,
    prepare_bed,
    progress,
    read_text,
    running_sidecar,
    status_kb,
)

MB = 1024 * 1024
RECIPIENT = "memory@sink.example"


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs value 5)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB."""
    text = read_text(f"/proc/{pid}/status")
    rss, hwm = status_kb(text, "VmRSS"), status_kb(text, "VmHWM")
    if rss is None or hwm is None:
        raise SystemExit(f"bench: no memory figures for process {pid}")
    return rss, hwm


def request_body(content: bytes, password: str, smtp_port: int) -> bytes:
    """The JSON of one send with ``content`` as its only attachment."""
    return json.dumps(
        {
            "from": SENDER,
            "to": [RECIPIENT],
            "subject": "memory",
            "body": "see the attachment\n",
            "password": password,
            "smtp_port": smtp_port,
            "attachments": [
                {"filename": "blob.bin", "content": base64.b64encode(content).decode("ascii")},
            ],
        }
    ).encode("ascii")


def post(port: int, api_key: str, body: bytes) -> tuple[int, dict[str, Any] | list[Any]]:
    """POST ``body`` to the sidecar; its status and decoded answer."""
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        headers = {"Content-Type": "application/json", "X-API-Key": api_key}
        connection.request("POST", SEND_PATH, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def growth(before_kb: int, peak_kb: int, size: int) -> dict[str, float]:
    """Peak growth in MiB and as a multiple of ``size`` bytes."""
    grown = max(0, peak_kb - before_kb) * 1024
    return {"before_mib": before_kb / 1024, "peak_mib": peak_kb / 1024, "growth_mib": grown / MB, "x_size": grown / size}


def measure_sidecar(bench: Any, content: bytes, smtp_port: int) -> dict[str, Any]:
    """One fresh sidecar: warm it, reset its peak, send the attachment, read the peak."""
    with running_sidecar(bench) as sidecar:
        pid = sidecar.process.pid
        status, answer = post(sidecar.port, bench.api_key, request_body(b"warm", bench.password, smtp_port))
        if status != 200:
            raise SystemExit(f"bench: the warm-up send failed: {status} {answer}")
        body = request_body(content, bench.password, smtp_port)
        time.sleep(0.5)
        before, _ = memory_kb(pid)
        reset_peak(pid)
        started = time.monotonic()
        status, answer = post(sidecar.port, bench.api_key, body)
        seconds = time.monotonic() - started
        _, peak = memory_kb(pid)
        if status != 200:
            raise SystemExit(f"bench: the large send failed: {status} {json.dumps(answer)[:500]}")
        del body
        time.sleep(1.0)
        after, _ = memory_kb(pid)
    return {"status": status, "seconds": seconds, **growth(before, peak, len(content)), "after_mib": after / 1024}


def measure_direct(bench: Any, content: bytes) -> dict[str, Any]:
    """This process with smtplib: build the message with the standard library, send it on 587."""
    context = ssl.create_default_context(cafile=bench.cafile)
    context.check_hostname = False  # the bed's certificate names localhost; the peer is 127.0.0.1
    pid = os.getpid()
    before, _ = memory_kb(pid)
    reset_peak(pid)
    started = time.monotonic()
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = RECIPIENT
    message["Subject"] = "memory"
    message["Date"] = formatdate()
    message["Message-ID"] = make_msgid(domain=SENDER_DOMAIN)
    message.set_content("see the attachment\n")
    message.add_attachment(content, maintype="application", subtype="octet-stream", filename="blob.bin")
    with smtplib.SMTP(HOST, SUBMISSION_PORT, timeout=600) as smtp:
        smtp.starttls(context=context)
        smtp.login(SENDER, bench.password)
        smtp.send_message(message)
    del message
    seconds = time.monotonic() - started
    _, peak = memory_kb(pid)
    return {"status": 250, "seconds": seconds, **growth(before, peak, len(content))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=20.0, help="attachment size in MiB (default 20)")
    parser.add_argument(
        "--port", type=int, default=SUBMISSION_PORT, help="the bed's postfix port the sidecar submits to (default 10587)"
    )
    parser.add_argument("--sidecar-option", action="append", default=[], help="appended to twistd smtpapi")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.memory``."""
    from tests.integration.conftest import run_testbed_script, testbed_dir

    options = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: the test bed needs root (postfix's and dovecot's masters drop privileges)")
    size = int(options.size_mb * MB)
    content = os.urandom(size)
    directory = testbed_dir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(bed_lock(directory))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpapi-memory-"))
        bench = prepare_bed(directory, Path(work))
        bench.sidecar_options = options.sidecar_option
        try:
            progress(f"sidecar: one {size / MB:.1f} MiB attachment via port {options.port}")
            sidecar = measure_sidecar(bench, content, options.port)
            progress("direct smtplib: the same attachment via port 10587")
            direct = measure_direct(bench, content)
        finally:
            run_testbed_script(directory, "clear-messages")
            if bench.started_bed:
                run_testbed_script(directory, "stop")
    print(f"attachment: {size / MB:.1f} MiB of random bytes, one recipient")
    print(f"{'path':10} {'RSS before':>11} {'peak':>9} {'growth':>9} {'x size':>7} {'seconds':>8} {'RSS after':>10}")
    for name, figures in (("sidecar", sidecar), ("smtplib", direct)):
        after = f"{figures['after_mib']:8.1f} M" if "after_mib" in figures else f"{'-':>10}"
        print(
            f"{name:10} {figures['before_mib']:9.1f} M {figures['peak_mib']:7.1f} M "
            f"{figures['growth_mib']:7.1f} M {figures['x_size']:7.2f} {figures['seconds']:8.2f} {after}"
        )
    if options.json:
        Path(options.json).write_text(json.dumps({"size": size, "sidecar": sidecar, "smtplib": direct}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
