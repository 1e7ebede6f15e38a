"""rl/prompts.py: both formats, clear errors, and a step's prompts depend on the step alone."""

import json

import pytest
from PIL import Image

from reward.data import DataError
from rl.prompts import load_prompts, prompts_for_step


def test_formats_and_errors(tmp_path):
    Image.new("RGBA", (10, 12), (1, 2, 3, 255)).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"source": "a.png", "instruction": "make it red"}) + "\n\n")
    (tmp_path / "q.json").write_text(json.dumps([{"path_src": "a.png", "instruction": "x", "scene": {}}]))
    p, _ = load_prompts(tmp_path / "p.jsonl", 8, 8)
    assert p[0].source.size == (8, 8) and p[0].source.mode == "RGB" and p[0].instruction == "make it red"
    assert load_prompts(tmp_path / "q.json", 12, 10)[0][0].source.size == (10, 12)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"source": "a.png"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl row 0: needs a non-empty 'instruction'"):
        load_prompts(tmp_path / "bad.jsonl", 8, 8)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"source": "nope.png", "instruction": "x"}) + "\n")
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", 8, 8)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_prompts(tmp_path / "broken.json", 8, 8)


def test_prompt_order_is_a_function_of_the_step():
    stream = [i for step in range(5) for i in prompts_for_step(7, step, 3, seed=1)]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))  # epochs are permutations
    assert prompts_for_step(7, 3, 3, seed=1) == stream[9:12]
    assert prompts_for_step(7, 0, 3, seed=2) != prompts_for_step(7, 0, 3, seed=1)
