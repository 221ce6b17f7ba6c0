"""util.image_io: every Pillow mode becomes the 8-bit RGB its docstring promises, or a UserError naming the file."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from PIL import Image

from util.errors import UserError
from util.image_io import read_rgb_image, to_rgb

SIXTEEN_BIT_GRADIENT = np.linspace(0, 65535, 8 * 32).round().astype(np.uint16).reshape(8, 32)


def _expected_grey(values: np.ndarray) -> np.ndarray:
    """(H, W) 16-bit values -> (H, W, 3) uint8, computed independently of the module: float scaling, rounding."""
    grey = np.rint(values.astype(np.float64) / 65535 * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def test_sixteen_bit_png_gradient_comes_out_as_a_gradient(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(SIXTEEN_BIT_GRADIENT).save(path)
    assert Image.open(path).mode == "I;16"  # what Pillow makes of a 16-bit grey PNG
    pixels = np.asarray(read_rgb_image(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 32, 3)
    np.testing.assert_array_equal(pixels, _expected_grey(SIXTEEN_BIT_GRADIENT))
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_every_sixteen_bit_value_of_either_byte_order_scales_like_float_rounding(mode, dtype):
    every_value = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = Image.frombytes(mode, (256, 256), every_value.astype(dtype).tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), _expected_grey(every_value))


def test_thirty_two_bit_integer_tiff_within_sixteen_bits_scales_like_sixteen_bits(tmp_path):
    path = tmp_path / "int.tiff"
    Image.fromarray(SIXTEEN_BIT_GRADIENT.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(np.asarray(read_rgb_image(path)), _expected_grey(SIXTEEN_BIT_GRADIENT))


def test_thirty_two_bit_integer_outside_sixteen_bits_is_refused_by_name(tmp_path):
    path = tmp_path / "wide.tiff"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(UserError, match=re.escape(f"cannot read image {path}: integer pixels range over")):
        read_rgb_image(path)


def test_float_image_is_refused_by_name(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(UserError, match=re.escape(f"cannot read image {path}: 32-bit float pixels")):
        read_rgb_image(path)


def test_rgba_is_composited_over_white(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(read_rgb_image(path)).astype(int)
    assert pixels[0, 0].tolist() == [200, 100, 0]  # opaque: as stored
    assert pixels[0, 1].tolist() == [255, 255, 255]  # transparent: the background, not the stored colour
    np.testing.assert_allclose(pixels[0, 2], [127, 127, 127], atol=1)  # half black over white


def test_grey_with_alpha_is_composited_over_white():
    image = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    assert np.asarray(to_rgb(image)).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_palette_with_a_transparent_colour_is_composited_without_a_warning(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 90, 80, 70] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(path, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = np.asarray(read_rgb_image(path))
    assert pixels.tolist() == [[[255, 255, 255], [90, 80, 70]]]


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("P", 0, (0, 0, 0)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # magenta and yellow ink make red
        ("YCbCr", (128, 128, 128), (128, 128, 128)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_other_modes_use_pillows_conversion(mode, colour, expected):
    assert to_rgb(Image.new(mode, (2, 2), colour)).getpixel((1, 1)) == expected


def test_unknown_mode_is_refused_by_name():
    image = Image.new("RGB", (1, 1))
    image._mode = "XYZ"  # no Pillow decoder produces it; stands for any mode this module does not know
    with pytest.raises(UserError, match="cannot read image photo.xyz: Pillow mode 'XYZ' is not supported"):
        to_rgb(image, "photo.xyz")


def test_first_frame_of_an_animation_is_read(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert read_rgb_image(path).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("content", [b"this is not an image", None], ids=["garbage", "truncated"])
def test_broken_files_raise_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"cannot read image {path}: ")):
        read_rgb_image(path)


def test_missing_file_raises_user_error_naming_the_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(UserError, match=re.escape(f"cannot read image {path}: the file does not exist")):
        read_rgb_image(path)
