"""launch/policy_binding.py: the probe counts each kind of pixel right, and a policy that does nothing keeps every
object and background pixel, changes none, and scores the oracle's 0.5 for doing nothing."""

import json
from pathlib import Path

import pytest
import torch

from launch.policy_binding import SIGMAS, main, markdown, pixel_hits, placement_markdown
from policies.shapeedit import TINY, TINY_INSTRUCTIONS, ShapeEditPolicy
from reward.shapeedit import GenerateConfig, generate


def test_pixel_kinds_are_counted_against_the_target():
    source = torch.full((1, 3, 4, 4), -1.0)  # a black background ...
    source[:, :, 0, :2] = 1.0  # ... with a white object of two pixels, and a second one
    source[:, :, 3, 3] = 1.0
    target = source.clone()
    target[:, 0, 0, :2] = -1.0  # the first object turns cyan
    assert pixel_hits(target, source, target) == {
        "changed": (2, 2),
        "kept_objects": (1, 1),
        "kept_background": (13, 13),
    }
    wrong = target.clone()
    wrong[:, 0, 3, 3] = -1.0  # the other object turned too
    assert pixel_hits(wrong, source, target)["kept_objects"] == (0, 1)
    assert pixel_hits(source, source, target)["changed"] == (0, 2)


def test_a_policy_that_does_nothing_keeps_everything_and_scores_doing_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=40, seed=0, val_fraction=0.5), progress=False)
    ShapeEditPolicy.build(TINY, TINY_INSTRUCTIONS).save_pretrained(tmp_path / "untrained")  # keeps the source
    out = tmp_path / "binding.json"
    main(["--policy", f"untrained={tmp_path / 'untrained'}", "--data", str(data), "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["policies"]["untrained"]["families"]
    assert rows["all"]["prompts"] == sum(r["prompts"] for k, r in rows.items() if k != "all") > 0
    for row in rows.values():
        assert row["gold"] == pytest.approx(0.5)
        for name in (*(f"sigma_{s}" for s in SIGMAS), "sampled"):
            assert row[f"{name}/changed"] == 0.0
            assert row[f"{name}/kept_background"] in (1.0, None) and row[f"{name}/kept_objects"] in (1.0, None)
        for sigma in SIGMAS:  # it gives every pixel a small chance of changing, wherever the edit is
            for kind in ("changed", "kept_background"):
                assert row[f"sigma_{sigma}/p_change_{kind}"] is None or 0 < row[f"sigma_{sigma}/p_change_{kind}"] < 0.1
    assert rows["all"]["sampled/kept_background"] == 1.0  # None: a family without such pixels (a new background)
    printed = capsys.readouterr().out
    assert markdown(report) in printed and placement_markdown(report) in printed
    assert placement_markdown(report).count("| untrained |") == sum(
        f in rows for f in ("add", "move", "resize", "swap", "recolour")
    )
    with pytest.raises(SystemExit):
        main(["--policy", str(tmp_path / "untrained")])  # no NAME=


def test_the_docs_table_is_the_committed_json():
    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / "docs" / "results" / "policy_binding.json").read_text())
    docs = (root / "docs" / "policies.md").read_text()
    for table in (markdown, placement_markdown):
        assert table(report) in docs, (
            f"docs/policies.md's probe table differs from docs/results/policy_binding.json: "
            f"paste `{table.__name__}` of it"
        )
