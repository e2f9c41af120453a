"""What the start does to the process's memory: the allocator's limits and the collector.

``tap.keep_freed_memory``: large messages reuse freed memory instead of fresh pages from the
kernel. ``makeService``: the objects of the start are left out of later collections. Each case
runs in a child interpreter: both are per process and cannot be undone. Page faults
(``ru_minflt``) are counted, not times: the count is exact and the same on a busy machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Builds a 5 MiB text the way a large body goes through the service (the text, a copy with a
# final line end, its UTF-8 bytes, the line ends widened), once to warm up, then five times,
# and prints what keep_freed_memory answered and the page faults per round.
CHILD = """
import resource, sys
from mailcow_smtp_api.tap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def build():
    text = "line of a large body\\n" * (5 * 1024 * 1024 // 21)
    data = (text + "\\n").encode("utf-8")
    return len(data.replace(b"\\n", b"\\r\\n"))

build()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    build()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""

PAGES_OF_ONE_COPY = 5 * 1024 * 1024 // 4096


def run_child(mode: str, **env: str) -> tuple[str, int]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    child_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60, env=child_env, check=True
    )
    kept, faults = done.stdout.split()
    return kept, int(faults)


glibc = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")), reason="the limits are glibc's"
)


@glibc
def test_with_the_limits_a_large_body_faults_in_no_fresh_pages() -> None:
    """By default each round maps its copies fresh (thousands of faults); kept, it reuses them."""
    kept, faults = run_child("keep")
    assert kept == "True"
    assert faults < PAGES_OF_ONE_COPY // 10, faults
    default, default_faults = run_child("default")
    assert default == "None"
    assert default_faults > PAGES_OF_ONE_COPY, default_faults


@glibc
def test_an_operators_malloc_setting_is_left_alone() -> None:
    """With one of glibc's MALLOC_* variables set, the service sets nothing itself."""
    kept, _ = run_child("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"


MAKE_SERVICE = """
import gc, sys
from mailcow_smtp_api.tap import Options, SmtpApiServiceMaker
options = Options()
options.parseOptions(["--db", "sqlite:" + sys.argv[1], "--listen", "tcp:0:interface=127.0.0.1"])
before = gc.get_freeze_count()
SmtpApiServiceMaker().makeService(options)
print(before, gc.get_freeze_count(), gc.isenabled())
"""


def test_the_objects_of_the_start_are_left_out_of_later_collections(tmp_path: Path) -> None:
    """After makeService the collector runs again, and what the start made is frozen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_")}
    done = subprocess.run(
        [sys.executable, "-c", MAKE_SERVICE, str(tmp_path / "state.sqlite")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=True,
    )  # fmt: skip
    before, frozen, enabled = done.stdout.split()
    assert before == "0"
    assert int(frozen) > 50_000, frozen  # the modules, classes and functions of the whole service
    assert enabled == "True"
