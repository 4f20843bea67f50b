"""`crystalscope synth`: synthetic particle-vision-probe crops of CEX needles and PG agglomerates.

Modelled on the public crops (see ``shared/data/opencrystal-samples``): 8-bit grayscale;
CEX = dense, thin, bright, overlapping needles at several depths of focus on a dark blurred
background; PG = one bright granular or smooth plate-like agglomerate (with a speckled rim)
in front of blurred needles. Every image is drawn from its own random generator seeded by
(seed, class, number), so a crop is the same whatever ``per_class`` or the worker count.

``difficulty`` (0 = easy, 1 = hard) lowers contrast, adds blur and noise, and makes a share of
crops ambiguous: CEX crops with a dense bright bundle or glare, PG crops whose agglomerate is
small, dim and partly out of the frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from crystalscope.errors import UserError
from crystalscope.parallel import ordered_map

CLASSES = ("cex", "pg")
PREFIX = {"cex": "CEX", "pg": "PG"}
DIFFICULTY_LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}
PG_SIZE_RANGE = (0.87, 1.52)  # PG crop sides relative to the CEX side (132..230 px for 151)


@dataclass(frozen=True)
class SynthSettings:
    """Everything that decides the synthetic data set."""

    per_class: int = 200
    size: int = 151
    uniform_size: int | None = None
    difficulty: float = 0.3
    dihedral_copies: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.per_class < 1:
            raise UserError(f"--per-class {self.per_class}: give at least 1")
        if not 32 <= self.size <= 2048:
            raise UserError(f"--size {self.size}: give a crop side between 32 and 2048 pixels")
        if self.uniform_size is not None and not 16 <= self.uniform_size <= 2048:
            raise UserError(f"--uniform-size {self.uniform_size}: give 16 to 2048 pixels")
        if not 0.0 <= self.difficulty <= 1.0:
            raise UserError(f"--difficulty {self.difficulty}: give 0..1 or easy/medium/hard")
        if not 0 <= self.dihedral_copies <= 7:
            raise UserError(f"--dihedral-copies {self.dihedral_copies}: give 0 to 7 "
                            "(a crop has 8 rotations/flips)")


def parse_difficulty(text: str) -> float:
    """``easy``/``medium``/``hard`` or a number in 0..1."""
    text = str(text).strip().lower()
    if text in DIFFICULTY_LEVELS:
        return DIFFICULTY_LEVELS[text]
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--difficulty {text!r}: give easy, medium, hard or a number in 0..1") \
            from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--difficulty {text!r}: give a number in 0..1")
    return value


# --------------------------------------------------------------------------------- drawing


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bicubically enlarged."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _needles(rng: np.random.Generator, h: int, w: int, count: int, *, length: tuple[float, float],
             width: tuple[int, int], intensity: tuple[float, float], sigma: float,
             main_angle: float, spread: float, scale: int | None = None) -> np.ndarray:
    """Additive layer of straight needles (overlaps add up, so crossings are brighter).

    Needle lengths are fractions of ``scale`` (default: the image side): a full probe frame
    passes the crop side, so its needles have the crops' size.
    """
    layer = np.zeros(h * w, np.float32)
    scratch = np.zeros(h * w, np.float32)  # one needle at a time: max within, sum across
    side = scale or max(h, w)
    for _ in range(count):
        angle = main_angle + rng.normal(0, spread)
        half = rng.uniform(*length) * side / 2
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        dy, dx = np.sin(angle), np.cos(angle)
        steps = np.linspace(-half, half, max(2, int(2 * half)))
        thickness = int(rng.integers(width[0], width[1] + 1))
        level = rng.uniform(*intensity)
        striation = level * (1 + 0.25 * np.sin(steps / rng.uniform(3, 12) + rng.uniform(0, 6.3)))
        offsets = np.arange(thickness) - (thickness - 1) / 2
        ys = np.round(cy + steps[None, :] * dy + offsets[:, None] * dx).astype(int).ravel()
        xs = np.round(cx + steps[None, :] * dx - offsets[:, None] * dy).astype(int).ravel()
        values = np.broadcast_to(striation, (thickness, steps.size)).ravel()
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        flat = ys[inside] * w + xs[inside]
        np.maximum.at(scratch, flat, values[inside])
        touched = np.unique(flat)
        layer[touched] += scratch[touched]
        scratch[touched] = 0
    layer = layer.reshape(h, w)
    return ndimage.gaussian_filter(layer, sigma) if sigma > 0 else layer


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(35, 75)
    return base + 18 * _smooth_field(rng, h, w, 4) + 8 * _smooth_field(rng, h, w, 9)


def _needle_depths(rng: np.random.Generator, h: int, w: int, density: float,
                   brightness: float, scale: int | None = None) -> np.ndarray:
    """Needles at three depths of focus: far (blurred, dim), middle, near (sharp, bright)."""
    main = rng.uniform(0, np.pi)
    spread = rng.uniform(0.15, 0.9)
    area = h * w / 151**2
    layers = [
        (40, (0.5, 1.6), (2, 6), (15, 40), rng.uniform(2.5, 4.0)),
        (25, (0.4, 1.4), (1, 4), (30, 75), rng.uniform(1.0, 1.8)),
        (12, (0.3, 1.2), (1, 3), (45, 110), rng.uniform(0.4, 0.9)),
    ]
    out = np.zeros((h, w), np.float32)
    for count, length, width, intensity, sigma in layers:
        n = max(1, int(rng.poisson(count * density * area)))
        out += _needles(rng, h, w, n, length=length, width=width,
                        intensity=(intensity[0] * brightness, intensity[1] * brightness),
                        sigma=sigma, main_angle=main, spread=spread, scale=scale)
    return out


def _blob_mask(rng: np.random.Generator, h: int, w: int, radius: float,
               center: tuple[float, float]) -> np.ndarray:
    """An irregular, star-shaped agglomerate outline as a soft mask in [0, 1]."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 8):
        r += rng.uniform(0, 0.16) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius * rng.uniform(0.9, 1.1)
    aspect = rng.uniform(0.75, 1.25)
    points = [(center[1] + ri * np.cos(t) * aspect, center[0] + ri * np.sin(t) / aspect)
              for ri, t in zip(r, theta, strict=True)]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return ndimage.gaussian_filter(np.asarray(mask, np.float32) / 255, 1.2)


