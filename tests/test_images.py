"""Images out of a model: uint8 quantisation and grids a person can see."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images


def test_to_uint8_rounds_to_the_grid_and_clips():
    x = np.array([-1.5, -1.0, -1.0 + 1 / 127.5, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(images.to_uint8(x).ravel(), [0, 0, 1, 128, 255, 255])


def test_small_images_are_enlarged_by_an_integer_factor_to_a_visible_grid(tmp_path):
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8)
    grid = images.image_grid(digits)  # 8×8 digits of 16 px: enlarged to >= 512 px across.
    assert grid.shape[1] >= images.MIN_GRID_WIDTH and grid.shape[0] == grid.shape[1]
    k = (grid.shape[1] - 9 * 2) // (8 * 16)
    assert k >= 4 and grid.shape[1] == 8 * 16 * k + 9 * 2
    # Every source pixel is a k×k block of the grid (nearest neighbour), the padding white.
    first = grid[2 : 2 + 16 * k, 2 : 2 + 16 * k]
    np.testing.assert_array_equal(first, digits[0].repeat(k, 0).repeat(k, 1))
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    path = tmp_path / "grid.png"
    images.save_png(str(path), grid)
    with Image.open(path) as im:
        assert im.size == (grid.shape[1], grid.shape[0]) and im.mode == "L"


def test_large_images_are_left_at_their_size():
    big = np.zeros((4, 300, 300, 3), np.uint8)
    assert images.image_grid(big).shape == (2 * 302 + 2, 2 * 302 + 2, 3)


def test_a_grid_needs_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        images.image_grid(np.zeros((2, 4, 4, 1), np.float32))
