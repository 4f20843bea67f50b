"""Safe image loading, shared by every stage.

One function, :func:`load_image`, reads a file by its content (not its name), refuses
decompression bombs, applies the EXIF orientation and returns an 8-bit ``L`` or ``RGB`` image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Crops are a few hundred pixels; a full probe frame a few megapixels. 64 MP is generous and
# still refuses decompression bombs (PIL's own default warns at 89 MP and fails at twice that).
MAX_PIXELS = 64_000_000

#: Formats read by content, with the file name extensions that usually carry them.
SUPPORTED_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp", ".dib"),
}

#: Extensions that list_images() considers images (other files are reported by `data check`).
IMAGE_EXTENSIONS = frozenset(ext for exts in SUPPORTED_FORMATS.values() for ext in exts)


class ImageLoadError(Exception):
    """A file could not be read as an image. The message names the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class FormatMismatchWarning(UserWarning):
    """The file's content is a different format than its extension says (it is still read)."""


def _high_depth_to_8bit(array: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image in 8 bits, scaled by its bit depth — never by
    its own range, so one crystal gives the same input in every frame whatever else is in it.

    16-bit (and 32-bit integer images holding 16-bit values, as PIL reads some 16-bit PNGs):
    0..65535 onto 0..255. Float: 0..1 onto 0..255 (values of 0..65535 as 16-bit). Anything
    else has no fixed window and is refused (ValueError, reported with the file's name).
    """
    low, high = float(array.min()), float(array.max())
    if mode == "F" and low >= 0 and high <= 1:
        full_scale = 1.0
    elif low >= 0 and high <= 65535:
        full_scale = 65535.0
    else:
        raise ValueError(f"{mode} image with values {low:g}..{high:g}: no fixed bit depth to "
                         "scale by; save it as 8 or 16 bits")
    return (array * (255.0 / full_scale)).round().astype(np.uint8)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit ``L`` (grayscale) or ``RGB``."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = _high_depth_to_8bit(np.asarray(image, dtype=np.float64), mode)
        return Image.fromarray(array, mode="L")
    if mode == "P":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")  # RGBA, CMYK, YCbCr, LAB, HSV, RGBX


def load_image(path: str | Path, *, warn_on_mismatch: bool = True) -> Image.Image:
    """Read one image safely and return it as an 8-bit ``L`` or ``RGB`` PIL image.

    Raises :class:`ImageLoadError` for a missing, empty, truncated, oversized or non-image file.
    A file whose content and extension disagree (a JPEG named ``.png``) is read, with a
    :class:`FormatMismatchWarning`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(SUPPORTED_FORMATS)) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise ImageLoadError(
                        path, f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,}"
                    )
                detected = opened.format or "unknown"
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (PNG, JPEG, TIFF or BMP)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or isinstance(exc, (OSError, SyntaxError)):
            reason = f"truncated or corrupt image ({reason})"
        raise ImageLoadError(path, reason) from exc
    try:
        converted = _to_8bit(image)
    except ValueError as exc:
        raise ImageLoadError(path, str(exc)) from exc
    if warn_on_mismatch and path.suffix.lower() not in SUPPORTED_FORMATS.get(detected, ()):
        warnings.warn(
            f"{path}: content is {detected} but the name ends in '{path.suffix}'; "
            f"read as {detected}",
            FormatMismatchWarning,
            stacklevel=2,
        )
    return converted


def load_gray(path: str | Path) -> np.ndarray:
    """Read one image as a 2-D ``uint8`` grayscale array (RGB is converted by luminance)."""
    return np.asarray(load_image(path, warn_on_mismatch=False).convert("L"))
