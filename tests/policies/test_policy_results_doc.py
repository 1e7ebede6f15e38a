"""docs/policies.md's pretraining table is the committed JSON's: it is exactly what launch/policy_variants.py
prints from docs/results/policy_pretraining.json, so a rerun that changes a number and a hand edit of the
table both fail here."""

import json
from pathlib import Path

from launch.policy_variants import VARIANTS, markdown

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "policy_pretraining.json"


def test_the_docs_table_equals_the_json():
    report = json.loads(RESULTS.read_text())
    assert markdown(report) in (ROOT / "docs" / "policies.md").read_text(), (
        "docs/policies.md's table differs from the JSON: paste `python launch/policy_variants.py report=true`"
    )


def test_every_variant_in_the_json_is_a_listed_variant_with_its_overrides():
    listed = {name: overrides for name, _, overrides in VARIANTS}
    rows = json.loads(RESULTS.read_text())["variants"]
    assert rows, "no variant recorded"
    for row in rows:
        assert row["overrides"] == listed[row["name"]], row["name"]
        assert 0 <= row["val/overall"] <= 1 and row["threads"] >= 1
