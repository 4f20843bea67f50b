"""`crystalscope synth unknown`: images a CEX/PG model has never seen, to test its "unknown" flag.

Near unknown kinds (drawn in the probe's own style: same background, blur, noise):

- ``bubble``: gas bubbles — dark discs with a bright thin ring and a specular highlight;
- ``empty``: background only, nothing in the frame;
- ``defocus``: a CEX or PG crop far out of focus;
- ``cube``: a third crystal habit — faceted cubes (three shaded faces, straight edges).

Far out of distribution (``natural``): pieces of the photographs bundled with scikit-image
(the cat, the astronaut, coffee, coins, the moon, text, …), available offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, field_validator
from scipy import ndimage

from crystalscope.errors import UserError
from crystalscope.parallel import ordered_map
from crystalscope.settings import Settings, SettingsError
from crystalscope.synth.draw import background, finish
from crystalscope.synth.scenes import needle_scene, render_cex, render_pg

NEAR_KINDS = ("bubble", "empty", "defocus", "cube")
FAR_KINDS = ("natural",)
KINDS = NEAR_KINDS + FAR_KINDS
# scikit-image's bundled photographs (no download): natural scenes, objects, text, microscopy.
NATURAL_IMAGES = ("chelsea", "astronaut", "coffee", "rocket", "camera", "horse", "coins",
                  "moon", "page", "text", "clock", "brick", "grass", "gravel", "colorwheel",
                  "hubble_deep_field", "immunohistochemistry", "retina", "cell", "logo")


def _behind(rng: np.random.Generator, side: int) -> np.ndarray:
    """The probe's background with a few far, blurred needles (a sparse suspension)."""
    return background(rng, side, side) + needle_scene(rng, side, side,
                                                      density=rng.uniform(0.0, 0.25),
                                                      brightness=0.6)


def render_bubble(rng: np.random.Generator, side: int, difficulty: float) -> np.ndarray:
    """One to three gas bubbles: a darker disc, a bright thin ring, a small highlight."""
    image = _behind(rng, side)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = side * rng.uniform(0.12, 0.38)
        cy, cx = rng.uniform(0.25, 0.75, 2) * side
        distance = np.hypot(yy - cy, xx - cx)
        inside = np.clip(radius - distance, 0, 1)
        ring = np.exp(-((distance - radius) / rng.uniform(1.0, 2.5)) ** 2)
        highlight_y, highlight_x = cy - radius * 0.45, cx - radius * 0.35
        highlight = np.exp(-np.hypot(yy - highlight_y, xx - highlight_x) ** 2
                           / (2 * (radius * 0.12) ** 2))
        image = image * (1 - 0.45 * inside) + rng.uniform(150, 230) * ring \
            + rng.uniform(120, 200) * highlight
    return finish(rng, image, difficulty)


def render_empty(rng: np.random.Generator, side: int, difficulty: float) -> np.ndarray:
    """The probe window with nothing in front of it."""
    return finish(rng, background(rng, side, side), difficulty)


def render_defocus(rng: np.random.Generator, side: int, difficulty: float) -> np.ndarray:
    """A CEX or PG crop far out of focus (Gaussian blur of 5-12 px)."""
    render = render_cex if rng.uniform() < 0.5 else render_pg
    sharp = render(rng, side, side, difficulty).astype(np.float32)
    blurred = ndimage.gaussian_filter(sharp, rng.uniform(5, 12))
    return np.clip(blurred + rng.normal(0, 2, blurred.shape), 0, 255).round().astype(np.uint8)


def _hexagon(center: tuple[float, float], edge: float, turn: float) -> list[tuple[float, float]]:
    return [(center[0] + edge * np.cos(turn + k * np.pi / 3),
             center[1] + edge * np.sin(turn + k * np.pi / 3)) for k in range(6)]


def _cube(draw: ImageDraw.ImageDraw, rng: np.random.Generator, center: tuple[float, float],
          edge: float) -> float:
    """An isometric cube: three faces of different brightness, thin dark edges; its turn."""
    turn = rng.uniform(0, np.pi / 3)
    corners = _hexagon(center, edge, turn)
    levels = rng.permutation([rng.uniform(200, 245), rng.uniform(140, 185), rng.uniform(90, 130)])
    for face, level in zip(((0, 1, 2), (2, 3, 4), (4, 5, 0)), levels, strict=True):
        polygon = [center, *(corners[i] for i in face)]
        draw.polygon(polygon, fill=int(level), outline=40)
    return turn


