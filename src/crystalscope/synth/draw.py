"""Drawing helpers for the probe's look: fields, needles and rods, particles, optics.

Every function draws float32 arrays in grey levels (0-255 before the final clip) from the
random generator it is given, so a caller that seeds the generator gets the same pixels.
They are public: the crop, batch and unknown-kind generators share them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bicubically enlarged."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def background(rng: np.random.Generator, h: int, w: int, *, level: tuple[float, float] = (15, 90)
               ) -> np.ndarray:
    """The probe window: a grey level, uneven illumination and soft haze."""
    base = rng.uniform(*level)
    unevenness = rng.uniform(5, 30)
    out = base + unevenness * smooth_field(rng, h, w, 3) + 0.4 * unevenness * smooth_field(
        rng, h, w, int(rng.integers(5, 12)))
    return out.astype(np.float32)


def haze(rng: np.random.Generator, h: int, w: int, strength: float) -> np.ndarray:
    """Out-of-focus glow: a few large, blurred bright patches (0..strength)."""
    field = np.clip(smooth_field(rng, h, w, int(rng.integers(2, 5))), 0, None)
    return (strength * field ** rng.uniform(1.0, 2.0)).astype(np.float32)


def vignette(h: int, w: int, strength: float, center: tuple[float, float] = (0.5, 0.5)
             ) -> np.ndarray:
    """A multiplicative darkening towards the corners (1 at ``center``, 1 - strength far out)."""
    yy, xx = np.ogrid[0:h, 0:w]
    r2 = ((yy / max(h - 1, 1) - center[0]) ** 2 + (xx / max(w - 1, 1) - center[1]) ** 2) / 0.5
    return (1 - strength * np.clip(r2, 0, 1)).astype(np.float32)


def needles(rng: np.random.Generator, h: int, w: int, count: int, *,
            length: tuple[float, float], width: tuple[float, float],
            level: tuple[float, float], main_angle: float, spread: float,
            scale: float, bundle: float = 0.0) -> np.ndarray:
    """Thin needles (PIL lines), one layer: overlaps in a layer keep the brighter needle.

    Lengths are fractions of ``scale`` (the crop side); widths are in pixels at a 151 px
    crop and grow with ``scale``. ``bundle`` (0..1) is the share of needles that lie close
    and nearly parallel to the previous one, as needles grown from one seed do.
    """
    layer = Image.new("F", (w, h), 0.0)
    draw = ImageDraw.Draw(layer)
    factor = scale / 151
    cy, cx, angle = rng.uniform(0, h), rng.uniform(0, w), main_angle
    for _ in range(count):
        if rng.uniform() < bundle:  # next to the previous needle, nearly parallel
            offset = rng.normal(0, 6 * factor)
            cy, cx = cy + offset * np.cos(angle), cx - offset * np.sin(angle)
            cy, cx = cy + rng.normal(0, 10 * factor) * np.sin(angle), \
                cx + rng.normal(0, 10 * factor) * np.cos(angle)
            angle = angle + rng.normal(0, 0.04)
        else:
            cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
            angle = main_angle + rng.normal(0, spread)
        half = rng.uniform(*length) * scale / 2
        dy, dx = np.sin(angle) * half, np.cos(angle) * half
        thickness = max(1, round(rng.uniform(*width) * factor))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=float(rng.uniform(*level)),
                  width=thickness)
    return np.asarray(layer)


def rod(canvas: np.ndarray, rng: np.random.Generator, *, center: tuple[float, float],
        angle: float, length: float, width: float, level: float) -> None:
    """Add one thick, out-of-focus CEX rod to ``canvas`` in place.

    A rod is a long box seen from the side: brighter or darker edges, bands across it or
    fibres along it (striation), a bright highlight line, soft ends. Only its bounding box is
    computed.
    """
    h, w = canvas.shape
    dy, dx = np.sin(angle), np.cos(angle)
    half_l, half_w = length / 2, width / 2
    reach = abs(dx) * half_l + abs(dy) * half_w + 2, abs(dy) * half_l + abs(dx) * half_w + 2
    x0, x1 = max(0, int(center[1] - reach[0])), min(w, int(center[1] + reach[0]) + 1)
    y0, y1 = max(0, int(center[0] - reach[1])), min(h, int(center[0] + reach[1]) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    py, px = yy - center[0], xx - center[1]
    along = px * dx + py * dy
    across = -px * dy + py * dx
    inside = np.clip(half_l - np.abs(along) + 0.5, 0, 1) * np.clip(
        half_w - np.abs(across) + 0.5, 0, 1)
    t = np.clip(np.abs(across) / half_w, 0, 1)
    profile = 1 + rng.uniform(-0.4, 0.5) * (t ** 2 - 0.35)  # edges brighter or darker
    striation, pattern = rng.uniform(0, 0.6), rng.uniform()
    if pattern < 0.25:  # irregular bands across the rod
        profile = profile * (1 + striation * _wobble(rng, along, rng.uniform(2, 8)))
    elif pattern < 0.45:  # fibres along it
        profile = profile * (1 + striation * _wobble(rng, across, rng.uniform(1, 3)))
    else:  # bright granular blotches, the same grains as a PG agglomerate's: only the
        # rod's long straight edges tell it from one
        bh, bw = y1 - y0, x1 - x0
        blotches = granules(rng, bh, bw, rng.uniform(0.01, 0.05), rng.uniform(1.2, 3.5))
        blotches = blotches / max(float(np.percentile(blotches, 95)), 1e-6)
        profile = profile * (rng.uniform(0.2, 0.6) + rng.uniform(0.6, 1.6) * blotches)
    if rng.uniform() < 0.6:  # a specular highlight line along the rod
        line = rng.uniform(-0.7, 0.7) * half_w
        profile = profile + rng.uniform(0.3, 1.2) * np.exp(
            -((across - line) / max(1.0, 0.12 * width)) ** 2)
    canvas[y0:y1, x0:x1] += (level * profile * inside).astype(np.float32)


def _wobble(rng: np.random.Generator, position: np.ndarray, period: float) -> np.ndarray:
    """Smooth 1-D noise in about [-1, 1] along ``position`` (knots every ``period`` px)."""
    low, high = float(position.min()), float(position.max())
    knots = np.arange(low - period, high + 2 * period, period)
    values = rng.uniform(-1, 1, knots.size)
    return np.interp(position, knots, values).astype(np.float32)


def blob_mask(rng: np.random.Generator, h: int, w: int, radius: float,
              center: tuple[float, float], *, roughness: float = 0.16,
              aspect: float = 1.0) -> np.ndarray:
    """A star-shaped particle outline as a soft mask in [0, 1]; roughness 0 = an ellipse."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 9):
        r += rng.uniform(0, roughness) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 6.3))
    r *= radius
    turn = rng.uniform(0, np.pi)
    ex, ey = r * np.cos(theta) * aspect, r * np.sin(theta) / aspect
    xs = center[1] + ex * np.cos(turn) - ey * np.sin(turn)
    ys = center[0] + ex * np.sin(turn) + ey * np.cos(turn)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(list(zip(xs, ys, strict=True)), fill=255)
    return ndimage.gaussian_filter(np.asarray(mask, np.float32) / 255, 1.0)


