"""The shape of the code: imports point one way, the pure core does no I/O, mypy is clean.

    core/                      pure values and rules: stdlib, attrs and a few pure libraries only
    service.py, abuse.py       the use case, over Protocols: core only
    mailcow/ smtp/ state/ web/ compat/   adapters: core, the use case and each other, never tap or cli
    tap.py, cli.py, keyadmin.py   wiring and the admin command: anything
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "mailcow_smtp_api"
FORBIDDEN = ("twisted", "klein", "treq", "pymysql", "sqlite3", "socket", "OpenSSL", "txredisapi", "prometheus_client")
USE_CASE = ("service", "abuse", "delivery")
ADAPTERS = ("mailcow", "smtp", "state", "web", "compat")
WIRING = ("tap", "cli", "keyadmin")


def module_name(path: Path) -> str:
    """``core/model.py`` -> ``core.model``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(outside modules, modules of this package as dotted names) that ``path`` imports."""
    tree = ast.parse(path.read_text())
    outside: set[str] = set()
    inside: set[str] = set()
    here = module_name(path).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.startswith("mailcow_smtp_api") else outside).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                (inside if (node.module or "").startswith("mailcow_smtp_api") else outside).add(node.module or "")
                continue
            base = here[: len(here) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module:
                inside.add(".".join(target))
            else:
                inside.update(".".join([*target, alias.name]) for alias in node.names)
    return outside, inside


def layer(dotted: str) -> str:
    """core, use case, adapter or wiring."""
    top = dotted.removeprefix("mailcow_smtp_api.").split(".")[0]
    if top == "core":
        return "core"
    if top in USE_CASE:
        return "use case"
    if top in ADAPTERS:
        return "adapter"
    return "wiring"


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_layer() -> None:
    """Every module sits in one of the four layers; no new flat module goes unnoticed."""
    for path in MODULES:
        top = module_name(path).split(".")[0]
        assert top in ("core", *USE_CASE, *ADAPTERS, *WIRING), module_name(path)


@pytest.mark.parametrize("path", [p for p in MODULES if layer(module_name(p)) == "core"], ids=module_name)
def test_core_modules_do_no_io_and_import_only_the_core(path: Path) -> None:
    """The pure core imports neither Twisted nor a database, socket or TLS library, and nothing of ours above it."""
    outside, inside = imports(path)
    for name in outside:
        assert name.split(".")[0] not in FORBIDDEN, f"{module_name(path)} imports {name}"
    for name in inside:
        assert layer(name) == "core", f"{module_name(path)} imports {name}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer(module_name(p)) == "use case"], ids=module_name)
def test_the_use_case_imports_only_the_core(path: Path) -> None:
    """service.py and abuse.py see the adapters only through Protocols."""
    for name in imports(path)[1]:
        assert layer(name) in ("core", "use case"), f"{module_name(path)} imports {name}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer(module_name(p)) == "adapter"], ids=module_name)
def test_adapters_never_import_the_wiring(path: Path) -> None:
    """Adapters never reach up into tap.py or the admin command."""
    for name in imports(path)[1]:
        assert layer(name) != "wiring", f"{module_name(path)} imports {name}"


def test_only_the_redis_adapter_talks_to_redis() -> None:
    """txredisapi is imported by mailcow/redisio.py alone; the rest reaches Redis through its Protocols."""
    importers = sorted(module_name(p) for p in MODULES if "txredisapi" in imports(p)[0])
    assert importers == ["mailcow.redisio"]


def test_the_package_stays_in_sub_packages() -> None:
    """At most the use case and the wiring live at the top of the package."""
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == sorted((*USE_CASE, *WIRING))


def test_mypy_is_clean() -> None:
    """mypy finds no type errors in the package (mypy.ini holds the settings)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", str(PACKAGE)], capture_output=True, text=True, timeout=300,
        cwd=PACKAGE.parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:]
