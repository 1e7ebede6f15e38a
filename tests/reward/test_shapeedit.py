"""ShapeEdit: determinism, the oracle's ranking, critiques, held-out splits, export format, CLI errors."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reward.shapeedit import GenerateConfig, build_reference, generate, judge, judge_image, render, sample_scene
from reward.shapeedit.__main__ import main as cli
from reward.shapeedit.candidates import MODES, make_candidate, render_candidate
from reward.shapeedit.critique import LOC_BINS, box, box_text, parse_locations, scores_1_to_4, status, write_critique
from reward.shapeedit.edits import (
    ADDED_ID,
    FAMILIES,
    Edit,
    apply_edits,
    composition_keys,
    is_heldout,
    refer,
    sample_instruction,
)
from reward.shapeedit.oracle import FAR
from reward.shapeedit.world import BACKGROUND_COLOURS, KINDS, SHAPE_COLOURS, SIZES, Scene, palette, size_name


def _cases(seed: int, n: int):
    """n random (scene, edits, instruction) draws."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = sample_scene(rng)
        drawn = sample_instruction(rng, scene)
        if drawn is not None:
            out.append((scene, *drawn))
    return rng, out


def test_palette_colours_are_further_apart_than_the_oracle_threshold():
    p = palette()
    assert min(np.abs(a - b).max() for a, b in itertools.combinations(p, 2)) > FAR


