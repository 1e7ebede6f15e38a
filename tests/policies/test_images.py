"""policies/images.py: explicit conversion of every PIL mode, identical to the reward side's, and batch checks."""

import numpy as np
import pytest
from PIL import Image

from policies.images import check_batch, images_to_tensor, tensor_to_images, to_rgb
from reward.data import to_rgb as reward_to_rgb

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_agrees_with_the_reward_side(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).convert(mode)
    ours = to_rgb(image)
    assert ours.mode == "RGB" and ours.size == (7, 6)
    assert np.array_equal(np.asarray(ours), np.asarray(reward_to_rgb(image)))


def test_tensor_round_trip():
    images = [Image.new("RGBA", (5, 4), (10, 20, 30, 255)), Image.new("L", (5, 4), 77)]
    x = images_to_tensor(images)
    assert x.shape == (2, 3, 4, 5)
    back = tensor_to_images(x)
    assert np.asarray(back[0])[0, 0].tolist() == [10, 20, 30] and np.asarray(back[1])[0, 0].tolist() == [77, 77, 77]


def test_bad_batches_are_refused():
    ok = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2 source images but 1 instructions"):
        check_batch([ok, ok], ["a"], 8, 8)
    with pytest.raises(ValueError, match=r"source_images\[1\] is 9x8 but this policy edits 8x8"):
        check_batch([ok, Image.new("RGB", (9, 8))], ["a", "b"], 8, 8)
    with pytest.raises(ValueError, match=r"instructions\[0\] is empty"):
        check_batch([ok], ["  "], 8, 8)
    with pytest.raises(ValueError, match="empty batch"):
        check_batch([], [], 8, 8)
    with pytest.raises(TypeError, match="not a PIL image"):
        check_batch([np.zeros((8, 8, 3))], ["a"], 8, 8)
