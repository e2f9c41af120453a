"""The shape of the code: the pure core imports no Twisted and no I/O library; mypy is clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "mailcow_smtp_api"
CORE = ("model", "errors", "validate", "mime", "senders", "config", "schema", "responses", "apikeys",
        "throttle", "passwords", "idempotency", "openapi", "ratelimit", "sendkeys", "abuse", "maillog")
FORBIDDEN = ("twisted", "klein", "treq", "pymysql", "sqlite3", "socket", "OpenSSL", "txredisapi")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_modules_do_no_io(module: str) -> None:
    """Pure core modules import neither Twisted nor a database, socket or TLS library."""
    for name in imported_modules(PACKAGE / f"{module}.py"):
        assert name.split(".")[0] not in FORBIDDEN, f"{module} imports {name}"


def test_only_redisio_talks_to_redis() -> None:
    """txredisapi is imported by redisio.py alone; the rest reaches Redis through its Protocols."""
    importers = sorted(p.stem for p in PACKAGE.glob("*.py") if "txredisapi" in imported_modules(p))
    assert importers == ["redisio"]


def test_mypy_is_clean() -> None:
    """mypy finds no type errors in the package (mypy.ini holds the settings)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", str(PACKAGE)], capture_output=True, text=True, timeout=300,
        cwd=PACKAGE.parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:]
