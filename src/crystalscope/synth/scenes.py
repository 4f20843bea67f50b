"""What a probe crop shows: CEX needle scenes, PG particles, full frames.

Domain randomisation: rather than one look per class, every crop draws its own imaging and
its own particle from wide ranges, so that real crops fall inside what is drawn.

- CEX: a hazy, unevenly lit window; needles at several depths of focus, from a few sharp
  needles to dense bundles; thick out-of-focus rods (bands or fibres, highlights, some
  saturated); vignetting.
- PG: one particle cut out by the crop, filling most of it, drawn as one of four kinds with
  broad ranges: a bright granular agglomerate (grains up to saturation), a bright plate with a
  flecked granular rim, a dim translucent textured agglomerate, a faint particle with only a
  bright rim. Needles behind it and, often, in front of it; its own defocus.

``difficulty`` (0 = easy, 1 = hard) lowers contrast, adds blur and noise, and makes a share of
crops ambiguous: CEX crops with a dense bright glare, PG crops whose particle is small, dim and
partly out of the frame. Below 0.3 it also thins out the faint PG kinds (translucent, rim-only):
``easy`` draws the conspicuous PG only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from crystalscope.synth.draw import (
    background,
    blob_mask,
    composite,
    finish,
    granules,
    haze,
    needles,
    rod,
    smooth_field,
    vignette,
)

PARTICLE_KINDS = ("granular", "plate", "translucent", "rim")
PARTICLE_ODDS = (0.38, 0.25, 0.2, 0.17)
FAINT_KINDS = ("translucent", "rim")
FULL_RANGE_DIFFICULTY = 0.3  # from here up, every kind at its full odds


def full_range_share(difficulty: float) -> float:
    """0 at difficulty 0 (easy: the conspicuous looks only) .. 1 from FULL_RANGE_DIFFICULTY."""
    return min(1.0, max(0.0, difficulty) / FULL_RANGE_DIFFICULTY)


def particle_odds(difficulty: float) -> tuple[float, ...]:
    """Odds of each particle kind: the faint kinds grow from none at difficulty 0 to their
    full share at :data:`FULL_RANGE_DIFFICULTY` (``easy`` shows the conspicuous PG only)."""
    if difficulty >= FULL_RANGE_DIFFICULTY:
        return PARTICLE_ODDS
    share = difficulty / FULL_RANGE_DIFFICULTY
    odds = [p * (share if k in FAINT_KINDS else 1.0)
            for k, p in zip(PARTICLE_KINDS, PARTICLE_ODDS, strict=True)]
    return tuple(p / sum(odds) for p in odds)


def needle_scene(rng: np.random.Generator, h: int, w: int, *, density: float,
                 brightness: float, scale: float | None = None) -> np.ndarray:
    """CEX needles at three depths of focus (far: blurred, dim; near: sharp, bright).

    ``density`` 1 is a crowded crop; ``scale`` is the crop side the needles are sized for
    (default: the image's larger side, so a full frame shows needles at crop scale).
    """
    side = float(scale or max(h, w))
    area = h * w / side ** 2
    main, spread, bundle = rng.uniform(0, np.pi), rng.uniform(0.1, 1.0), rng.uniform(0, 0.7)
    depths = [  # count at density 1, length, width (px at 151), level, blur
        (30, (0.5, 1.6), (2, 8), (10, 35), rng.uniform(2.5, 5.0)),
        (18, (0.4, 1.4), (1.5, 5), (25, 70), rng.uniform(1.0, 2.2)),
        (8, (0.3, 1.2), (1, 3), (40, 120), rng.uniform(0.4, 1.6)),
    ]
    out = np.zeros((h, w), np.float32)
    for count, length, width, level, blur in depths:
        n = int(rng.poisson(count * density * area))
        if n:
            layer = needles(rng, h, w, n, length=length, width=width,
                            level=(level[0] * brightness, level[1] * brightness),
                            main_angle=main, spread=spread, scale=side, bundle=bundle)
            out += ndimage.gaussian_filter(layer, blur)
    return out


def rod_scene(rng: np.random.Generator, h: int, w: int, count: int, *, brightness: float,
              scale: float | None = None) -> np.ndarray:
    """``count`` thick out-of-focus rods (8-40 px wide at 151 px), roughly parallel."""
    side = float(scale or max(h, w))
    canvas = np.zeros((h, w), np.float32)
    main, spread = rng.uniform(0, np.pi), rng.uniform(0.05, 0.8)
    for _ in range(count):
        rod(canvas, rng, center=(rng.uniform(0, h), rng.uniform(0, w)),
            angle=main + rng.normal(0, spread), length=rng.uniform(0.9, 2.5) * side,
            width=rng.uniform(8, 50) * side / 151, level=rng.uniform(15, 110) * brightness)
    return ndimage.gaussian_filter(canvas, rng.uniform(0.8, 3.5))


def render_cex(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    """One CEX crop: needles and rods, from a few sharp needles to a crowded bundle."""
    ambiguous = rng.uniform() < 0.3 * difficulty
    image = background(rng, h, w) + haze(rng, h, w, rng.uniform(0, 70))
    density = float(np.exp(rng.uniform(np.log(0.15), np.log(1.6))))
    image += needle_scene(rng, h, w, density=density, brightness=rng.uniform(0.8, 1.6))
    rods = int(rng.choice([0, 0, 1, 2, 3, 5]))
    if rods:
        image += rod_scene(rng, h, w, rods, brightness=rng.uniform(0.7, 1.5))
    if rng.uniform() < 0.5:
        image *= vignette(h, w, rng.uniform(0.1, 0.5), tuple(rng.uniform(0.3, 0.7, 2)))
    if ambiguous:  # a dense bright bundle or an out-of-focus glare: PG-like brightness
        center = (h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7))
        glow = blob_mask(rng, h, w, min(h, w) * rng.uniform(0.15, 0.3), center)
        image += ndimage.gaussian_filter(glow, rng.uniform(3, 8)) * rng.uniform(60, 130)
    return finish(rng, image, difficulty)


def particle(rng: np.random.Generator, h: int, w: int, *, small: bool = False,
             kind: str | None = None, base: float = 60.0, difficulty: float = 1.0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One PG particle: (body grey levels, opacity, outline mask), each (h, w) float32.

    ``kind`` is one of :data:`PARTICLE_KINDS` (default: drawn with :func:`particle_odds` of
    ``difficulty``); ``base`` is the grey level behind it, which the dim kinds stay a little
    above.
    """
    side = min(h, w)
    factor = side / 151
    if small:
        radius = side * rng.uniform(0.12, 0.22)
        edge = rng.uniform(0.05, 0.25)
        center = (rng.uniform(0.1, 0.9) * h, (edge if rng.uniform() < 0.5 else 1 - edge) * w)
    else:
        radius = side * rng.uniform(0.3, 0.58)
        center = (h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7))
    kind = kind or str(rng.choice(PARTICLE_KINDS, p=particle_odds(difficulty)))
    roughness = rng.uniform(0.0, 0.12 if kind == "rim" else 0.35)
    mask = blob_mask(rng, h, w, radius, center, roughness=roughness,
                     aspect=rng.uniform(0.75, 1.3))
    depth = ndimage.distance_transform_edt(mask > 0.5).astype(np.float32)  # px from the edge
    texture = granules(rng, h, w, rng.uniform(0.01, 0.06), rng.uniform(0.6, 1.5) * factor)
    if kind == "granular":  # a mass of bright grains with darker gaps; grains spill over
        grains = granules(rng, h, w, rng.uniform(0.01, 0.05), rng.uniform(1.5, 4.5) * factor)
        inside = mask > 0.5
        grains = grains / max(float(np.percentile(grains[inside], 90)) if inside.any() else 1,
                              1e-6)
        floor = rng.uniform(0.1, 0.5)
        wide = full_range_share(difficulty)  # easy: the grey-to-bright range of old
        body = rng.uniform(180 + 10 * wide, 360 + 60 * wide) * (floor + (1 - floor) * np.clip(
            rng.uniform(0.8, 1.6) * (0.8 * grains + 0.2 * texture), 0, 1.3))
        halo = ndimage.gaussian_filter(mask, radius * 0.12) * (grains > rng.uniform(0.4, 0.9))
        alpha = np.maximum(mask, halo) * rng.uniform(0.8, 1.0)
        # Half the time (from full range up), a loose agglomerate: no outline, grains thinning
        # out towards the edge. (No random draw when easy: easy crops stay as they were.)
        if wide > 0 and rng.uniform() < 0.5 * wide:
            alpha = loose_cloud(rng, h, w, radius, center) * np.clip(
                grains * rng.uniform(1.0, 2.5), 0, 1) * rng.uniform(0.85, 1.0)
            mask = (alpha > 0.25).astype(np.float32)
    elif kind == "plate":  # bright, nearly flat plate; a granular rim with dark flecks
        body = rng.uniform(205, 300) + rng.uniform(5, 30) * smooth_field(rng, h, w, 3)
        rim = np.clip(1 - depth / (rng.uniform(0.1, 0.35) * radius), 0, 1) * (mask > 0.05)
        flecks = granules(rng, h, w, rng.uniform(0.04, 0.15), 0.7 * factor) > rng.uniform(
            0.2, 0.4)
        body = body - rim * rng.uniform(70, 170) * flecks + rim * 30 * texture
        halo = ndimage.gaussian_filter(mask, radius * 0.1) * (texture > 0.4)
        alpha = np.maximum(mask, halo * rng.uniform(0.3, 0.9)) * rng.uniform(0.85, 1.0)
    elif kind == "translucent":  # dim, textured, the needles behind show through
        grains = granules(rng, h, w, rng.uniform(0.01, 0.05), rng.uniform(1.0, 3.0) * factor)
        body = base + rng.uniform(30, 110) * (0.4 + rng.uniform(0.5, 1.5) * grains
                                             + rng.uniform(0.1, 0.6) * texture)
        alpha = mask * rng.uniform(0.4, 0.8)
    elif kind == "rim":  # faint inside, a bright rim, fine speckle
        rim_width = rng.uniform(2.0, 8.0) * factor
        rim = np.exp(-((depth - rim_width) / rim_width) ** 2) * (mask > 0.05)
        rim = rim * (1 - rng.uniform(0.2, 0.9) * (texture > rng.uniform(0.2, 0.5)))  # broken
        body = base + rng.uniform(5, 50) + rng.uniform(80, 190) * rim \
            + rng.uniform(15, 60) * texture
        interior = rng.uniform(0.2, 0.55)
        alpha = mask * (interior + (1 - interior) * rim)
    else:
        raise ValueError(f"kind {kind!r}: use one of {', '.join(PARTICLE_KINDS)}")
    body = body * (1 + rng.uniform(0, 0.4) * (texture - 0.5))  # some texture in every kind
    return body.astype(np.float32), alpha.astype(np.float32), mask.astype(np.float32)


