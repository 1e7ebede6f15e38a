"""policies/images.py: tensors of images and batch checks (to_rgb, a tagged copy of reward.data.to_rgb, is
checked by tests/test_copies.py)."""

import numpy as np
import pytest
from PIL import Image

from policies.images import check_batch, images_to_tensor, tensor_to_images


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
