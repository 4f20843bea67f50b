"""The appearance novelty score: is this crystal unlike the training crops, as a picture?

Chosen over scores from the network's own features by measuring (``benchmarks/unknown.py``,
3 seeds): a network trained to tell CEX from PG keeps what separates the two and discards
what a bubble, a cube or a photograph differs in, so its features rank those no better than
0.6–0.9 AUROC; a descriptor of the picture itself ranks them 0.85–0.99.

The descriptor (:func:`appearance`, ``DESCRIPTOR_SIZE`` numbers per crop, each on the crop as
the network sees it, brought down to ``MEASURE_SIDE`` pixels like the quality gate's
measures, and all invariant to rotation since crystals lie at every angle):

- texture: rotation-invariant uniform local binary patterns at radius 1 (8 neighbours) and
  radius 3 (16): the share of each pattern (edges, corners, flat spots, line ends);
- brightness: the 10th, 50th and 90th percentiles within the crop's 1–99% range, the median
  and that range itself;
- edges: the share of pixels steeper than 3, 6, 12 and 24 gray levels per pixel;
- sharpness: the 50th, 90th and 99th percentile of the gradient over the range, and the
  mean absolute Laplacian of the lightly smoothed crop over the range;
- rings: log(1 + the crop's dark-centred radial symmetry), a round ring around a darker middle
  as a gas bubble shows (:mod:`crystalscope.unknown.symmetry`);
- scales and layout: each octave's share of the detail energy, and how uneven the local
  contrast is at four window sizes (:mod:`crystalscope.unknown.structure`): a photograph's
  detail sits at other scales and its contrast spreads over the frame in other ways.

Numbers were added at the end after the first exports (the rings, then scales and layout): a
bank stored with ``RINGLESS_SIZE`` or ``RINGED_SIZE`` numbers per crop is scored on those
(:class:`AppearanceNeighbours` reads its width), so an older model keeps its scores.

The score (:class:`AppearanceNeighbours`): the Euclidean distance to the ``K``-th nearest
crop of the bank (deep nearest neighbours, Sun et al. 2022, on the picture's descriptor), in
the bank's whitened space: each number standardised, then turned and scaled so that the bank's
covariance (Ledoit–Wolf shrunk) is the identity — the distance is the Mahalanobis distance, so
twenty texture numbers that move together count as one. Chosen by measuring
(``benchmarks/unknown.py``): photographs flagged 51% → 92% with the calibration below, at the
same false-reject rate. Banks stored before the whitening (``k`` 5) are read as they were.

The calibration (:meth:`AppearanceNeighbours.leave_one_out`): every bank crop's distance to
the others, its own copies (the same descriptor: a crop turned or mirrored) left out — a
leave-one-out (jackknife) score that is exchangeable with a new crop's, so the training and
validation crops in the bank all set the threshold, not only the validation split.

Cost: :func:`appearance` is O(S^2) per crop with one crop in flight (17.5 ms at 96 px on the
2-core build machine, one core, of which about 6.5 ms are the scales and layout and 2-3 ms
the rings: 10^6 crops take about 4.9 hours on one core; an older bank's shorter descriptor
skips what it lacks); the kNN against a full 20,000-crop bank adds 0.24 ms a crop, 4 minutes
for 10^6 — ``benchmarks/quality_gate.py
--speed``; ``tests/test_appearance.py`` bounds the memory). The bank holds at most
``BANK_LIMIT`` training crops (evenly spread when there are more), so a score is
O(min(N_train, BANK_LIMIT) · D) per crop whatever the training split's size, computed ``CHUNK``
crops at a time (memory O(CHUNK · bank)); :meth:`AppearanceNeighbours.leave_one_out` is
O(B^2 · D), 4.6 s for a full bank (``benchmarks/quality_gate.py --speed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import local_binary_pattern
from sklearn.covariance import LedoitWolf

from crystalscope.unknown.quality import gray_at_measure_side
from crystalscope.unknown.structure import (
    CONTRAST_LAYOUT_SIZE,
    SCALE_PROFILE_SIZE,
    contrast_layout,
    scale_profile,
)
from crystalscope.unknown.symmetry import dark_centre_symmetry

K = 1  # the nearest: measured best at 1 (photographs 92%), 2 (89%), 3 (86%), 5 (80%)
BANK_LIMIT = 20_000  # crops kept: 20,000 x 51 float32 = 4.1 MB beside the model
COPY_DISTANCE = 0.05  # whitened units (a typical nearest neighbour is 3-8): a copy, left out
CHUNK = 256  # crops scored at once: a (CHUNK, bank) distance block, 20 MB at the limit
LBP_RINGS = ((8, 1), (16, 3))  # (neighbours, radius)
EDGE_STEPS = (3.0, 6.0, 12.0, 24.0)
RINGLESS_SIZE = sum(p + 2 for p, _ in LBP_RINGS) + 5 + len(EDGE_STEPS) + 4  # the first exports
RINGED_SIZE = RINGLESS_SIZE + 1  # exports of 2026-12-01
DESCRIPTOR_SIZE = RINGED_SIZE + SCALE_PROFILE_SIZE + CONTRAST_LAYOUT_SIZE
SIZES = (RINGLESS_SIZE, RINGED_SIZE, DESCRIPTOR_SIZE)  # each a prefix of the next


def appearance(images: np.ndarray, size: int = DESCRIPTOR_SIZE) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N, ``size``) float: the module's descriptor per crop, one crop in
    flight; a smaller ``size`` of ``SIZES`` is an older bank's descriptor (its first numbers)."""
    if size not in SIZES:
        raise ValueError(f"an appearance descriptor has {', '.join(map(str, SIZES))} numbers, "
                         f"not {size}")
    images = np.asarray(images)
    rows = np.zeros((len(images), size))
    for row, image in enumerate(images):
        gray = gray_at_measure_side(image)
        as_bytes = np.clip(gray, 0, 255).astype(np.uint8)
        texture = []
        for neighbours, radius in LBP_RINGS:
            codes = local_binary_pattern(as_bytes, neighbours, radius, "uniform").astype(int)
            texture.append(np.bincount(codes.ravel(), minlength=neighbours + 2) / codes.size)
        low, p10, p50, p90, high = np.percentile(gray, [1, 10, 50, 90, 99])
        spread = max(high - low, 1.0)
        gradient = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) / 8
        laplacian = ndimage.laplace(ndimage.gaussian_filter(gray, 1.5))
        rows[row, :RINGLESS_SIZE] = np.concatenate([
            *texture,
            [(p10 - low) / spread, (p50 - low) / spread, (p90 - low) / spread, p50 / 255,
             spread / 255],
            [np.mean(gradient > step) for step in EDGE_STEPS],
            np.percentile(gradient, [50, 90, 99]) / spread,
            [np.abs(laplacian).mean() / spread]])
        if size > RINGLESS_SIZE:
            rows[row, RINGLESS_SIZE] = np.log1p(dark_centre_symmetry(gray))
        if size > RINGED_SIZE:
            rows[row, RINGED_SIZE:] = np.concatenate([scale_profile(gray),
                                                      contrast_layout(gray, spread)])
    return rows


