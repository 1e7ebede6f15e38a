"""The two lock files say the same thing: pylock.toml (PEP 751, every wheel with its sha256 and a public URL)
pins exactly the versions of constraints.txt, the file make install / test / demo install with."""

from itertools import chain
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def test_pylock_pins_what_constraints_pins_with_hashes_and_public_urls():
    pins = requirement_pins()
    lock = tomllib.loads((ROOT / "pylock.toml").read_text())
    locked = {canonical(p["name"]): p for p in lock["packages"] if "directory" not in p}  # the project itself
    assert {n: p["version"].split("+")[0] for n, p in locked.items() if n in pins} == pins
    assert set(locked) - set(pins) <= {"setuptools"}, set(locked) - set(pins)
    for name, package in locked.items():
        for wheel in package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else []):
            assert wheel["url"].startswith("https://"), f"{name}: {wheel['url']} is not a public URL"
            assert len(wheel["hashes"]["sha256"]) == 64, name


def test_every_requirement_of_pyproject_is_capped_and_admits_its_pin():
    """A plain `pip install -e ".[dev]"` cannot resolve an untested release: every requirement of pyproject.toml
    (the project's, its extras', the build's) has an upper bound, and the locked version lies within it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = {
        canonical(p["name"]): p["version"].split("+")[0]
        for p in tomllib.loads((ROOT / "pylock.toml").read_text())["packages"]
        if "directory" not in p  # the project itself
    }
    requirements = chain(
        project["project"]["dependencies"],
        *project["project"]["optional-dependencies"].values(),
        project["build-system"]["requires"],
    )
    for text in requirements:
        requirement = Requirement(text)
        assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), f"{text}: no upper bound"
        version = locked.get(canonical(requirement.name))
        assert version is None or requirement.specifier.contains(version), f"{text} excludes the lock's {version}"