def render_cube(rng: np.random.Generator, side: int, difficulty: float) -> np.ndarray:
    """One to four faceted cubes — a crystal habit that is neither CEX nor PG."""
    image = _behind(rng, side)
    cubes = Image.new("L", (side, side), 0)
    mask = Image.new("L", (side, side), 0)
    for _ in range(int(rng.integers(1, 5))):
        edge = side * rng.uniform(0.12, 0.3)
        center = tuple(rng.uniform(0.25, 0.75, 2) * side)
        turn = _cube(ImageDraw.Draw(cubes), rng, center, edge)
        ImageDraw.Draw(mask).polygon(_hexagon(center, edge, turn), fill=255)
    alpha = ndimage.gaussian_filter((np.asarray(mask) > 0).astype(np.float32), 0.7)
    image = image * (1 - alpha) + np.asarray(cubes, np.float32) * alpha
    return finish(rng, image, difficulty)


def natural_piece(rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
    """A random square piece (20-100% of the short side) of one of scikit-image's photos, and
    the photo's name."""
    import skimage.data

    name = NATURAL_IMAGES[int(rng.integers(len(NATURAL_IMAGES)))]
    photo = np.asarray(getattr(skimage.data, name)())
    if photo.ndim == 3:
        photo = photo[..., :3].mean(axis=2)  # the probe is grayscale
    h, w = photo.shape
    piece = int(min(h, w) * rng.uniform(0.2, 1.0))
    y, x = int(rng.integers(0, h - piece + 1)), int(rng.integers(0, w - piece + 1))
    crop = Image.fromarray(photo[y:y + piece, x:x + piece].astype(np.uint8), mode="L")
    return np.asarray(crop.resize((side, side), Image.Resampling.BILINEAR)), name


# The near kinds, drawn in the probe's style; a natural image is a piece of a photo
# (:func:`natural_piece`, which also names the photo).
RENDERERS: dict[str, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    "bubble": render_bubble, "empty": render_empty, "defocus": render_defocus,
    "cube": render_cube,
}


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """``bubble,cube`` / ``near`` / ``far`` / ``all`` (None) -> kinds."""
    if text is None or text.strip() in ("", "all"):
        return KINDS
    groups = {"near": NEAR_KINDS, "far": FAR_KINDS}
    kinds: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in groups:
            kinds.extend(groups[part])
        elif part in KINDS:
            kinds.append(part)
        else:
            raise SettingsError("kinds", f"{part!r} is not one of {', '.join(KINDS)}, near, "
                                "far or all", text)
    return tuple(dict.fromkeys(kinds))


def _render_and_write(job: tuple[str, int, int, float, int, str]) -> tuple[str, str | None]:
    """Draw and write one image; (its path under the folder, the photo it was cut from for
    ``natural``, else None)."""
    kind, number, side, difficulty, seed, out = job
    rng = np.random.default_rng([seed, 100 + KINDS.index(kind), number])
    name = f"{kind}/{kind}-{number:04d}.png"
    source = None
    if kind == "natural":
        image, source = natural_piece(rng, side)
    else:
        image = RENDERERS[kind](rng, side, difficulty)
    Image.fromarray(image, mode="L").save(Path(out) / name, compress_level=3)
    return name, source


class UnknownSettings(Settings):
    """What ``synth unknown`` draws: ``per_kind`` images of each of ``kinds``."""

    per_kind: int = Field(50, ge=1)
    kinds: tuple[str, ...] = KINDS
    size: int = Field(151, ge=32, le=2048)
    difficulty: float = Field(0.3, ge=0.0, le=1.0)
    seed: int = 0

    @field_validator("kinds")
    @classmethod
    def _known(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        if not kinds:
            raise ValueError("give at least one kind")
        return parse_kinds(",".join(kinds))


def synthesize_unknown(out: Path, settings: UnknownSettings | None = None, *,
                       workers: int | None = None,
                       progress: Callable[[int], None] | None = None) -> dict:
    """Write ``per_kind`` images of each kind under ``out/<kind>/`` and ``out/unknown.json``
    (the settings, the kinds, the files, and for each ``natural`` image the photo it was cut
    from: ``sources``)."""
    settings = settings or UnknownSettings()
    per_kind, kinds, size = settings.per_kind, settings.kinds, settings.size
    difficulty, seed = settings.difficulty, settings.seed
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new folder")
    for kind in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
    jobs = [(kind, n, size, difficulty, seed, str(out))
            for kind in kinds for n in range(1, per_kind + 1)]
    files, sources = [], {}
    for name, source in ordered_map(_render_and_write, jobs, workers=workers):
        files.append(name)
        if source is not None:
            sources[name] = source
        if progress:
            progress(1)
    summary = {"settings": {"per_kind": per_kind, "size": size, "difficulty": difficulty,
                            "seed": seed},
               "kinds": {k: ("near" if k in NEAR_KINDS else "far") for k in kinds},
               "files": files, "sources": sources}
    (out / "unknown.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
