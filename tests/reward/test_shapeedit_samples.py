"""Oracle-labelled comparisons of an editor's own samples (reward/shapeedit/samples.py), the within-group ranking
statistics of reward.compare.on_policy_ranking, and reward/train.py's data.mix."""

import json

import numpy as np
import pytest
from PIL import Image

from reward.compare import on_policy_ranking
from reward.config import load_config
from reward.data import DataError, load_pairs
from reward.shapeedit import render
from reward.shapeedit.edits import Edit, apply_edits
from reward.shapeedit.samples import label_samples
from reward.shapeedit.world import Scene, Shape
from reward.train import TrainConfig, prepare_data

SCENE = Scene(
    "white",
    (Shape(0, "circle", "red", 0.25, 0.25, 0.15), Shape(1, "square", "blue", 0.72, 0.7, 0.15)),
)
ASKED = (Edit("recolour", target=0, colour="green"),)


def _prompt(tmp_path) -> dict:
    Image.fromarray(render(SCENE)).save(tmp_path / "src.png")
    return {
        "prompt_id": "train-000000",
        "instruction": "Make the red circle green",
        "path_src": "src.png",
        "scene": SCENE.to_dict(),
        "edits": [e.to_dict() for e in ASKED],
    }


def test_samples_are_judged_critiqued_and_paired_like_candidates(tmp_path):
    right = render(apply_edits(SCENE, ASKED))
    nothing = render(SCENE)
    wrong = render(apply_edits(SCENE, (Edit("recolour", target=1, colour="green"),)))  # the other object
    rows, judgements = label_samples(_prompt(tmp_path), [right, nothing, wrong, right], tmp_path, "images/p/0", "train")
    assert [j.overall for j in judgements][0] == 1.0 and judgements[1].following == 0.0
    assert len(rows) == 5  # 4 samples give 6 pairs, less the pair of the two identical edits
    by_id = {r["id"]: r for r in rows}
    first = by_id["train-000000-s0s1"]  # the right edit is preferred, and its critique says it is done
    assert first["origin"] == "policy" and not first["tie_case"]
    assert "the circle: asked to recolour the circle to green: done" in first["rationale1"]
    assert "not done" in first["rationale2"] and "Verdict: a good edit" in first["rationale1"]
    damaged = by_id["train-000000-s0s2"]["rationale2"]  # the wrong object's damage is named, with its box
    assert "the square: not asked; 100% of it lost its colour" in damaged and "<|bbox_1|> <|loc_" in damaged
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    pairs, skipped = load_pairs(tmp_path / "pairs.json", progress=False)  # the EditReward-Data format, images included
    assert len(pairs) == 5 and not skipped and pairs[0].chosen_critique == first["rationale1"]


def test_on_policy_ranking_by_hand():
    gold = [[0.9, 0.5, 0.1], [0.5, 0.55, 0.5]]
    scores = [[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]]  # the second group: no spread in score, no Spearman
    r = on_policy_ranking(gold, scores, gap=0.1)
    assert r["groups"] == 1 and r["spearman"] == pytest.approx(0.5)
    # pairs with gold gap >= 0.1: (0.9, 0.5) right, (0.9, 0.1) right, (0.5, 0.1) wrong
    assert r["pairs"] == 3 and r["pair_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    # first-ranked gold minus the group mean: 0.9 - 0.5, and a three-way tie at the top gains nothing
    assert r["top1_gain"] == pytest.approx((0.9 - 0.5) / 2, abs=1e-4)
    assert on_policy_ranking(gold, gold)["pair_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"must both be \(P, G\)"):
        on_policy_ranking(gold, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        on_policy_ranking(gold, [[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])


def test_mixed_files_join_the_training_pairs_and_a_missing_one_is_refused_first(tmp_path):
    from reward.shapeedit import GenerateConfig, generate

    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=24, seed=0), progress=False)
    extra = tmp_path / "extra"
    extra.mkdir()
    rows, _ = label_samples(
        _prompt(extra), [render(apply_edits(SCENE, ASKED)), render(SCENE)], extra, "images/p/0", "train"
    )
    (extra / "policy_train.json").write_text(json.dumps(rows))
    base = [f"data.train={data / 'train.json'}", f"output_dir={tmp_path / 'run'}"]
    alone = prepare_data(load_config(TrainConfig, None, base))[0]
    mixed = prepare_data(load_config(TrainConfig, None, [*base, f"data.mix=[{extra / 'policy_train.json'}]"]))[0]
    assert len(mixed) == len(alone) + 1 and mixed[-1].chosen.endswith("images/p/0_s0.png")
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'fresh'}", f"data.mix=[{tmp_path / 'none.json'}]"])
    with pytest.raises(DataError, match="data.mix: .*none.json not found"):
        prepare_data(cfg)
    assert not (tmp_path / "fresh").exists()  # refused before ShapeEdit data was generated
    twice = f"data.mix=[{extra / 'policy_train.json'}, {extra / 'policy_train.json'}]"
    with pytest.raises(DataError, match="names a file twice"):
        prepare_data(load_config(TrainConfig, None, [*base, twice]))


def test_a_painted_blob_is_named_with_its_box_and_soft_edges_are_not(tmp_path):
    from PIL import ImageFilter

    from reward.shapeedit.oracle import build_reference, judge
    from reward.shapeedit.samples import sample_critique

    reference = build_reference(SCENE, ASKED, 64, 64)
    right = render(apply_edits(SCENE, ASKED))

    def critique(image):
        array = np.asarray(image, dtype=np.float32) / 255
        return sample_critique(SCENE, ASKED, reference, array, judge(reference, array))

    soft = critique(Image.fromarray(right).filter(ImageFilter.GaussianBlur(1)))
    assert "background" not in soft.splitlines()[1] and "the background is still white" in soft
    blob = right.copy()
    blob[40:52, 5:17] = [255, 0, 0]  # 12 x 12 pixels of red on the white background, where nothing was asked
    text = critique(blob)
    assert "<|bbox_1|> <|loc_20|><|loc_2|><|loc_25|><|loc_8|>" in text  # rows 40-51, columns 5-16: [625, 78, 812, 266]
    assert "part of the background: not asked; 144 pixels painted over" in text
    assert "parts of the background were painted over" in text
