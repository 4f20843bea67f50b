"""Scales and layout of a crop's detail: fine noise and coarse shapes put their energy in
different octaves; one particle on an even window has uneven contrast, a texture even; neither
moves with brightness, contrast or a right-angle turn; an older bank keeps its numbers."""

from __future__ import annotations

import numpy as np

from crystalscope.unknown.appearance import RINGED_SIZE, AppearanceNeighbours, appearance
from crystalscope.unknown.detector import APPEARANCE, UnknownDetector
from crystalscope.unknown.structure import (
    CONTRAST_SCALES,
    OCTAVES,
    contrast_layout,
    scale_profile,
)


def _particle() -> np.ndarray:
    """One bright disc of radius 14 on an even, lightly noisy window (96 px)."""
    yy, xx = np.mgrid[0:96, 0:96]
    window = 100 + np.random.default_rng(0).normal(0, 1, (96, 96))
    return window + 80 * (np.hypot(yy - 40, xx - 52) < 14)


def test_octaves_hold_the_detail_where_it_is() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(100, 20, (96, 96))
    yy, xx = np.mgrid[0:96, 0:96]
    broad = 100 + 60 * np.exp(-(np.hypot(yy - 48, xx - 48) / 20) ** 2)
    fine, coarse = np.exp(scale_profile(noise)), np.exp(scale_profile(broad))
    assert fine.shape == coarse.shape == (len(OCTAVES),)
    np.testing.assert_allclose([fine.sum(), coarse.sum()], 1.0, rtol=1e-6)  # shares
    assert fine[0] > 0.5 and fine.argmax() == 0  # pixel noise: the finest octave
    assert coarse[:2].sum() < 0.01 and coarse.argmax() >= 3  # a broad blob: the coarse ones
    assert np.isfinite(scale_profile(np.full((96, 96), 80.0))).all()  # a flat crop


def test_one_particle_has_uneven_contrast_a_texture_even() -> None:
    particle = contrast_layout(_particle())
    texture = contrast_layout(np.random.default_rng(2).normal(100, 20, (96, 96)))
    assert particle.shape == texture.shape == (len(CONTRAST_SCALES),)
    assert (particle > 0.8).all() and (texture < 0.3).all()
    assert (particle > 4 * texture).all()
    np.testing.assert_allclose(contrast_layout(np.full((96, 96), 80.0)), 0.0, atol=1e-9)


def test_brightness_contrast_and_turns_leave_them() -> None:
    crop = _particle()
    profile, layout = scale_profile(crop), contrast_layout(crop)
    for changed in (2.0 * crop - 40, crop + 30, np.rot90(crop), crop[::-1]):
        changed = np.ascontiguousarray(changed)
        np.testing.assert_allclose(scale_profile(changed), profile, atol=1e-6)
        np.testing.assert_allclose(contrast_layout(changed), layout, rtol=2e-3)


def test_a_bank_of_the_ringed_descriptor_scores_as_before() -> None:
    # A model exported with RINGED_SIZE numbers a crop keeps its scores: the detector describes
    # new crops with those, and they are the first numbers of today's descriptor, unchanged.
    rng = np.random.default_rng(3)
    crops = np.repeat(rng.integers(60, 200, (12, 1, 48, 48), dtype=np.uint8), 3, axis=1)
    full, ringed = appearance(crops), appearance(crops, RINGED_SIZE)
    assert full.shape[1] > RINGED_SIZE
    np.testing.assert_array_equal(full[:, :RINGED_SIZE], ringed)
    old = AppearanceNeighbours.fit(ringed[:8], k=2, whiten=False)
    detector = UnknownDetector(stage_sizes=[], distances=[], center=np.zeros(1),
                               scale=np.ones(1), threshold=1.0, target_false_reject=0.01,
                               method=APPEARANCE, appearance=old)
    scores, _ = detector.assess(crops[8:], np.zeros((4, 1)), np.full((4, 2), 0.5))
    np.testing.assert_allclose(scores, old(ringed[8:]))
