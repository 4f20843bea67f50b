"""The image-quality gate: is there a usable crystal in the crop at all?

A probe produces crops that are not crystals of any kind: an empty window (nothing in front of
the probe), a defocused one, a saturated flare. The novelty score (``unknown/scores.py``)
answers "is this crystal unlike the training ones?"; this gate answers the question before it,
with measurements a probe engineer recognises, each on the crop as the network sees it
(grayscale mean of the decoded (3, S, S) input, brought down to ``MEASURE_SIDE`` pixels when S
is larger, so that the gradients mean the same at any input size):

- ``edges``: the share of pixels on an edge (gradient steeper than ``EDGE_STEP`` gray levels
  per pixel) — a particle present. An empty window has almost none; a crop with none at all is
  empty whatever the limit.
- ``focus``: the steepest gradients (99th percentile) over the intensity range they span —
  sharpness, independent of brightness and contrast. Defocus flattens it.
- ``saturated``: the share of pixels at ``SATURATED`` or above. PG agglomerates are often
  bright, so its limit comes from the training crops too.
- ``border``: the share of the border ring on an edge (reported, never a reason: CEX needle
  fields always reach the border).

Each limit is an order statistic of the training crops, chosen as a conformal bound: the k-th
smallest (largest for ``saturated``) of n, k = floor((n + 1) q) with q = ``GATE_QUANTILE``, so a
new crop like the training ones fails it with probability at most k/(n+1) <= q; with fewer
than 1/q training crops a limit is left out rather than guessed. Stored with the detector
(model.json) and reported.

Cost: ``measure`` is O(N S^2) time with one crop in flight (memory O(S^2) plus the (N, 4)
result; ``tests/test_quality.py`` bounds it): 1,760 crops/s at 96 px (1,010 at 224) on the
2-core build machine, so 10^6 crops take about 10 minutes (17 at 224); ``QualityGate.fit``
sorts each measure, 0.04 s for 10^6 crops; ``reasons`` is O(N), 0.7 s for 10^6
(``benchmarks/quality_gate.py --speed 2000``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

EDGE_STEP = 6.0  # gray levels per pixel (at MEASURE_SIDE): a particle's rim, not sensor noise
SATURATED = 250
GATE_QUANTILE = 0.002  # per limit: the three take at most 0.6% of in-distribution crops
MEASURE_SIDE = 96
MEASURES = ("edges", "focus", "saturated", "border")
# reason -> (measure, which side of its limit fails)
REASONS = {"empty": ("edges", "below"), "blurred": ("focus", "below"),
           "saturated": ("saturated", "above")}


def gray_at_measure_side(image: np.ndarray) -> np.ndarray:
    """(3, S, S) uint8 -> (s, s) float64 gray, s = min(S, ``MEASURE_SIDE``): the crop as the
    gate and the appearance score measure it, so their numbers mean the same at any size."""
    gray = image.astype(np.float64).mean(axis=0)
    if gray.shape[0] > MEASURE_SIDE:
        gray = np.asarray(Image.fromarray(gray.astype(np.float32)).resize(
            (MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.BOX), np.float64)
    return gray


def measure(images: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N, 4) float: ``MEASURES`` per image (see the module docs)."""
    images = np.asarray(images)
    rows = np.zeros((len(images), len(MEASURES)))
    for row, image in enumerate(images):
        gray = gray_at_measure_side(image)
        gradient = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) / 8
        on_edge = gradient > EDGE_STEP
        low, high = np.percentile(gray, [1, 99])
        ring = np.concatenate([on_edge[0], on_edge[-1], on_edge[1:-1, 0], on_edge[1:-1, -1]])
        rows[row] = (on_edge.mean(), np.percentile(gradient, 99) / max(high - low, 1.0),
                     (gray >= SATURATED).mean(), ring.mean())
    return rows


@dataclass(frozen=True)
class QualityGate:
    """Limits fitted on training crops; :meth:`reasons` names what a crop fails."""

    limits: dict[str, float | None]  # reason -> the limit of its measure (None: too few crops)
    fitted_on: int = 0

    @classmethod
    def fit(cls, measures: np.ndarray, quantile: float = GATE_QUANTILE) -> QualityGate:
        """Limits from the training crops' measures (``measure``'s rows): the k-th smallest
        (largest) value, k = floor((n + 1) quantile); none when k < 1 (too few crops)."""
        n = len(measures)
        k = int(np.floor((n + 1) * quantile))
        limits = {}
        for reason, (name, side) in REASONS.items():
            column = np.sort(measures[:, MEASURES.index(name)])
            limits[reason] = (None if k < 1 else
                              float(column[k - 1] if side == "below" else column[n - k]))
        return cls(limits=limits, fitted_on=n)

    def failed(self, measures: np.ndarray) -> np.ndarray:
        """(N, len(REASONS)) bool: which limit each crop fails."""
        columns = []
        for reason, (name, side) in REASONS.items():
            value, limit = measures[:, MEASURES.index(name)], self.limits[reason]
            failing = (np.zeros(len(measures), bool) if limit is None else
                       value < limit if side == "below" else value > limit)
            if reason == "empty":
                failing = failing | (value == 0)  # not one edge: nothing in the window
            columns.append(failing)
        return np.stack(columns, axis=1) if columns else np.zeros((len(measures), 0), bool)

    def reasons(self, measures: np.ndarray) -> list[str | None]:
        """The first reason each crop fails (in ``REASONS``' order), None when it passes."""
        names = list(REASONS)
        return [names[int(np.argmax(row))] if row.any() else None
                for row in self.failed(measures)]

    def describe(self) -> dict:
        return {"measures": list(MEASURES), "quantile": GATE_QUANTILE, "limits": self.limits,
                "fitted_on": self.fitted_on, "edge_step": EDGE_STEP, "saturated": SATURATED}

    @classmethod
    def from_description(cls, described: dict) -> QualityGate:
        return cls(limits={k: None if v is None else float(v)
                           for k, v in described["limits"].items()},
                   fitted_on=int(described.get("fitted_on", 0)))
