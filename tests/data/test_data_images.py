"""load_rgb: mode conversions with exact pixel values, EXIF orientation, and broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import BadImageError, load_rgb, to_rgb


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def _close(actual, expected, tol=1):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def test_rgb_png_round_trip(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (3, 2), (10, 20, 30)).save(path)
    img = load_rgb(path)
    assert img.size == (3, 2) and _pixel(img) == (10, 20, 30)


def test_greyscale_l_and_1(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert _pixel(load_rgb(tmp_path / "l.png")) == (77, 77, 77)
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    img = load_rgb(tmp_path / "bw.png")
    assert _pixel(img, (0, 0)) == (0, 0, 0) and _pixel(img, (1, 0)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)  # index 0 black, 1 dark red
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = load_rgb(tmp_path / "p.png")
    assert _pixel(out, (0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert _pixel(out, (1, 0)) == (200, 10, 10)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (1, 1), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0, 0, 0] * 254)
    img.save(tmp_path / "p.png")
    assert _pixel(load_rgb(tmp_path / "p.png")) == (12, 34, 56)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 128))
    img.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    img.save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png")
    # 128/255 red over white: 255 * (1 - 128/255) = 127 for green and blue
    assert _close(_pixel(out, (0, 0)), (255, 127, 127))
    assert _pixel(out, (1, 0)) == (255, 255, 255)


def test_premultiplied_rgba_and_la(tmp_path):
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (0, 0))
    la.save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png")
    assert _pixel(out, (0, 0)) == (100, 100, 100)
    assert _pixel(out, (1, 0)) == (255, 255, 255)
    rgba_pre = Image.new("RGBA", (1, 1), (0, 0, 0, 0)).convert("RGBa")
    assert _pixel(to_rgb(rgba_pre)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "g16.png")
    out = load_rgb(tmp_path / "g16.png")
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 1]
    for mode in ("I;16B", "I;16L"):
        assert _pixel(to_rgb(img.convert("I").convert(mode)), (1, 0)) == (128, 128, 128)


def test_32_bit_integer_and_float_greyscale():
    as_int = Image.fromarray(np.array([[70000, 32768, -5]], dtype=np.int32))
    assert as_int.mode == "I"
    assert [to_rgb(as_int).getpixel((x, 0))[0] for x in range(3)] == [255, 128, 0]
    as_float = Image.fromarray(np.array([[-3.0, 300.0, 99.6]], dtype=np.float32))
    assert as_float.mode == "F"
    assert [to_rgb(as_float).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 100]


def test_cmyk_and_other_colour_spaces(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert _pixel(load_rgb(tmp_path / "cmyk.tif")) == (255, 0, 0)
    ycbcr = Image.new("RGB", (1, 1), (0, 0, 255)).convert("YCbCr")
    assert _close(_pixel(to_rgb(ycbcr)), (0, 0, 255), tol=3)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "rotated.jpg")
    assert out.size == (20, 40)
    top, bottom = _pixel(out, (10, 5)), _pixel(out, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _noise_image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


_HALF_PNG = len(_noise_image_bytes("PNG")) // 2
_HALF_JPEG = len(_noise_image_bytes("JPEG")) // 2


@pytest.mark.parametrize(
    ("name", "content", "reason_word"),
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"this is a text file, not a PNG\n", "identify"),
        ("noise.jpg", np.random.default_rng(1).bytes(4096), "identify"),
        ("cut.png", _noise_image_bytes("PNG")[:_HALF_PNG], "decode"),
        ("cut.jpg", _noise_image_bytes("JPEG")[:_HALF_JPEG], "decode"),
    ],
)
def test_broken_files_raise_bad_image_error(tmp_path, name, content, reason_word):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert reason_word in info.value.reason
    assert isinstance(info.value, ValueError)


def test_intact_noise_images_load(tmp_path):
    # the counterpart of the truncation cases above: the full bytes decode fine
    for fmt, name in (("PNG", "ok.png"), ("JPEG", "ok.jpg")):
        (tmp_path / name).write_bytes(_noise_image_bytes(fmt))
        assert load_rgb(tmp_path / name).size == (64, 64)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        load_rgb(tmp_path / "nope.png")
    with pytest.raises(BadImageError, match="not a regular file"):
        load_rgb(tmp_path)
