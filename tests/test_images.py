import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crystalscope.data import images
from crystalscope.data.images import FormatMismatchWarning, ImageLoadError, load_gray, load_image


def test_real_samples_load_as_rgb_with_equal_channels(samples: Path) -> None:
    for path in samples.glob("*.png"):
        image = load_image(path)
        assert image.mode == "RGB"
        array = np.asarray(image)
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
        assert load_gray(path).shape == (image.height, image.width)


@pytest.mark.parametrize(("mode", "expected"), [
    ("L", "L"), ("LA", "L"), ("P", "RGB"), ("RGB", "RGB"), ("RGBA", "RGB"), ("CMYK", "RGB"),
    ("I;16", "L"), ("1", "L"),
])
def test_modes_become_8bit(tmp_path: Path, mode: str, expected: str) -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        source = Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16))
        suffix = ".png"
    else:
        source = base.convert(mode)
        suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"image{suffix}"
    source.save(path)
    loaded = load_image(path)
    assert loaded.mode == expected
    assert loaded.size == (30, 20)
    if mode == "I;16":  # scaled by the bit depth: 65535 -> 255
        expected_array = (np.asarray(source, dtype=np.float64) / 257).round()
        assert np.array_equal(np.asarray(loaded), expected_array)


def test_16bit_images_scale_by_bit_depth_not_by_their_own_range(tmp_path: Path) -> None:
    crystal = np.full((16, 16), 20000, np.uint16)
    crystal[4:12, 4:12] = 30000
    bright = crystal.copy()
    bright[0, 0] = 65535  # a glint elsewhere in the frame must not change the crystal's pixels
    inputs = []
    for name, array in (("plain", crystal), ("glint", bright)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        inputs.append(np.asarray(load_image(tmp_path / f"{name}.png")))
    assert np.array_equal(inputs[0][4:12, 4:12], inputs[1][4:12, 4:12])
    assert inputs[0][5, 5] == round(30000 / 257)


def test_float_images_outside_a_fixed_window_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), -3.5, np.float32), mode="F").save(path)
    with pytest.raises(ImageLoadError, match="no fixed bit depth"):
        load_image(path)
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(path)
    assert np.asarray(load_image(path))[0, 0] == 128


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("L", (40, 20), 0)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_jpeg_named_png_is_read_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "actually_jpeg.png"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(path, format="JPEG")
    with pytest.warns(FormatMismatchWarning, match="content is JPEG"):
        image = load_image(path)
    assert image.size == (16, 16)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_formats_read_by_content(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("L", (8, 9), 200).save(path, format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (8, 9)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
        buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    cases = {empty: "empty", text: "not an image", truncated: "truncated",
             tmp_path / "missing.png": "no such file"}
    for path, words in cases.items():
        with pytest.raises(ImageLoadError, match=words) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL's own bomb check
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)
