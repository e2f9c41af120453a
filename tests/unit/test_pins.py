"""constraints.txt pins the tested version of every package, and every install path uses it."""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PINS = REPO / "constraints.txt"


def pins() -> dict[str, str]:
    """Package (canonical name) -> pinned version."""
    found: dict[str, str] = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not a pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in found, f"{name} is pinned twice"
        found[name] = match.group(2)
    return found


def setup_requirements() -> list[Requirement]:
    """install_requires and every extra of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg in ("install_requires", "extras_require")}
    texts = list(keywords["install_requires"]) + [text for extra in keywords["extras_require"].values() for text in extra]
    return [Requirement(text) for text in texts]


def test_every_requirement_is_pinned_within_its_range() -> None:
    """Each package setup.py asks for has one pin, and the pin satisfies setup.py's range."""
    pinned = pins()
    for requirement in setup_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (requirement, pinned[name])
    assert pinned["pip"] and pinned["txredisapi"] == "1.6.0"


def test_the_pins_are_the_versions_installed_and_tested() -> None:
    """The environment this suite runs in holds exactly the pinned versions (packages not installed
    yet, such as txredisapi before it is required, are skipped), and every installed package is pinned."""
    pinned = pins()
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    for name, version in pinned.items():
        if name in installed:
            assert installed[name] == version, f"{name}: installed {installed[name]}, pinned {version}"
    unpinned = sorted(set(installed) - set(pinned) - {"mailcow-smtp-api", "setuptools", "wheel"})
    assert unpinned == [], f"installed but not pinned: {unpinned}"


def test_every_install_uses_the_constraints() -> None:
    """bootstrap.sh (run.sh and test.sh) and the Dockerfile pass constraints.txt to each pip install."""
    for path in (REPO / "scripts" / "bootstrap.sh", REPO / "Dockerfile"):
        installs = [line for line in path.read_text().splitlines() if re.search(r"\bpip install\b", line)]
        assert installs, path
        for line in installs:
            assert "--constraint" in line and "constraints.txt" in (line + path.read_text()), f"{path.name}: {line}"
    assert '"$pins" -nt "$stamp"' in (REPO / "scripts" / "bootstrap.sh").read_text()  # a new pin reinstalls