def test_same_seed_gives_byte_identical_output(tmp_path):
    for name in ("a", "b"):
        generate(GenerateConfig(out=str(tmp_path / name), pairs=120, seed=7), progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate(GenerateConfig(out=str(tmp_path / "c"), pairs=120, seed=8), progress=False)
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()


def test_oracle_ranks_the_correct_edit_above_every_failure_mode():
    """Over 500 random instructions: the correct edit scores 1 and beats every failure; edits to the wrong
    object or with a wrong attribute (shape, size, place, colour) follow little of what was asked."""
    rng, cases = _cases(seed=1, n=500)
    compared = 0
    following = {mode: [] for mode in MODES}
    for scene, edits, _ in cases:
        reference = build_reference(scene, edits, 64, 64)
        correct = judge(reference, render(apply_edits(scene, edits)))
        assert (correct.following, correct.consistency, correct.quality, correct.overall) == (1.0, 1.0, 1.0, 1.0)
        for mode in MODES[1:]:
            candidate = make_candidate(rng, scene, edits, mode)
            if candidate is None:
                continue
            image = render_candidate(candidate, rng, 64)
            if np.array_equal(image, render(apply_edits(scene, edits))):
                continue
            judged = judge(reference, image)
            assert judged.overall < correct.overall, (mode, edits)
            following[mode].append(judged.following)
            compared += 1
    assert compared > 2500
    wrong_attribute, wrong_object = np.array(following["wrong_attribute"]), np.array(following["wrong_object"])
    assert np.mean(wrong_attribute >= 0.75) <= 0.02 and wrong_attribute.mean() <= 0.20, wrong_attribute.mean()
    assert wrong_object.mean() <= 0.10


def test_oracle_scores_failures_on_the_right_axis():
    rng, cases = _cases(seed=2, n=150)
    for scene, edits, _ in cases:
        reference = build_reference(scene, edits, 64, 64)
        j = judge(reference, render(scene))  # nothing done
        assert j.following < 0.05 and j.consistency == 1.0 and j.quality == 1.0
        for mode in ("noise", "blur", "colour_shift"):
            image = render_candidate(make_candidate(rng, scene, edits, mode), rng, 64)
            if np.array_equal(image, render(apply_edits(scene, edits))):
                continue  # blur of an image without edges
            assert judge(reference, image).quality < 0.9, mode


def test_oracle_judges_arbitrary_images_of_any_size_and_mode():
    scene = Scene("white", ())
    edits = (Edit("add", kind="circle", colour="red", size=SIZES["large"], region="centre"),)
    target = render(apply_edits(scene, edits), 40, 56)
    assert judge_image(scene, edits, Image.fromarray(target)).overall == 1.0
    assert judge_image(scene, edits, Image.fromarray(target).convert("RGBA")).overall == 1.0
    assert (
        judge_image(scene, edits, Image.fromarray(target).convert("P", palette=Image.Palette.ADAPTIVE)).overall == 1.0
    )
    assert judge_image(scene, edits, target.astype(np.float32) / 255).overall == 1.0
    noise = np.random.default_rng(0).integers(0, 256, size=target.shape, dtype=np.uint8)
    assert judge_image(scene, edits, noise).overall < 0.3
    with pytest.raises(ValueError, match="reference was built for"):
        judge(build_reference(scene, edits, 64, 64), target)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        judge_image(scene, edits, target[:, :, 0])


def test_referring_expressions_pick_out_exactly_one_shape():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(400):
        scene = sample_scene(rng)
        for shape in scene.shapes:
            words = refer(scene, shape.id, rng)
            if words is None or " on the " in words or " at the " in words:
                continue
            tokens = words.split()
            matches = [
                s
                for s in scene.shapes
                if s.kind == tokens[-1]
                and (len(tokens) < 2 or s.colour == tokens[-2])
                and (len(tokens) < 3 or size_name(s.size) == tokens[-3])
            ]
            assert matches == [shape], (words, scene)
            assert tokens[-1] in KINDS and (len(tokens) < 2 or tokens[-2] in SHAPE_COLOURS)
            checked += 1
    assert checked > 500


def test_critiques_agree_with_the_oracle_and_their_boxes_with_the_scene():
    rng, cases = _cases(seed=4, n=200)
    for scene, edits, instruction in cases:
        reference = build_reference(scene, edits, 64, 64)
        wanted = apply_edits(scene, edits)
        for mode in MODES:
            candidate = make_candidate(rng, scene, edits, mode)
            if candidate is None:
                continue
            j = judge(reference, render_candidate(candidate, rng, 64))
            text = write_critique(scene, edits, candidate, j)
            following, quality = scores_1_to_4(j)
            verdict = re.search(r"Instruction following (\d)/4, consistency and quality (\d)/4, overall (\d)/8", text)
            assert verdict and tuple(map(int, verdict.groups())) == (following, quality, following + quality), text
            # One status per atomic edit (a swap states it on both objects), in the oracle's words.
            said = [m.group(1) for m in re.finditer(r"asked to [^:]*: (done|partly done|not done)", text)]
            expected = [
                status(f) for e, f in zip(edits, j.following_per_edit) for _ in range(2 if e.family == "swap" else 1)
            ]
            assert sorted(said) == sorted(expected), text
            # Every region's box is the exact box of an object of the source, of the asked-for scene or of
            # the candidate, on the 0-1000 scale; the instruction's objects come first, with tags in order.
            header, *lines = text.split("\n")
            boxes = re.findall(r"<\|bbox_(\d)\|> ((?:<\|loc_\d+\|>){4})", header)
            assert [int(b[0]) for b in boxes] == list(range(len(boxes))), text
            known = {box_text(box(s)) for sc in (scene, wanted, candidate.scene) for s in sc.shapes}
            assert all(b[1] in known for b in boxes), text
            named = {
                i for e in edits for i in ([ADDED_ID] if e.family == "add" else [e.target, e.other]) if i is not None
            }
            assert len(boxes) >= len(named), text
            assert [line.split(" ")[0] for line in lines[: len(boxes)]] == [
                f"<|bbox_{k}|>" for k in range(len(boxes))
            ], text
            assert lines[len(boxes)].startswith("<|global|> ") and lines[-1].startswith("Verdict: "), text
            if mode == "correct":
                assert "not requested" not in text and "clean and sharp" in text and "8/8" in text
            if mode == "not_applied":
                assert "changes:" not in text and "changed from" not in text
            if mode == "wrong_object":
                # The object that did change is boxed and said to be not asked for.
                assert "not asked; changes:" in text, text


def test_boxes_are_four_location_tokens_that_read_back_within_half_a_bin():
    half = 1000 / LOC_BINS / 2
    for b in [(0, 0, 1000, 1000), (15, 16, 31, 32), (500, 499, 968, 969)]:
        text = box_text(b)
        assert text.count("<|loc_") == 4 and text.replace("<|loc_", "").count("|>") == 4
        assert all(abs(read - true) <= half for read, true in zip(parse_locations(text), b)), (b, text)
    assert box_text((0, 0, 1000, 1000)) == "<|loc_0|><|loc_0|><|loc_31|><|loc_31|>"
    assert parse_locations("no boxes [1, 2, 3, 4]") == []


def test_dataset_format_splits_and_heldout_compositions(tmp_path):
    out = tmp_path / "data"
    meta = generate(GenerateConfig(out=str(out), pairs=1200, seed=5), progress=False)
    assert sum(meta["pairs"].values()) == 1200
    for split in ("train", "val", "test_iid", "test_heldout"):
        prompts = json.loads((out / f"{split}_prompts.json").read_text())
        assert prompts, split
        for p in prompts:
            scene = Scene.from_dict(p["scene"])
            edits = tuple(Edit.from_dict(e) for e in p["edits"])
            keys = [k for e in edits for k in composition_keys(scene, e)]
            heldout = any(is_heldout(k) for k in keys)
            assert heldout == (split == "test_heldout"), (split, keys)
        triples = json.loads((out / f"{split}_triples.json").read_text())
        assert [t["prompt_id"] for t in triples] == [p["prompt_id"] for p in prompts]
        for t, p in zip(triples, prompts):
            # The target image is exactly the render of the edited scene.
            edits = tuple(Edit.from_dict(e) for e in p["edits"])
            target = render(apply_edits(Scene.from_dict(p["scene"]), edits))
            assert np.array_equal(np.asarray(Image.open(out / t["path_target"])), target)
        pairs = json.loads((out / f"{split}.json").read_text())
        required = {"prompt", "path_src", "path1", "path2", "model1", "model2", "tie_case", "rationale1", "rationale2"}
        required |= {f"model{s}_{d}_score" for s in "12" for d in ("dim1", "dim2", "overall")}
        for row in pairs:
            assert required <= set(row)
            assert row["oracle1"]["overall"] >= row["oracle2"]["overall"]
            assert row["tie_case"] == (row["oracle1"]["overall"] - row["oracle2"]["overall"] < 0.02)
            assert row["model1_overall_score"] == row["model1_dim1_score"] + row["model1_dim2_score"]
            for key in ("path_src", "path1", "path2"):
                assert Image.open(out / row[key]).size == (64, 64)
    train_keys = {tuple(k) for p in json.loads((out / "train_prompts.json").read_text()) for k in p["compositions"]}
    heldout_keys = {
        tuple(k) for p in json.loads((out / "test_heldout_prompts.json").read_text()) for k in p["compositions"]
    }
    assert not {k for k in heldout_keys if is_heldout(k)} & train_keys


def test_heldout_compositions_combine_words_seen_in_training():
    """Held out: one (family, kind, colour) in six of the shape edits, never a background colour (its
    composition is the colour alone, so holding it out would leave the word unseen in training)."""
    assert not any(is_heldout(("background", "background", c)) for c in BACKGROUND_COLOURS)
    for family in FAMILIES:
        if family == "background":
            continue
        for kind in KINDS:
            held = [c for c in SHAPE_COLOURS if is_heldout((family, kind, c))]
            assert 1 <= len(held) <= 2, (family, kind, held)
    for colour in SHAPE_COLOURS:  # every colour word stays in training with some family and kind
        assert any(not is_heldout((f, k, colour)) for f in FAMILIES if f != "background" for k in KINDS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "0"], "pairs must be at least 1"),
        (["--size", "8"], "size must be between 16 and 1024"),
        (["--candidates", "1"], "candidates must be between 2"),
        (["--val-fraction", "0.6", "--test-iid-fraction", "0.5"], "split fractions"),
    ],
)
def test_cli_refuses_impossible_requests(tmp_path, capsys, argv, message):
    assert cli(["generate", "--out", str(tmp_path / "x")] + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_unknown_options_and_non_empty_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["generate", "--out", str(tmp_path), "--pears", "10"])
    assert e.value.code == 2 and "--pears" in capsys.readouterr().err
    (tmp_path / "keep.txt").write_text("precious")
    assert cli(["generate", "--out", str(tmp_path), "--pairs", "10"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_cli_generates_and_draws_a_contact_sheet(tmp_path, capsys):
    assert cli(["generate", "--out", str(tmp_path / "d"), "--pairs", "30", "--size", "32"]) == 0
    assert "wrote 30 pairs" in capsys.readouterr().out
    assert cli(["sheet", str(tmp_path / "d"), "--rows", "3"]) == 0
    sheet = Image.open(tmp_path / "d" / "sheet_train.png")
    assert sheet.size[0] > 5 * 128 and sheet.size[1] > 3 * 128
    assert Path(tmp_path / "d" / "images" / "train" / "000000_src.png").exists()


@pytest.mark.parametrize(
    "wrong, asked_kind",
    [
        (dict(kind="circle"), "square"),  # the closest shapes: a circle inscribed in the asked square
        (dict(kind="square"), "circle"),  # a square covering the asked circle
        (dict(kind="triangle"), "square"),
        (dict(size=SIZES["medium"]), "square"),  # one size too small
        (dict(size=SIZES["large"] * 1.3), "square"),  # too large
        (dict(region="centre"), "square"),  # elsewhere
        (dict(colour="blue"), "square"),
    ],
)
def test_following_judges_what_was_asked_not_only_the_pixels_it_named(wrong, asked_kind):
    """Hand-built: add a large pink shape at the top-left on white. The correct edit follows fully, doing
    nothing not at all, and a wrong shape, size, place or colour loses at least a third of following."""
    scene = Scene("white", ())
    asked = Edit("add", kind=asked_kind, colour="pink", size=SIZES["large"], region="top-left corner")
    reference = build_reference(scene, (asked,), 64, 64)
    assert judge(reference, render(apply_edits(scene, (asked,)))).following == 1.0
    assert judge(reference, render(scene)).following == 0.0
    done = Edit.from_dict({**asked.to_dict(), **wrong})
    got = judge(reference, render(apply_edits(scene, (done,)))).following
    assert got <= 2 / 3, (wrong, got)
