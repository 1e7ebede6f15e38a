"""evaluate.py end to end: every row checked before any scoring, bad rows named or skipped and counted by kind,
nothing written on a bad input, no sentinel figures; and the effective rank's closed forms."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from reward.benchmarks import load_benchmark
from reward.data import DataError
from reward.evaluate import effective_rank, score_comparisons
from reward.evaluate import main as evaluate_main
from reward.model import JRM, JRMArgs
from reward.shapeedit import GenerateConfig, generate


class Brightness:
    """A transparent reward for fixtures: the mean pixel value of the edited image."""

    def score(self, source_images, instructions, edited_images, batch_size=0):
        return torch.tensor([float(np.asarray(e).mean()) for e in edited_images])


def save(tmp_path, level: int, size=(8, 8)) -> str:
    name = f"g{level}_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (level,) * 3).save(tmp_path / name)
    return name


def genai_rows(tmp_path, n=3):
    ref = lambda level: save(tmp_path, level)  # noqa: E731
    return [
        dict(
            instruct_prompt="make it brighter",
            source_image=ref(0),
            left_output_image=ref(200),
            right_output_image=ref(100),
            vote_type="leftvote",
        )
        for _ in range(n)
    ]


def test_bad_rows_stop_with_file_row_and_key_or_are_skipped_by_kind(tmp_path):
    rows = genai_rows(tmp_path, 7)
    rows[1]["right_output_image"] = "missing.png"
    del rows[2]["vote_type"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows[3]["left_output_image"] = "broken.png"
    rows[4]["source_image"] = save(tmp_path, 9, size=(2000, 4))  # aspect ratio 500: Qwen-VL's processor refuses it
    rows[5]["instruct_prompt"] = "   "
    rows[6]["vote_type"] = "maybe"
    (tmp_path / "g.json").write_text(json.dumps(rows))
    for n, message in [  # each bad row after a good one: the message names it as row 1
        (1, r"g.json:row 1: right_output_image: image file .*missing.png does not exist"),
        (2, r"g.json:row 1: missing field 'vote_type'"),
        (3, r"g.json:row 1: left_output_image: cannot read image .*broken.png"),
        (4, r"g.json:row 1: source_image: the image is 2000x4 pixels: an aspect ratio over 200"),
        (5, r"g.json:row 1: field 'instruct_prompt' is empty"),
        (6, r"g.json:row 1: vote_type 'maybe' is not one of"),
    ]:
        (tmp_path / "g.json").write_text(json.dumps([rows[0], rows[n]]))
        with pytest.raises(DataError, match=message):
            load_benchmark("genai", tmp_path / "g.json", progress=False)
    (tmp_path / "g.json").write_text(json.dumps(rows))
    comparisons, skipped = load_benchmark("genai", tmp_path / "g.json", skip_bad=True, progress=False)
    assert len(comparisons) == 1
    assert skipped == {
        "missing image": 1,
        "missing field": 1,
        "unreadable image": 1,
        "image geometry": 1,
        "empty instruction": 1,
        "bad label": 1,
    }
    assert len(load_benchmark("genai", tmp_path / "g.json", skip_bad=True, limit=1, progress=False)[0]) == 1
    (tmp_path / "t4.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"t4.jsonl:line 2: not valid json"):
        load_benchmark("genai", tmp_path / "t4.jsonl")


@pytest.fixture(scope="module")
def tiny_jrm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("jrm")
    JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2, max_instruction_tokens=32), seed=0).save_pretrained(path)
    return path


def test_an_overlong_instruction_is_found_before_scoring_with_file_and_row(tmp_path, tiny_jrm_path, capsys):
    rows = genai_rows(tmp_path)
    rows[1]["instruct_prompt"] = "make the circle red " * 40
    (tmp_path / "g.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    args = [
        "--reward",
        f"jrm:{tiny_jrm_path}",
        "--benchmark",
        f"genai:{tmp_path / 'g.json'}",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert (
        "error: " in err
        and "g.json:row 1: instruct_prompt has" in err
        and "more than model.max_instruction_tokens (32)" in err
    )
    assert "Traceback" not in err and not out.exists()
    assert evaluate_main(args + ["--skip-bad"]) == 0
    (result,) = json.loads((out / "results.json").read_text())
    assert result["comparisons"] == 2 and result["skipped_rows_by_kind"] == {"instruction refused by the model": 1}


def test_nothing_is_written_when_any_benchmark_is_bad(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(genai_rows(tmp_path)))
    bad = genai_rows(tmp_path)
    bad[2]["source_image"] = "gone.png"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=12, seed=1), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results")
    args = [
        "--reward",
        f"oracle:{data}",
        "--benchmark",
        f"genai:{tmp_path / 'good.json'}",
        "--benchmark",
        f"genai:{tmp_path / 'bad.json'}",
        "--out",
        str(out),
    ]
    assert evaluate_main(args) == 2
    assert (out / "results.json").read_text() == "earlier results"


def test_no_usable_comparison_gives_none_and_a_count_never_minus_one(tmp_path):
    rows = genai_rows(tmp_path, 2)
    for row in rows:
        row["vote_type"] = "sideways"
    (tmp_path / "g.json").write_text(json.dumps(rows))
    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=12, seed=1), progress=False)
    out = tmp_path / "out"
    assert (
        evaluate_main(
            [
                "--reward",
                f"oracle:{data}",
                "--benchmark",
                f"genai:{tmp_path / 'g.json'}",
                "--out",
                str(out),
                "--skip-bad",
            ]
        )
        == 0
    )
    text = (out / "results.json").read_text()
    (result,) = json.loads(text)
    assert result["comparisons"] == 0 and result["skipped_rows"] == 2
    assert (
        result["accuracy_tie_calibrated"] is None and result["accuracy_no_ties"] is None and result["tie_eps"] is None
    )
    assert (
        not re.search(r":\s*-1\b", text) and "NaN" not in text
    )  # a value, not the temporary path (".../pytest-123/...")
    assert "| accuracy_tie_calibrated | n/a |" in (out / "results.md").read_text()


def test_scores_do_not_depend_on_the_batch(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(genai_rows(tmp_path, 5)))
    comparisons, _ = load_benchmark("genai", tmp_path / "g.json", progress=False)
    one, _, _ = score_comparisons(Brightness(), comparisons, batch_size=1)
    four, _, _ = score_comparisons(Brightness(), comparisons, batch_size=4)
    assert np.array_equal(one, four) and (one == 100.0).all()


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
        [
            "--reward",
            f"oracle:{data}",
            "--benchmark",
            f"shapeedit:{data / 'train.json'}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results[0]["accuracy"] == 1.0  # the oracle made the labels
    assert "| oracle:" in (tmp_path / "out" / "results.md").read_text()
    assert (
        evaluate_main(["--reward", "oracle:" + str(data), "--benchmark", "nope:x", "--out", str(tmp_path / "o2")]) == 2
    )
    erank_needs_jrm = [
        "--reward",
        f"oracle:{data}",
        "--erank",
        "--benchmark",
        f"shapeedit:{data / 'train.json'}",
        "--out",
        str(tmp_path / "o3"),
    ]
    assert evaluate_main(erank_needs_jrm) == 2