def _granules(rng: np.random.Generator, h: int, w: int, density: float, sigma: float) -> np.ndarray:
    points = np.zeros((h, w), np.float32)
    n = int(h * w * density)
    points[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.5, 1.0, n)
    field = ndimage.gaussian_filter(points, sigma)
    return field / max(float(field.max()), 1e-6)


def _agglomerate(rng: np.random.Generator, h: int, w: int, *, small: bool) -> tuple[np.ndarray,
                                                                                      np.ndarray]:
    """A PG agglomerate: (intensity, mask). Granular, or a smooth plate with a speckled rim."""
    side = min(h, w)
    if small:
        radius = side * rng.uniform(0.12, 0.2)
        edge = rng.uniform(0.05, 0.25)
        center = (rng.uniform(0.1, 0.9) * h, (edge if rng.uniform() < 0.5 else 1 - edge) * w)
    else:
        radius = side * rng.uniform(0.28, 0.42)
        center = (h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6))
    mask = _blob_mask(rng, h, w, radius, center)
    inside = ndimage.distance_transform_edt(mask > 0.5)
    if rng.uniform() < 0.6:  # granular: bright grains with darker gaps, grains spill over the rim
        grains = _granules(rng, h, w, rng.uniform(0.02, 0.05), rng.uniform(1.0, 1.8))
        body = rng.uniform(130, 180) + rng.uniform(110, 160) * grains
        speckle = _granules(rng, h, w, 0.04, 1.0)
        halo = ndimage.gaussian_filter(mask, radius * 0.15) * (speckle > 0.3) * 0.9
        mask = np.maximum(mask, halo)
    else:  # smooth plate: near-saturated with a gentle gradient, speckled rim
        gradient = _smooth_field(rng, h, w, 3)
        body = rng.uniform(215, 250) + 12 * gradient
        rim_width = rng.uniform(0.12, 0.3) * radius
        rim = np.clip(1 - inside / rim_width, 0, 1) * (mask > 0.05)
        speckle = _granules(rng, h, w, 0.12, 0.7)
        body = body - rim * 160 * (speckle > 0.25) + rim * 30 * speckle
    return body.astype(np.float32), mask.astype(np.float32)


