"""decode_image: bad files give exact, short reasons; every mode becomes the right 8-bit RGB."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodprobe.data import DecodeError, decode_image
from oodprobe.data.decode import ALPHA_BACKGROUND, _to_rgb
from oodprobe.errors import DataError

from .conftest import encoded, solid

GREY = ALPHA_BACKGROUND[0]


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8
    return array


def decode_error(source: object, **options: object) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_image(source, **options)  # type: ignore[arg-type]
    assert isinstance(caught.value, DataError)
    return caught.value


# --- bad inputs -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    error = decode_error(path)
    assert str(error) == f"cannot decode {path}: file not found"
    assert (error.source, error.reason) == (str(path), "file not found")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert str(decode_error(path)) == f"cannot decode {path}: empty file"
    assert str(decode_error(b"")) == "cannot decode <bytes>: empty file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noisy), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert str(decode_error(path)) == f"cannot decode {path}: image file is truncated"


def test_text_file_renamed_to_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are notes, not pixels\n" * 20)
    assert str(decode_error(path)) == f"cannot decode {path}: not an image file"


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    assert decode_error(tmp_path).reason == "not an image file (a folder)"


def test_decompression_bomb_by_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    solid(size=(100, 60)).save(path)
    assert str(decode_error(path, max_pixels=5999)) == (
        f"cannot decode {path}: decompression bomb: 100x60 = 6000 pixels is more than "
        "max_pixels=5999"
    )
    assert decode_image(path, max_pixels=6000).size == (100, 60)


def test_pil_bomb_warning_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    solid(size=(100, 60)).save(path)
    # Between PIL's limit and twice it PIL only warns; that must not let the image through.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    error = decode_error(path, max_pixels=10**9)
    assert error.reason.startswith("decompression bomb: ")
    assert "6000 pixels" in error.reason


def test_bytes_input_and_name() -> None:
    image = decode_image(encoded(solid((1, 2, 3)), "PNG"))
    assert rgb(image)[0, 0].tolist() == [1, 2, 3]
    error = decode_error(b"not an image", name="upload #3")
    assert str(error) == "cannot decode upload #3: not an image file"


# --- modes ---------------------------------------------------------------------------------------


def decode_saved(tmp_path: Path, image: Image.Image, name: str, **options: Any) -> np.ndarray:
    path = tmp_path / name
    image.save(path, **options)
    return rgb(decode_image(path))


def test_grey_l(tmp_path: Path) -> None:
    pixels = decode_saved(tmp_path, Image.new("L", (3, 2), 77), "grey.png")
    assert pixels.shape == (2, 3, 3)
    assert (pixels == 77).all()


def test_bilevel_1(tmp_path: Path) -> None:
    image = Image.new("1", (4, 1), 0)
    image.putpixel((2, 0), 1)
    pixels = decode_saved(tmp_path, image, "bits.png")
    assert pixels[0, :, 0].tolist() == [0, 0, 255, 0]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    pixels = decode_saved(tmp_path, image, "palette.png", transparency=0)
    assert pixels[0, 0].tolist() == [GREY] * 3  # transparent index → background
    assert pixels[0, 1].tolist() == [255, 0, 0]


def test_palette_gif_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    pixels = decode_saved(tmp_path, image, "palette.gif", transparency=0)
    assert pixels[0].tolist() == [[GREY] * 3, [0, 0, 255]]


def expected_over_grey(value: int, alpha: int) -> int:
    return round((value * alpha + GREY * (255 - alpha)) / 255)


def test_la_alpha_composited(tmp_path: Path) -> None:
    image = Image.new("LA", (3, 1))
    for x, alpha in enumerate((0, 128, 255)):
        image.putpixel((x, 0), (200, alpha))
    pixels = decode_saved(tmp_path, image, "la.png")
    for x, alpha in enumerate((0, 128, 255)):
        assert abs(int(pixels[0, x, 0]) - expected_over_grey(200, alpha)) <= 1
    assert pixels[0, 0].tolist() == [GREY] * 3
    assert pixels[0, 2].tolist() == [200] * 3


def test_rgba_alpha_composited(tmp_path: Path) -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    pixels = decode_saved(tmp_path, image, "rgba.png")
    assert pixels[0].tolist() == [[GREY] * 3, [255, 0, 0]]


def test_cmyk(tmp_path: Path) -> None:
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    pixels = decode_saved(tmp_path, image, "cmyk.tif")
    assert pixels[0].tolist() == [[255, 255, 255], [0, 255, 255]]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = decode_saved(tmp_path, image, "deep.png")
    # convert("RGB") would clip: 0, 255, 255, 255
    assert pixels[0, :, 1].tolist() == [0, 100, 255, 4]


def test_sixteen_bit_big_endian_and_pgm(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=">u2")
    big = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert rgb(_to_rgb(big, "x"))[0, :, 0].tolist() == [0, 100, 255, 4]
    path = tmp_path / "deep.pgm"
    path.write_bytes(b"P5\n4 1\n65535\n" + values.tobytes())
    with Image.open(path) as opened:
        assert opened.mode in {"I", "I;16", "I;16B"}
    assert rgb(decode_image(path))[0, :, 2].tolist() == [0, 100, 255, 4]


def test_float_and_ycbcr(tmp_path: Path) -> None:
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert decode_saved(tmp_path, floats, "float.tif")[0, :, 0].tolist() == [0, 128, 255]
    big_floats = Image.fromarray(np.array([[-3.0, 77.4, 300.0]], dtype=np.float32))
    assert rgb(_to_rgb(big_floats, "x"))[0, :, 0].tolist() == [0, 77, 255]
    ycbcr = Image.new("YCbCr", (1, 1), (128, 128, 128))
    assert rgb(_to_rgb(ycbcr, "x"))[0, 0].tolist() == [128, 128, 128]


def test_exif_orientation_swaps_dimensions(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "portrait.jpg"
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the stored image's left edge
    image.save(path, exif=exif, quality=95)
    upright = decode_image(path)
    assert upright.size == (20, 40)
    pixels = rgb(upright)
    # After a clockwise turn the left edge is at the top.
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 1] < 60
    assert pixels[37, 10].min() > 200


def test_first_frame_of_animation(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert rgb(decode_image(path))[0, 0].tolist() == [255, 0, 0]


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    solid().save(path)
    image = decode_image(path)
    path.unlink()  # decoded pixels must not depend on the (closed) file
    assert rgb(image).shape == (6, 8, 3)


def test_reasons_are_short_phrases(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    reason = decode_error(path).reason
    assert re.fullmatch(r"[a-z ]+", reason), reason