def bank_rows(n: int, limit: int = BANK_LIMIT) -> np.ndarray:
    """The rows of ``n`` crops that make a bank: all of them up to ``limit``, else ``limit``
    evenly spread ones. O(limit)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


@dataclass
class AppearanceNeighbours:
    """Distance to the ``k``-th nearest bank crop in whitened descriptor space."""

    mean: np.ndarray  # (D,) the bank descriptors' mean
    spread: np.ndarray  # (D,) their standard deviation (a constant number: 1)
    bank: np.ndarray  # (B, D) whitened bank descriptors, B <= BANK_LIMIT
    k: int = K
    whitening: np.ndarray | None = None  # (D, D); None: standardised only (earlier banks)

    @classmethod
    def fit(cls, descriptors: np.ndarray, k: int = K, limit: int = BANK_LIMIT,
            whiten: bool = True) -> AppearanceNeighbours:
        """The bank from descriptors (N, D): all of them up to ``limit``, else ``limit``
        evenly spread ones (:func:`bank_rows`); whitened with their Ledoit–Wolf covariance
        when there are more crops than numbers (O(N · D^2))."""
        descriptors = np.asarray(descriptors, np.float64)[bank_rows(len(descriptors), limit)]
        mean, spread = descriptors.mean(axis=0), descriptors.std(axis=0)
        spread = np.where(spread > 1e-9, spread, 1.0)
        standardised = (descriptors - mean) / spread
        whitening = None
        if whiten and len(descriptors) > descriptors.shape[1]:
            values, vectors = np.linalg.eigh(LedoitWolf().fit(standardised).covariance_)
            whitening = vectors / np.sqrt(np.maximum(values, 1e-9 * values.max()))
            standardised = standardised @ whitening
        return cls(mean=mean, spread=spread, bank=standardised.astype(np.float32),
                   k=min(k, len(descriptors)), whitening=whitening)

    @property
    def width(self) -> int:
        """D: the numbers per crop the bank was fitted on (``appearance``'s ``size``)."""
        return int(self.mean.shape[0])

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, D) descriptors in the bank's space: standardised, then whitened."""
        projected = (np.asarray(descriptors, np.float64) - self.mean) / self.spread
        return projected if self.whitening is None else projected @ self.whitening

    def __call__(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) distance to the k-th nearest bank row; O(N · B · D) time,
        O(``CHUNK`` · B) memory."""
        return self._kth(self.project(descriptors), self.k)

    def leave_one_out(self, groups: np.ndarray | None = None) -> np.ndarray:
        """(B,) each bank row's distance to its k-th nearest other row, its copies left out —
        the score a new crop would get, for calibration. Copies: rows within
        ``COPY_DISTANCE`` (the same descriptor), and rows of the same ``groups`` id (B,) when
        given (:func:`crystalscope.unknown.detector.copy_groups`: the same crop turned,
        mirrored or re-saved, whose descriptor differs a little). A row with fewer than k
        others: +inf. O(B^2 · D) time, O(``CHUNK`` · B) memory."""
        return self._kth(self.bank.astype(np.float64), self.k, leave_copies=True,
                         groups=groups)

    def _kth(self, queries: np.ndarray, k: int, leave_copies: bool = False,
             groups: np.ndarray | None = None) -> np.ndarray:
        bank = self.bank.astype(np.float64)
        bank_norms = np.sum(bank ** 2, axis=1)
        out = np.empty(len(queries))
        for start in range(0, len(queries), CHUNK):
            q = queries[start:start + CHUNK]
            squared = np.maximum(np.sum(q ** 2, axis=1)[:, None] + bank_norms[None]
                                 - 2 * q @ bank.T, 0.0)
            if leave_copies:
                squared[squared <= COPY_DISTANCE ** 2] = np.inf
            if groups is not None:  # the queries are the bank's rows themselves
                squared[groups[start:start + CHUNK, None] == groups[None]] = np.inf
            if k > squared.shape[1]:
                out[start:start + CHUNK] = np.inf
                continue
            out[start:start + CHUNK] = np.sqrt(np.partition(squared, k - 1, axis=1)[:, k - 1])
        return out

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}.mean": self.mean.astype(np.float64),
                  f"{prefix}.spread": self.spread.astype(np.float64),
                  f"{prefix}.bank": self.bank.astype(np.float32)}
        if self.whitening is not None:
            arrays[f"{prefix}.whitening"] = self.whitening.astype(np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, k: int
                    ) -> AppearanceNeighbours:
        whitening = arrays.get(f"{prefix}.whitening")
        return cls(mean=np.asarray(arrays[f"{prefix}.mean"], np.float64),
                   spread=np.asarray(arrays[f"{prefix}.spread"], np.float64),
                   bank=np.asarray(arrays[f"{prefix}.bank"], np.float32), k=k,
                   whitening=None if whitening is None else np.asarray(whitening, np.float64))
