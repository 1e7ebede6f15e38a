"""evaluate.py on small fixtures of every benchmark format: accuracies equal the ones computed by hand."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward.benchmarks import load_benchmark, summarise, tie_calibrated_accuracy
from reward.data import DataError
from reward.evaluate import effective_rank, main as evaluate_main, score_comparisons
from reward.shapeedit import GenerateConfig, generate


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


def run(kind, path):
    comparisons, skipped = load_benchmark(kind, path)
    diffs, kept, _, _, _ = score_comparisons(Brightness(), comparisons, batch_size=4, skip_bad=False)
    return summarise(kind, [comparisons[i] for i in kept], diffs)


def tiger_rows(ref):
    row = lambda id_, a, b, ranking, dataset, ctype="AvsB": dict(  # noqa: E731
        id=id_, instruction="edit", source_image=ref(0), candidate_1=ref(a), candidate_2=ref(b),
        ranking=ranking, dataset=dataset, comparison_type=ctype,
    )
    return [
        row("g1_0", 200, 100, "A>B", "2pair"),  # right
        row("g2_0", 100, 200, "A>B", "2pair"),  # wrong
        row("g3_0", 150, 152, "A=B", "2pair"),  # tie: right once eps >= 2
        row("h1_0", 200, 100, "A>B", "3pair"),  # right
        row("h1_1", 200, 50, "A>C", "3pair", "AvsC"),  # right
        row("h1_2", 100, 50, "C>B", "3pair", "BvsC"),  # wrong: group h1 fails
        row("h2_0", 10, 20, "B>A", "3pair"),  # right: group h2 passes
    ]


def test_tiger_editreward_bench_json_and_parquet(tmp_path):
    rows = tiger_rows(lambda level: save(tmp_path, level))
    (tmp_path / "tiger.json").write_text(json.dumps(rows))
    expected = {"2pair/accuracy_tie_calibrated": 2 / 3, "2pair/tie_eps": 2.0, "3pair/accuracy": 3 / 4, "3pair/group_accuracy": 1 / 2}
    result = run("tiger", tmp_path / "tiger.json")
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key

    # The hub layout: parquet with embedded image bytes.
    import pyarrow as pa
    import pyarrow.parquet as pq

    def embedded(level):
        buffer = io.BytesIO()
        grey(level).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    pq.write_table(pa.Table.from_pylist(tiger_rows(embedded)), tmp_path / "tiger.parquet")
    hub = run("tiger", tmp_path / "tiger.parquet")
    for key, value in expected.items():
        assert hub[key] == pytest.approx(value), key


def test_editscore_bench_macro_average_per_dimension(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    rows = [
        dict(key="1", instruction="x", input_image=ref(0), output_images=[ref(200), ref(100)], task_type="color", dimension="overall"),
        dict(key="2", instruction="x", input_image=ref(0), output_images=[ref(100), ref(200)], task_type="color", dimension="overall"),
        dict(key="3", instruction="x", input_image=ref(0), output_images=[ref(50), ref(40)], task_type="remove", dimension="overall"),
        dict(key="4", instruction="x", input_image=ref(0), output_images=[ref(10), ref(10)], task_type="color", dimension="consistency"),
    ]
    (tmp_path / "es.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run("editscore", tmp_path / "es.jsonl")
    assert result["overall/macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["overall/color"] == pytest.approx(0.5)
    assert result["consistency/macro_accuracy"] == 0.0  # a score tie is wrong


def test_mmrb2_both_orders(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    pair = lambda i, a, b, chosen: {  # noqa: E731
        "id": str(i),
        "prompt_source": "x",
        "prompt_content": [["text", "make it"], ["image", ref(0)], ["text", "brighter"]],
        "response_a": {"model_name": "m1", "response_content": [["image", ref(a)]]},
        "response_b": {"model_name": "m2", "response_content": [["image", ref(b)]]},
        "chosen": chosen,
    }
    data = {"pairs": [pair(1, 200, 100, "A"), pair(2, 200, 100, "B"), pair(3, 50, 50, "A")]}
    (tmp_path / "mmrb2.json").write_text(json.dumps(data))
    comparisons, _ = load_benchmark("mmrb2", tmp_path / "mmrb2.json")
    assert comparisons[0].instruction == "make it brighter"
    assert run("mmrb2", tmp_path / "mmrb2.json")["accuracy"] == pytest.approx(2 / 6)


def test_genai_bench_with_and_without_ties(tmp_path):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    row = lambda a, b, vote: dict(instruct_prompt="x", source_image=ref(0), left_output_image=ref(a), right_output_image=ref(b), vote_type=vote)  # noqa: E731
    rows = [row(200, 100, "leftvote"), row(200, 100, "rightvote"), row(120, 121, "tievote"), row(30, 90, "bothbad_vote")]
    (tmp_path / "genai.json").write_text(json.dumps(rows))
    result = run("genai", tmp_path / "genai.json")
    assert result["accuracy_no_ties"] == pytest.approx(0.5)
    assert result["accuracy_tie_calibrated"] == pytest.approx(0.75)
    assert result["tie_eps"] == pytest.approx(60.0)


def test_tie_calibration_never_predicts_ties_when_none_help():
    acc, eps = tie_calibrated_accuracy(np.array([1.0, -2.0, 3.0]), np.array([1, -1, 1]))
    assert (acc, eps) == (1.0, -1.0)


def test_bad_rows_and_images_stop_with_row_and_file_or_are_skipped(tmp_path):
    rows = tiger_rows(lambda level: save(tmp_path, level))
    rows[1]["candidate_2"] = "missing.png"
    del rows[2]["ranking"]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"t.json:row 2: missing field 'ranking'"):
        load_benchmark("tiger", tmp_path / "t.json")
    comparisons, skipped_rows = load_benchmark("tiger", tmp_path / "t.json", skip_bad=True)
    assert skipped_rows == 1 and len(comparisons) == 6
    with pytest.raises(DataError, match=r"t.json:row 1: image file .*missing.png does not exist"):
        score_comparisons(Brightness(), comparisons, 4, skip_bad=False)
    diffs, kept, skipped, _, _ = score_comparisons(Brightness(), comparisons, 4, skip_bad=True)
    assert skipped == 1 and len(kept) == 5
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows[0]["candidate_1"] = "broken.png"
    (tmp_path / "t2.json").write_text(json.dumps(rows[:1]))
    rows[0]["comparison_type"] = "AvsBvsC"
    (tmp_path / "t3.json").write_text(json.dumps(rows[:1]))
    with pytest.raises(DataError, match=r"t3.json:row 0: comparison_type 'AvsBvsC'"):
        load_benchmark("tiger", tmp_path / "t3.json")
    (tmp_path / "t4.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"t4.jsonl:line 2: not valid json"):
        load_benchmark("genai", tmp_path / "t4.jsonl")
    rows[0]["comparison_type"] = "AvsB"
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        score_comparisons(Brightness(), load_benchmark("tiger", tmp_path / "t2.json")[0], 4, skip_bad=False)


def test_effective_rank_closed_forms():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 8))
    equal = q * 3.0  # 8 equal singular values (after centring, nearly)
    assert effective_rank(equal - equal.mean(0)) == pytest.approx(8.0, rel=0.05)
    rank_one = torch.randn(64, 1) @ torch.randn(1, 8)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(rank_one, power=2) == pytest.approx(1.0, abs=1e-3)
    # Singular values (3, 1): p = (3/4, 1/4) with power 1, (9/10, 1/10) with power 2.
    a = torch.randn(64, 2)
    u, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal columns that sum to zero: centring keeps them
    v, _ = torch.linalg.qr(torch.randn(8, 2))
    two = u @ torch.diag(torch.tensor([3.0, 1.0])) @ v.T
    entropy = lambda p: -sum(x * np.log(x) for x in p)  # noqa: E731
    assert effective_rank(two) == pytest.approx(np.exp(entropy([0.75, 0.25])), rel=1e-6)
    assert effective_rank(two, power=2) == pytest.approx(np.exp(entropy([0.9, 0.1])), rel=1e-6)
    assert effective_rank(equal - equal.mean(0), power=2) == pytest.approx(8.0, rel=0.05)


def test_cli_with_the_oracle_reward_on_shapeedit(tmp_path):
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=60, seed=1), progress=False)
    code = evaluate_main(
        ["--reward", f"oracle:{data}", "--benchmark", f"shapeedit:{data / 'train.json'}", "--out", str(tmp_path / "out")]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results[0]["accuracy"] == 1.0  # the oracle made the labels
    assert "| oracle:" in (tmp_path / "out" / "results.md").read_text()
    assert evaluate_main(["--reward", "oracle:" + str(data), "--benchmark", "nope:x", "--out", str(tmp_path / "o2")]) == 2
    erank_needs_jrm = ["--reward", f"oracle:{data}", "--erank", "--benchmark", f"shapeedit:{data / 'train.json'}", "--out", str(tmp_path / "o3")]
    assert evaluate_main(erank_needs_jrm) == 2
