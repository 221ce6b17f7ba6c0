"""util.draw: boxes land where the detections say, on an enlarged copy of small images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from util.draw import FILLS_LABELS, PALETTE, class_name, draw_detections


def test_small_image_is_enlarged_and_the_box_outline_is_drawn_at_the_scaled_place():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    drawn = draw_detections(image, [[8.0, 8.0, 24.0, 24.0]], [0], [0.9], {0: "circle"}, min_side=128)
    assert drawn.size == (256, 128) and image.getpixel((8, 8)) == (0, 0, 0)
    assert drawn.getpixel((96, 80)) != (0, 0, 0)  # right edge of the box, x1 = 24 * 4
    assert drawn.getpixel((60, 64)) == (0, 0, 0)  # inside the box, away from edges and caption


def test_class_names_fall_back_to_the_label():
    assert class_name({1: "circle"}, 1) == "circle" and class_name({1: "circle"}, 7) == "class 7"
    assert class_name(None, 2) == "class 2"


@pytest.mark.skipif(not FILLS_LABELS, reason="torchvision before 0.23 writes a caption without a background")
def test_caption_is_white_on_the_box_colour_inside_its_top_left_corner():
    image = Image.new("RGB", (512, 512), (0, 0, 0))
    drawn = np.asarray(draw_detections(image, [[100.0, 200.0, 400.0, 450.0]], [2], [0.5], {2: "square"}))
    colour = PALETTE[2]
    caption = drawn[206:222, 106:190].reshape(-1, 3)  # inside the 3-pixel outline, where a 16-pixel font writes
    filled = (caption == colour).all(1).mean()
    text = (caption > 200).all(1).mean()  # white, antialiased
    assert filled > 0.4 and text > 0.05, (filled, text)
    assert (drawn[150:198, 100:400] == 0).all()  # nothing above the box


def test_sixteen_bit_grey_image_is_drawn_as_its_gradient():
    gradient = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(1, 512).repeat(512, 0)
    drawn = np.asarray(draw_detections(Image.fromarray(gradient), [[0.0, 400.0, 10.0, 410.0]], [0], [0.9]))
    np.testing.assert_array_equal(drawn[100, :, 0], np.rint(gradient[100] / 65535 * 255).astype(np.uint8))


def test_no_detections_give_the_enlarged_image_without_a_warning():
    image = Image.new("L", (32, 16), 90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = draw_detections(image, [], [], [], min_side=64)
    assert drawn.size == (128, 64) and drawn.mode == "RGB" and drawn.getpixel((5, 5)) == (90, 90, 90)
