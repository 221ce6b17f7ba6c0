"""util.draw: boxes land where the detections say, on an enlarged copy of small images."""

from __future__ import annotations

from PIL import Image

from util.draw import class_name, draw_detections


def test_small_image_is_enlarged_and_the_box_outline_is_drawn_at_the_scaled_place():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    drawn = draw_detections(image, [[8.0, 8.0, 24.0, 24.0]], [0], [0.9], {0: "circle"}, min_side=128)
    assert drawn.size == (256, 128) and image.getpixel((8, 8)) == (0, 0, 0)
    assert drawn.getpixel((96, 80)) != (0, 0, 0)  # right edge of the box, x1 = 24 * 4
    assert drawn.getpixel((60, 64)) == (0, 0, 0)  # inside the box, away from edges and caption


def test_class_names_fall_back_to_the_label():
    assert class_name({1: "circle"}, 1) == "circle" and class_name({1: "circle"}, 7) == "class 7"
    assert class_name(None, 2) == "class 2"
