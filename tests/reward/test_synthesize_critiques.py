"""reward/synthesize_critiques.py: the teacher spread over GPUs writes what it writes in one piece."""

import numpy as np
import pytest
import torch
from PIL import Image

from reward.backbone import build_tiny
from reward.synthesize_critiques import Teacher, spread_over_gpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the Teacher spreads itself when it loads")
def test_a_spread_teacher_writes_the_same_critiques(tmp_path):
    """Without a GPU the map puts every block on the CPU, but accelerate's balanced map and dispatch still run on
    the real model class (its no-split blocks, the KV cache kept out of the hooks' moves)."""
    backbone, processor = build_tiny("qwen2_vl", hidden=64, layers=2)
    backbone.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    teacher = Teacher(str(tmp_path), max_new_tokens=6)
    rng = np.random.default_rng(0)
    source, edited = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    jobs = [(source, edited, "make the circle red", 3.0, 4.0), (edited, source, "remove the square", 1.0, 2.0)]
    whole = teacher.critique(jobs)
    teacher.model = spread_over_gpus(teacher.model)
    assert {p.device.type for p in teacher.model.parameters()} == {"cpu"}
    assert teacher.critique(jobs) == whole and all(whole)
