"""The install is reproducible (a complete lock of exact versions) and safe (no requests with
known advisories, whatever torchattacks pins)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SAFE_REQUESTS = Version("2.32.4")  # CVE-2023-32681, CVE-2024-35195, CVE-2024-47081 fixed


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = Version(m.group(2))
    return pins


def test_installed_requests_has_no_known_advisories():
    assert Version(metadata.version("requests")) >= SAFE_REQUESTS, (
        "requests below 2.32.4 is installed (torchattacks pins ~=2.25.1): install with the "
        "README's command (requirements.lock) or upgrade requests"
    )


def test_lock_pins_every_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    needed = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for text in needed:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"requirements.lock does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["requests"] >= SAFE_REQUESTS
    override = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]
    assert any(r.startswith("requests>=") for r in override["override-dependencies"])
