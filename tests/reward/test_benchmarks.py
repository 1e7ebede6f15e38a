"""reward/benchmarks.py on small fixtures written in each benchmark's own format, with figures computed by hand
from the authors' definitions (the reward is the edited image's mean brightness, so every score gap is known)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward.benchmarks import load_benchmark, parse_ranking, summarise, tie_calibrated_accuracy
from reward.data import DataError
from reward.evaluate import score_comparisons


class Brightness:
    """A transparent reward for fixtures: the mean pixel value of the edited image."""

    def score(self, source_images, instructions, edited_images, batch_size=0):
        return torch.tensor([float(np.asarray(e).mean()) for e in edited_images])


def grey(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, level, level))


def save(tmp_path, level: int) -> str:
    name = f"g{level}.png"
    grey(level).save(tmp_path / name)
    return name


def embedded(level: int) -> dict:
    """An image as the hub's parquet stores it."""
    buffer = io.BytesIO()
    grey(level).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def run(kind, path):
    comparisons, skipped = load_benchmark(kind, path, progress=False)
    assert not skipped
    diffs, _, _ = score_comparisons(Brightness(), comparisons, batch_size=4)
    return summarise(kind, comparisons, diffs)


def check(result: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def tiger_hub_rows(image):
    """TIGER-Lab/EditReward-Bench's parquet layout: one row per compared pair."""
    row = lambda id_, a, b, ranking, dataset, ctype="AvsB": dict(  # noqa: E731
        id=id_,
        instruction="edit",
        source_image=image(0),
        candidate_1=image(a),
        candidate_2=image(b),
        ranking=ranking,
        comparison_type=ctype,
        dataset=dataset,
        model_1="m1",
        model_2="m2",
        score_1=1.0,
        score_2=2.0,
    )
    return [
        row("p1", 200, 100, "A>B", "2pair"),  # gap +100: right
        row("p2", 100, 200, "A>B", "2pair"),  # gap -100: wrong
        row("p3", 150, 152, "A=B", "2pair"),  # tie, gap -2: right once eps >= 2
        # item h1, candidates A=200, B=100, C=50: pairs A>B and A>C right, C>B wrong: the ranking is wrong
        row("h1_0", 200, 100, "A>B", "3pair"),
        row("h1_1", 200, 50, "A>C", "3pair", "AvsC"),
        row("h1_2", 100, 50, "C>B", "3pair", "BvsC"),
        # item h2, A=10, B=20, C=30, ranked C>B>A: every pair right
        row("h2_0", 10, 20, "B>A", "3pair"),
        row("h2_1", 10, 30, "C>A", "3pair", "AvsC"),
        row("h2_2", 20, 30, "B<C", "3pair", "BvsC"),
        # item h3 has one of its three pairs: it counts for pairwise accuracy, not for the ranking
        row("h3_0", 30, 60, "A<B", "3pair"),
    ]


HUB_EXPECTED = {
    "2-Pair/pairwise_accuracy": 2 / 3,  # eps 0: 1/3, eps 2: 2/3, eps 100: 1/3
    "2-Pair/tie_eps": 2.0,
    "2-Pair/strict_ranking_accuracy": 2 / 3,  # p1 right, p2 wrong, the tie p3 within eps
    "2-Pair/strict_total_samples": 3,
    "3-Pair/pairwise_accuracy": 6 / 7,
    "3-Pair/strict_ranking_accuracy": 1 / 2,
    "3-Pair/strict_correct_count": 1,
    "3-Pair/strict_total_samples": 2,
    "3-Pair/incomplete_items": 1,
    "3-Pair/pair_count": 7,
    "overall/pairwise_accuracy": 8 / 10,  # one threshold (2) over all 10 pairs
    "overall/strict_ranking_accuracy": 3 / 5,  # (2 + 1) / (3 + 2) items
    "overall/total_pair_count": 10,
}


def test_tiger_hub_parquet_scores_as_its_authors_script(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "2pair").mkdir()
    rows = tiger_hub_rows(embedded)
    # as the hub stores it: parquet with datasets' Image features (decoded lazily), and a plain struct column
    hub = (
        datasets.Dataset.from_list(rows[:3])
        .cast_column("source_image", datasets.Image())
        .cast_column("candidate_1", datasets.Image())
    )
    hub.to_parquet(tmp_path / "2pair" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "3pair.parquet")
    check(run("tiger", tmp_path), HUB_EXPECTED)
    # the same rows as a json list with image paths
    (tmp_path / "tiger.json").write_text(json.dumps(tiger_hub_rows(lambda level: save(tmp_path, level))))
    check(run("tiger", tmp_path / "tiger.json"), HUB_EXPECTED)


def test_tiger_authors_json_ties_and_full_rankings(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    item = lambda levels, ranking: {
        "prompt": "edit",
        "path_src": ref(0),
        "paths_generated": [ref(v) for v in levels],
        "human_vote": {"ranking": ranking},
    }  # noqa: E731
    rows = [
        item([200, 100], "A>B"),  # right
        item([100, 200], "A>B"),  # wrong
        item([150, 152], "A=B=Good"),  # tie, gap -2
        item([200, 100, 50], "C>A>B"),  # A>B right, C>A and C>B wrong: ranking wrong
        item([10, 20, 30], "C>B>A"),  # all three right
        item([40, 30, 20, 10], "A>B>C>D"),  # all six right
    ]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    check(
        run("tiger", tmp_path / "bench.json"),
        {
            "2-Pair/pairwise_accuracy": 2 / 3,
            "2-Pair/tie_eps": 2.0,
            "2-Pair/strict_ranking_accuracy": 2 / 3,
            "3-Pair/pairwise_accuracy": 4 / 6,
            "3-Pair/strict_ranking_accuracy": 1 / 2,
            "4-Pair/pairwise_accuracy": 1.0,
            "4-Pair/strict_ranking_accuracy": 1.0,
            "4-Pair/pair_count": 6,
            "overall/pairwise_accuracy": 12 / 15,  # eps 2: the tie joins the 11 right pairs
            "overall/strict_ranking_accuracy": 4 / 6,
            "overall/strict_total_samples": 6,
        },
    )
    rows[1]["human_vote"]["ranking"] = "A=B=Bad"  # gap -100 is no tie at eps 2, nor does eps 100 pay
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    assert run("tiger", tmp_path / "bench.json")["2-Pair/strict_ranking_accuracy"] == pytest.approx(2 / 3)


def test_tiger_labels_are_parsed_strictly():
    assert parse_ranking("C>A>B", "ABC", "f:row 0") == ["C", "A", "B"]
    assert parse_ranking("A < C", "AC", "f:row 0") == ["C", "A"]
    assert parse_ranking("B=A=Bad", "AB", "f:row 0") is None
    for label, letters in [
        ("A>B", "ABC"),
        ("A=B=Good", "ABC"),
        ("A>B<C", "ABC"),
        ("A>A", "AB"),
        ("yes", "AB"),
        (1, "AB"),
        ("A=C", "AB"),
    ]:
        with pytest.raises(DataError, match="f:row 0: ranking"):
            parse_ranking(label, letters, "f:row 0")


def test_editscore_bench_macro_average_per_dimension(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    row = lambda n, first, second, task, dimension: dict(  # noqa: E731
        key=[f"{n}a", f"{n}b"],
        instruction="x",
        input_image=ref(0),
        output_images=[ref(first), ref(second)],
        task_type=task,
        dimension=dimension,
    )
    rows = [
        row(1, 200, 100, "color", "overall"),
        row(2, 100, 200, "color", "overall"),
        row(3, 50, 40, "remove", "overall"),
        row(4, 10, 10, "color", "consistency"),
    ]
    (tmp_path / "es.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run("editscore", tmp_path / "es.jsonl")
    check(
        result, {"overall/macro_accuracy": (0.5 + 1.0) / 2, "overall/color": 0.5, "consistency/macro_accuracy": 0.0}
    )  # a score tie is wrong


def mmrb2_pair(ref, i, sources, a, b, chosen):
    """One pair of MMRB2's benchmark/edit.json: the prompt's images first, then its text."""
    return {
        "id": f"src_{i}",
        "response_a": {"model_name": "m1", "response_content": [["image", ref(a)]]},
        "response_b": {"model_name": "m2", "response_content": [["image", ref(b)]]},
        "chosen": chosen,
        "human_annotations": [6, 6, 5],
        "prompt_source": "src",
        "prompt_metadata": {"id": i},
        "prompt_content": [*(["image", ref(s)] for s in sources), ["text", "make it brighter"]],
    }


def test_mmrb2_both_orders_and_the_multi_image_split(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    pairs = [
        mmrb2_pair(ref, 1, [0], 200, 100, "A"),  # right twice
        mmrb2_pair(ref, 2, [0], 200, 100, "B"),  # wrong twice
        mmrb2_pair(ref, 3, [0, 5], 50, 50, "A"),  # a score tie: wrong in both orders
        mmrb2_pair(ref, 4, [0, 5, 9], 60, 90, "B"),  # right twice
    ]
    (tmp_path / "edit.json").write_text(json.dumps({"pairs": pairs}))
    comparisons, _ = load_benchmark("mmrb2", tmp_path / "edit.json", progress=False)
    assert comparisons[0].instruction == "make it brighter"
    assert [len(c.source) for c in comparisons[2:]] == [2, 3]  # every prompt image is a source image
    check(
        run("mmrb2", tmp_path / "edit.json"),
        {
            "accuracy": 4 / 8,
            "single-image/accuracy": 2 / 4,
            "single-image/pairs": 2,
            "multi-image/accuracy": 2 / 4,
            "multi-image/pairs": 2,
        },
    )


def test_genai_bench_with_and_without_ties(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    row = lambda a, b, vote: dict(
        instruct_prompt="x", source_image=ref(0), left_output_image=ref(a), right_output_image=ref(b), vote_type=vote
    )  # noqa: E731
    rows = [
        row(200, 100, "leftvote"),
        row(200, 100, "rightvote"),
        row(120, 121, "tievote"),
        row(30, 90, "bothbad_vote"),
    ]
    (tmp_path / "genai.json").write_text(json.dumps(rows))
    check(
        run("genai", tmp_path / "genai.json"),
        {"accuracy_no_ties": 0.5, "accuracy_tie_calibrated": 0.75, "tie_eps": 60.0},
    )


def test_shapeedit_rows_follow_the_training_loaders_rule(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    row = lambda a, b, **kw: {
        "prompt": "x",
        "path_src": ref(0),
        "path1": ref(a),
        "path2": ref(b),
        "model2": "wrong_color",
        **kw,
    }  # noqa: E731
    (tmp_path / "s.json").write_text(json.dumps([row(200, 100), row(100, 200), row(50, 60, tie_case=True)]))
    check(run("shapeedit", tmp_path / "s.json"), {"accuracy": 0.5, "strict_pairs": 2, "vs_wrong_color/accuracy": 0.5})
    for flag in ("false", "maybe"):  # a string is no tie flag: refused here as in load_pairs
        (tmp_path / "s.json").write_text(json.dumps([row(200, 100), row(100, 200, tie_case=flag)]))
        with pytest.raises(DataError, match=rf"s.json:row 1: field 'tie_case' should be bool, got str '{flag}'"):
            load_benchmark("shapeedit", tmp_path / "s.json", progress=False)


def test_tie_calibration_thresholds_and_empty_input():
    assert tie_calibrated_accuracy(np.array([1.0, -2.0, 3.0]), np.array([1, -1, 1])) == (1.0, 0.0)
    assert tie_calibrated_accuracy(np.array([0.0, 2.0]), np.array([0, 1])) == (
        1.0,
        0.0,
    )  # a zero gap is a predicted tie
    acc, eps = tie_calibrated_accuracy(np.array([]), np.array([]))
    assert np.isnan(acc) and np.isnan(eps)  # no comparison: no figure (never a -1 sentinel)


def test_mmrb2_scores_every_source_image_of_a_multi_image_prompt(tmp_path):
    from reward.model import JRM, JRMArgs

    rng = np.random.default_rng(0)

    def noise(name: str) -> str:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
        return name

    for name in ("first", "edit_a", "edit_b", "second_1", "second_2"):
        noise(f"{name}.png")

    def bench(second: str) -> list:
        pair = lambda i, sources: {  # noqa: E731
            "id": f"p{i}",
            "chosen": "A",
            "prompt_content": [
                *(["image", s] for s in sources),
                ["text", "put the second image's object in the first"],
            ],
            "response_a": {"model_name": "m1", "response_content": [["image", "edit_a.png"]]},
            "response_b": {"model_name": "m2", "response_content": [["image", "edit_b.png"]]},
        }
        (tmp_path / "edit.json").write_text(
            json.dumps({"pairs": [pair(0, ["first.png"]), pair(1, ["first.png", second])]})
        )
        return load_benchmark("mmrb2", tmp_path / "edit.json", progress=False)[0]

    model = JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2), seed=0)
    one, _, _ = score_comparisons(model, bench("second_1.png"), batch_size=4)
    two, _, _ = score_comparisons(model, bench("second_2.png"), batch_size=4)
    assert one[0] == pytest.approx(two[0], abs=1e-6)  # the single-image pair does not see the change
    assert abs(one[1] - two[1]) > 1e-6  # the multi-image pair does: its second source image is scored
