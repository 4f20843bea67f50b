"""The bubble measure: a round ring around a darker middle stands out; crystals, solid
particles and the real crops do not; brightness, contrast and right-angle turns leave it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystalscope.model.spec import ModelSpec, decode
from crystalscope.synth.scenes import render_cex, render_pg
from crystalscope.synth.unknown import render_bubble
from crystalscope.unknown.appearance import RINGLESS_SIZE, AppearanceNeighbours, appearance
from crystalscope.unknown.detector import APPEARANCE, UnknownDetector
from crystalscope.unknown.quality import gray_at_measure_side
from crystalscope.unknown.symmetry import dark_centre_symmetry


def _scene(middle: str) -> np.ndarray:
    """A 96-px probe window with one round object of radius 20: a bubble (darker disc, thin
    bright ring) or a solid bright particle."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    distance = np.hypot(yy - 50, xx - 44)
    window = 100 + rng.normal(0, 2, (96, 96))
    if middle == "bubble":
        return window * (1 - 0.45 * (distance < 20)) + 150 * np.exp(-((distance - 20) / 1.5) ** 2)
    return window + 100 * (distance < 20)


def test_a_bubble_stands_out_and_a_solid_particle_or_needle_does_not() -> None:
    bubble = dark_centre_symmetry(_scene("bubble"))
    assert bubble > 5
    assert dark_centre_symmetry(_scene("solid")) < bubble / 20  # votes toward a bright middle
    rng = np.random.default_rng(1)
    for render in (render_cex, render_pg):
        crystals = [dark_centre_symmetry(render(rng, 96, 96, 0.3).astype(float))
                    for _ in range(5)]
        assert np.median(crystals) < bubble / 5
    drawn = [dark_centre_symmetry(render_bubble(rng, 96, 0.3).astype(float)) for _ in range(5)]
    assert np.median(drawn) > 2  # the synthetic bubbles of `synth unknown`
    assert dark_centre_symmetry(np.full((96, 96), 100.0)) == 0.0  # no edge, no ring


def test_brightness_contrast_and_turns_leave_it(samples: Path) -> None:
    bubble = _scene("bubble")
    value = dark_centre_symmetry(bubble)
    for changed in (2.0 * bubble - 40, bubble + 60, np.rot90(bubble), bubble[::-1]):
        assert abs(dark_centre_symmetry(np.ascontiguousarray(changed)) - value) < 0.02 * value
    spec = ModelSpec(96, ("cex", "pg"))
    real = [dark_centre_symmetry(gray_at_measure_side(decode(p, spec)[0]))
            for p in sorted(samples.glob("*.png"))]
    assert len(real) == 14 and max(real) < value / 10  # a real crystal is not a bubble


def test_a_bank_without_rings_scores_as_before() -> None:
    # A model exported before the rings keeps its scores: its bank has RINGLESS_SIZE numbers a
    # crop, the detector describes new crops with those, and they are the first numbers of
    # today's descriptor, unchanged.
    rng = np.random.default_rng(2)
    crops = np.repeat(rng.integers(60, 200, (12, 1, 48, 48), dtype=np.uint8), 3, axis=1)
    full, ringless = appearance(crops), appearance(crops, RINGLESS_SIZE)
    np.testing.assert_array_equal(full[:, :RINGLESS_SIZE], ringless)
    old = AppearanceNeighbours.fit(ringless[:8], k=2)
    detector = UnknownDetector(stage_sizes=[], distances=[], center=np.zeros(1),
                               scale=np.ones(1), threshold=1.0, target_false_reject=0.01,
                               method=APPEARANCE, appearance=old)
    scores, _ = detector.assess(crops[8:], np.zeros((4, 1)), np.full((4, 2), 0.5))
    np.testing.assert_allclose(scores, old(ringless[8:]))