def granules(rng: np.random.Generator, h: int, w: int, density: float, sigma: float
             ) -> np.ndarray:
    """Round grains of about ``sigma`` px radius and random brightness, normalised to 0..1."""
    points = np.zeros((h, w), np.float32)
    n = max(1, int(h * w * density))
    points[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.3, 1.0, n)
    field = ndimage.gaussian_filter(points, sigma)
    return field / max(float(field.max()), 1e-6)


def composite(behind: np.ndarray, body: np.ndarray, alpha: np.ndarray, defocus: float
              ) -> np.ndarray:
    """``body`` over ``behind`` with opacity ``alpha``, the object blurred by ``defocus`` px."""
    if defocus > 0.3:
        premultiplied = ndimage.gaussian_filter(body * alpha, defocus)
        alpha = ndimage.gaussian_filter(alpha, defocus)
        return behind * (1 - alpha) + premultiplied
    return behind * (1 - alpha) + body * alpha


def finish(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
    """Camera effects: noise, optics blur, contrast, gain (noise, blur and lost contrast grow
    with difficulty), then the probe's resampling to the crop's pixels; uint8.

    The probe's crops are smooth at the pixel level (the noise is blurred with the image and
    crops are resampled from the frame), so noise comes before the blur.
    """
    image = image + rng.normal(0, rng.uniform(1, 4) + 10 * difficulty, image.shape)
    image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.0 + 1.6 * difficulty))
    contrast = 1 - rng.uniform(0, 0.55) * difficulty
    image = image.mean() + (image - image.mean()) * contrast
    image = image * rng.uniform(0.9 - 0.2 * difficulty, 1.1 + 0.1 * difficulty)
    image = np.clip(image, 0, 255).astype(np.float32)
    h, w = image.shape
    shrink = rng.uniform(1.0, 1.8)
    if shrink > 1.1:
        small = Image.fromarray(image, mode="F").resize(
            (max(8, round(w / shrink)), max(8, round(h / shrink))), Image.Resampling.BILINEAR)
        image = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(image, 0, 255).round().astype(np.uint8)