def loose_cloud(rng: np.random.Generator, h: int, w: int, radius: float,
                center: tuple[float, float]) -> np.ndarray:
    """Where a loose agglomerate's grains lie (0-1): dense at ``center``, thinning out
    irregularly over about ``radius`` px, with no outline."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    distance = np.hypot(yy - center[0], xx - center[1]) / radius
    ragged = distance * (1 + rng.uniform(0.15, 0.4) * smooth_field(rng, h, w, 4))
    return np.clip(1.6 - 1.4 * ragged ** rng.uniform(1.5, 3.0), 0, 1).astype(np.float32)


def _pg_scene(rng: np.random.Generator, h: int, w: int, *, small: bool, difficulty: float,
              kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A PG crop before the camera's effects, and its particle's mask."""
    behind = background(rng, h, w) + haze(rng, h, w, rng.uniform(0, 50)) + needle_scene(
        rng, h, w, density=rng.uniform(0.1, 1.0) * (
            rng.uniform(0.0, 0.2) if (wide := full_range_share(difficulty)) > 0
            and rng.uniform() < 0.3 * wide else 1.0),  # some crops show few needles
        brightness=rng.uniform(0.6, 1.2))
    if rng.uniform() < 0.25:
        behind += rod_scene(rng, h, w, int(rng.integers(1, 3)), brightness=rng.uniform(0.5, 1.2))
    body, alpha, mask = particle(rng, h, w, small=small, kind=kind,
                                 base=float(np.median(behind)), difficulty=difficulty)
    if small:
        body = body * rng.uniform(0.55, 0.8)
    image = composite(behind, body, alpha, 2.5 * rng.uniform() ** 2 * min(h, w) / 151)
    if rng.uniform() < 0.5:  # needles crossing in front of the particle
        image += needle_scene(rng, h, w, density=rng.uniform(0.05, 0.3),
                              brightness=rng.uniform(0.5, 1.2))
    if rng.uniform() < 0.5:
        image *= vignette(h, w, rng.uniform(0.1, 0.5), tuple(rng.uniform(0.3, 0.7, 2)))
    return image, mask