def _finish(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
    """Camera effects that grow with difficulty: blur, lower contrast, noise."""
    blur = rng.uniform(0.2, 0.4 + 1.6 * difficulty)
    image = ndimage.gaussian_filter(image, blur)
    contrast = 1 - rng.uniform(0, 0.55) * difficulty
    image = image.mean() + (image - image.mean()) * contrast
    image = image * rng.uniform(0.9 - 0.2 * difficulty, 1.1 + 0.1 * difficulty)
    image = image + rng.normal(0, 2 + 10 * difficulty, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render_cex(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    """One CEX crop: dense overlapping needles on a dark, blurred background."""
    ambiguous = rng.uniform() < 0.3 * difficulty
    image = _background(rng, h, w) + _needle_depths(rng, h, w, rng.uniform(0.8, 1.4),
                                                    rng.uniform(0.9, 1.5))
    if ambiguous:  # a dense bright bundle or an out-of-focus glare: PG-like brightness
        center = (h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7))
        glow = _blob_mask(rng, h, w, min(h, w) * rng.uniform(0.15, 0.3), center)
        glow = ndimage.gaussian_filter(glow, rng.uniform(3, 8))
        image = image + glow * rng.uniform(60, 130)
    return _finish(rng, image, difficulty)


def render_pg(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    """One PG crop: a bright agglomerate in front of blurred needles."""
    return render_pg_with_mask(rng, h, w, difficulty)[0]


def render_pg_with_mask(rng: np.random.Generator, h: int, w: int, difficulty: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A PG crop and where its agglomerate is (float mask 0-1): the truth for CAM checks."""
    ambiguous = rng.uniform() < 0.3 * difficulty
    behind = _background(rng, h, w) + _needle_depths(rng, h, w, rng.uniform(0.4, 0.9),
                                                     rng.uniform(0.7, 1.1))
    body, mask = _agglomerate(rng, h, w, small=ambiguous)
    if ambiguous:
        body = body * rng.uniform(0.55, 0.8)
    image = behind * (1 - mask) + body * mask
    return _finish(rng, image, difficulty), mask


RENDERERS: dict[str, Callable[[np.random.Generator, int, int, float], np.ndarray]] = {
    "cex": render_cex,
    "pg": render_pg,
}


# ------------------------------------------------------------------------------ data set


def crop_shape(rng: np.random.Generator, class_name: str, settings: SynthSettings
               ) -> tuple[int, int]:
    """(height, width) of one crop: square for CEX, variable for PG, or the uniform size."""
    if settings.uniform_size:
        return settings.uniform_size, settings.uniform_size
    if class_name == "cex":
        return settings.size, settings.size
    low, high = PG_SIZE_RANGE
    return (round(settings.size * rng.uniform(low, high)),
            round(settings.size * rng.uniform(low, high)))


def _transform(array: np.ndarray, k: int) -> np.ndarray:
    """Dihedral transform k in 0..7: rotate by k % 4 quarter turns, flip if k >= 4."""
    out = np.rot90(array, k % 4)
    return np.ascontiguousarray(np.fliplr(out) if k >= 4 else out)


def render_group(class_name: str, number: int, settings: SynthSettings) -> list[np.ndarray]:
    """The crop numbered ``number`` and its rotated/flipped copies (PG only)."""
    class_index = CLASSES.index(class_name)
    rng = np.random.default_rng([settings.seed, class_index, number])
    h, w = crop_shape(rng, class_name, settings)
    crop = RENDERERS[class_name](rng, h, w, settings.difficulty)
    copies = settings.dihedral_copies if class_name == "pg" else 0
    transforms = rng.permutation(np.arange(1, 8))[:copies]
    return [crop] + [_transform(crop, int(k)) for k in transforms]


def _render_and_write(job: tuple[str, int, int, SynthSettings, str]) -> list[dict]:
    class_name, first_number, count, settings, out = job
    folder = Path(out) / class_name
    written = []
    for offset, array in enumerate(render_group(class_name, first_number, settings)[:count]):
        number = first_number + offset
        name = f"{PREFIX[class_name]} ({number}).png"
        Image.fromarray(array, mode="L").save(folder / name, compress_level=3)
        written.append({"file": f"{class_name}/{name}", "class": class_name,
                        "group": f"{class_name}-{first_number}", "copy_of_first": offset > 0,
                        "height": int(array.shape[0]), "width": int(array.shape[1])})
    return written


def synthesize(out: Path, settings: SynthSettings, *, workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Write ``settings.per_class`` crops per class under ``out/<class>/`` and ``synth.json``.

    Refuses an ``out`` folder that already holds files. Returns the summary written to
    ``synth.json`` (settings, and one entry per file with its duplicate group).
    """
    settings.validate()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new folder")
    group_size = 1 + settings.dihedral_copies
    jobs = []
    for class_name in CLASSES:
        (out / class_name).mkdir(parents=True, exist_ok=True)
        step = group_size if class_name == "pg" else 1
        for first in range(1, settings.per_class + 1, step):
            count = min(step, settings.per_class - first + 1)
            jobs.append((class_name, first, count, settings, str(out)))
    files: list[dict] = []
    for written in ordered_map(_render_and_write, jobs, workers=workers):
        files.extend(written)
        if progress:
            progress(len(written))
    summary = {"settings": asdict(settings), "classes": list(CLASSES), "files": files}
    (out / "synth.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def render_frame(rng: np.random.Generator, side: int, crop: int, difficulty: float,
                 pg_particles: int) -> tuple[np.ndarray, np.ndarray]:
    """A full probe frame (``side`` px): CEX needles at the crops' scale (``crop`` px) with
    ``pg_particles`` PG agglomerates at random places; returns the frame and the PG mask."""
    image = _background(rng, side, side) + _needle_depths(
        rng, side, side, rng.uniform(0.8, 1.4), rng.uniform(0.9, 1.5), scale=crop)
    truth = np.zeros((side, side), np.float32)
    for _ in range(pg_particles):
        body, mask = _agglomerate(rng, crop, crop, small=False)
        y, x = (int(v) for v in rng.integers(0, side - crop, 2))
        region = image[y:y + crop, x:x + crop]
        region[:] = region * (1 - mask) + body * mask
        truth[y:y + crop, x:x + crop] = np.maximum(truth[y:y + crop, x:x + crop], mask)
    return _finish(rng, image, difficulty), truth
