"""The README stays short and true: at most 250 lines, every link and every path of the "where do I
change X?" table exists, and every name the table points at is defined in the files of its row."""

import dataclasses
import re
from pathlib import Path

from reward.config import flatten
from reward.train import TrainConfig
from rl.config import RLConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


CONFIG_KEYS = set(flatten(dataclasses.asdict(RLConfig()))) | set(flatten(dataclasses.asdict(TrainConfig())))
CONFIG_SECTIONS = {key.split(".")[0] for key in CONFIG_KEYS if "." in key}


def where_rows() -> list[tuple[str, str]]:
    section = README.split("## Where do I change X?", 1)[1].split("\n## ", 1)[0]
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| to change") and "---" not in line
    ]
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ", 1)) for row in rows]


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_every_row_of_the_where_table_points_at_something_real():
    rows = where_rows()
    assert len(rows) > 20
    for what, where in rows:
        ticked = re.findall(r"`([^`]+)`", where)
        paths = [t for t in ticked if "/" in t and not t.startswith(("launch/configs/*", "trainer."))]
        globs = [t for t in ticked if "*" in t and "/" in t]
        for path in paths:
            if "*" in path:
                assert list(ROOT.glob(path)), f"{what}: {path} matches nothing"
            else:
                assert (ROOT / path).exists(), f"{what}: {path} does not exist"
        files = [ROOT / p for p in paths if p.endswith(".py") and "*" not in p] + [
            p for g in globs for p in ROOT.glob(g) if p.suffix == ".py"
        ]
        names = [t for t in ticked if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", t)]
        for name in names:
            if name.split(".")[0] in CONFIG_SECTIONS:  # a config key: it must exist
                assert name in CONFIG_KEYS, f"{what}: `{name}` is no config key of rl/config.py or reward/train.py"
                continue
            last = name.split(".")[-1]
            defined = any(
                re.search(
                    rf"\b(def|class)\s+{last}\b|^{last}\s*[:=]|^\s+{last}\s*:|^from .* import .*\b{last}\b",
                    f.read_text(),
                    re.M,
                )
                for f in files
            )
            assert defined, (
                f"{what}: `{name}` is defined or imported in none of {[str(f.relative_to(ROOT)) for f in files]}"
            )
