"""The two lock files say the same thing: pylock.toml (PEP 751, every wheel with its sha256 and a public URL)
pins exactly the versions of requirements.txt, the file make install / test / demo install with."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_pylock_pins_what_requirements_pins_with_hashes_and_public_urls():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    lock = tomllib.loads((ROOT / "pylock.toml").read_text())
    locked = {canonical(p["name"]): p for p in lock["packages"] if "directory" not in p}  # the project itself
    assert {n: p["version"].split("+")[0] for n, p in locked.items() if n in pins} == pins
    assert set(locked) - set(pins) <= {"setuptools"}, set(locked) - set(pins)
    for name, package in locked.items():
        for wheel in package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else []):
            assert wheel["url"].startswith("https://"), f"{name}: {wheel['url']} is not a public URL"
            assert len(wheel["hashes"]["sha256"]) == 64, name
