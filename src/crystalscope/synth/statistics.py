"""Simple image statistics to compare synthetic crops with real ones, class by class.

Each crop is first squashed to ``side`` x ``side`` grey levels, as a model sees it, so sizes
do not dominate. The statistics: brightness percentiles, the saturated share, gradient energy,
the slope of the radial power spectrum (how fast detail falls off with frequency) and a
uniform local-binary-pattern histogram (texture).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.feature import local_binary_pattern

SATURATED = 250
LBP_POINTS = 8


def as_gray(image: np.ndarray | Image.Image, side: int = 128) -> np.ndarray:
    """A crop as (side, side) float grey levels 0-255 (bilinear squash)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return np.asarray(picture.convert("L").resize((side, side), Image.Resampling.BILINEAR),
                      np.float64)


def spectrum_slope(gray: np.ndarray) -> float:
    """Slope of log radial power against log frequency (natural images: about -2 to -3)."""
    centred = gray - gray.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(centred))) ** 2
    h, w = gray.shape
    yy, xx = np.indices((h, w))
    radius = np.hypot(yy - h // 2, xx - w // 2).astype(int)
    sums = np.bincount(radius.ravel(), power.ravel())
    counts = np.bincount(radius.ravel())
    frequencies = np.arange(2, min(h, w) // 2)
    radial = sums[frequencies] / counts[frequencies]
    return float(np.polyfit(np.log(frequencies), np.log(radial + 1e-12), 1)[0])


def lbp_histogram(gray: np.ndarray) -> np.ndarray:
    """Uniform LBP (8 neighbours, radius 1) histogram: ``LBP_POINTS + 2`` shares summing to 1."""
    codes = local_binary_pattern(gray.astype(np.uint8), LBP_POINTS, 1, method="uniform")
    counts = np.bincount(codes.astype(int).ravel(), minlength=LBP_POINTS + 2)
    return counts / counts.sum()


def image_statistics(image: np.ndarray | Image.Image, side: int = 128) -> dict[str, float]:
    """Named statistics of one crop (see the module's docstring)."""
    gray = as_gray(image, side)
    p5, p50, p95, p99 = np.percentile(gray, [5, 50, 95, 99])
    gradient = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) / 8
    stats = {"p5": p5, "p50": p50, "p95": p95, "p99": p99,
             "saturated": float((gray >= SATURATED).mean()), "std": gray.std(),
             "gradient_energy": float((gradient ** 2).mean()),
             "spectrum_slope": spectrum_slope(gray)}
    for k, share in enumerate(lbp_histogram(gray)):
        stats[f"lbp_{k}"] = float(share)
    return {name: float(value) for name, value in stats.items()}


def compare(real: list[dict[str, float]], synthetic: list[dict[str, float]]
            ) -> list[dict[str, float | str]]:
    """Per statistic: real and synthetic means, the gap in synthetic standard deviations, and
    the share of real crops inside the synthetic 1-99% range; largest gap first."""
    rows: list[dict[str, float | str]] = []
    for name in real[0]:
        r = np.array([s[name] for s in real])
        s = np.array([s[name] for s in synthetic])
        low, high = np.percentile(s, [1, 99])
        spread = max(float(s.std()), 1e-9)
        rows.append({"statistic": name, "real": float(r.mean()), "synthetic": float(s.mean()),
                     "gap_sd": float((r.mean() - s.mean()) / spread),
                     "inside": float(((r >= low) & (r <= high)).mean())})
    return sorted(rows, key=lambda row: -abs(float(row["gap_sd"])))