def render_pg(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    """One PG crop: a particle filling most of the crop, needles behind and in front."""
    return render_pg_with_mask(rng, h, w, difficulty)[0]


def render_pg_with_mask(rng: np.random.Generator, h: int, w: int, difficulty: float, *,
                        kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A PG crop and where its particle is (float mask 0-1): the truth for CAM checks.
    ``kind``: one of :data:`PARTICLE_KINDS` (default: drawn at random)."""
    ambiguous = rng.uniform() < 0.3 * difficulty
    image, mask = _pg_scene(rng, h, w, small=ambiguous, difficulty=difficulty, kind=kind)
    return finish(rng, image, difficulty), mask


def render_frame(rng: np.random.Generator, side: int, crop: int, difficulty: float,
                 pg_particles: int, *, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A full probe frame (``side`` px): CEX needles at the crops' scale (``crop`` px) with
    ``pg_particles`` PG particles at random places (of ``kind``, default: any); returns the
    frame and the PG mask."""
    image = background(rng, side, side) + needle_scene(
        rng, side, side, density=rng.uniform(0.5, 1.4), brightness=rng.uniform(0.9, 1.5),
        scale=crop)
    truth = np.zeros((side, side), np.float32)
    for _ in range(pg_particles):
        body, alpha, mask = particle(rng, crop, crop, kind=kind, difficulty=difficulty)
        y, x = (int(v) for v in rng.integers(0, side - crop, 2))
        region = image[y:y + crop, x:x + crop]
        region[:] = composite(region, body, alpha, 0.0)
        truth[y:y + crop, x:x + crop] = np.maximum(truth[y:y + crop, x:x + crop], mask)
    return finish(rng, image, difficulty), truth
