"""engine.prediction: images given on the command line are read like the training images."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from engine.prediction import load_image
from util.errors import UserError


def test_sixteen_bit_grey_png_is_read_as_its_gradient(tmp_path):
    gradient = np.linspace(0, 65535, 4 * 64).round().astype(np.uint16).reshape(4, 64)
    Image.fromarray(gradient).save(tmp_path / "depth.png")
    pixels = np.asarray(load_image(tmp_path / "depth.png"))
    np.testing.assert_array_equal(pixels[..., 0], np.rint(gradient / 65535 * 255).astype(np.uint8))
    assert (pixels == pixels[..., :1]).all()


def test_unreadable_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture")
    with pytest.raises(UserError, match=re.escape(f"cannot read image {path}")):
        load_image(path)
