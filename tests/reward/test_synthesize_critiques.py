"""reward/synthesize_critiques.py: a teacher loaded with a device map (as on GPUs) writes what it writes in one
piece."""

import numpy as np
import pytest
from PIL import Image

from reward.backbone import build_tiny, load_backbone
from reward.synthesize_critiques import Teacher


def test_a_teacher_loaded_with_a_device_map_writes_the_same_critiques(tmp_path):
    """device_map reaches from_pretrained (an unknown map would fail there); on a machine without GPUs "auto"
    keeps every block on the CPU, and the teacher writes exactly the critiques of one loaded plainly."""
    backbone, processor = build_tiny("qwen2_vl", hidden=64, layers=2)
    backbone.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    teacher = Teacher(str(tmp_path), max_new_tokens=6)
    rng = np.random.default_rng(0)
    source, edited = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    jobs = [(source, edited, "make the circle red", 3.0, 4.0), (edited, source, "remove the square", 1.0, 2.0)]
    plain = teacher.critique(jobs)
    teacher.model, _ = load_backbone(str(tmp_path), add_score_token=False, device_map="auto")
    assert {p.device.type for p in teacher.model.parameters()} == {"cpu"}
    assert teacher.critique(jobs) == plain and all(plain)


def test_an_unknown_device_map_is_refused(tmp_path):
    backbone, processor = build_tiny("qwen2_vl", hidden=64, layers=2)
    backbone.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises((ValueError, RuntimeError)):
        load_backbone(str(tmp_path), device_map="nowhere")
