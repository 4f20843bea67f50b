import numpy as np
import pytest
from skimage.feature import local_binary_pattern

from crystalscope.synth.statistics import (
    as_gray,
    compare,
    image_statistics,
    lbp_histogram,
    spectrum_slope,
)


def _power_law_noise(side: int, slope: float, seed: int) -> np.ndarray:
    """Gray noise whose radial power falls as frequency ** slope."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1
    amplitude = radius ** (slope / 2)
    phase = np.exp(2j * np.pi * rng.uniform(size=(side, side)))
    field = np.real(np.fft.ifft2(amplitude * phase))
    return 128 + 40 * field / field.std()


@pytest.mark.parametrize("slope", [-1.0, -2.0, -3.0])
def test_spectrum_slope_recovers_a_known_power_law(slope: float) -> None:
    estimates = [spectrum_slope(_power_law_noise(128, slope, seed)) for seed in range(4)]
    assert abs(np.mean(estimates) - slope) < 0.25


def test_statistics_match_direct_computations() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 128)).astype(np.uint8)
    image[:10] = 255
    stats = image_statistics(image)
    gray = as_gray(image)
    assert stats["saturated"] == pytest.approx((gray >= 250).mean())
    assert stats["p50"] == pytest.approx(np.median(gray))
    codes = local_binary_pattern(gray.astype(np.uint8), 8, 1, method="uniform")
    assert stats["lbp_9"] == pytest.approx((codes == 9).mean())
    assert sum(stats[f"lbp_{k}"] for k in range(10)) == pytest.approx(1.0)
    flat = lbp_histogram(np.full((32, 32), 80.0))
    assert flat.argmax() == 8  # every neighbour >= centre: the all-ones uniform code


def test_compare_orders_by_gap_and_counts_coverage() -> None:
    synthetic = [{"a": float(v), "b": float(v)} for v in np.linspace(0, 1, 101)]
    real = [{"a": 0.5, "b": 3.0}, {"a": 0.6, "b": 0.5}]
    rows = compare(real, synthetic)
    assert [r["statistic"] for r in rows] == ["b", "a"]
    assert rows[0]["inside"] == 0.5 and rows[1]["inside"] == 1.0
