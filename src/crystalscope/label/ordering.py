"""Which crop to label next: uncertainty (what the model is unsure of) mixed with diversity
(what is unlike everything labelled so far), so that the first hundred labels span the data.

All functions take plain numpy arrays; none needs a model or torch.
"""

from __future__ import annotations

import numpy as np


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, normalised to 0 (certain) .. 1 (uniform)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    return -(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])


def margin(probabilities: np.ndarray) -> np.ndarray:
    """Uncertainty from the margin: 1 - (top-1 minus top-2 probability); 1 = a tie."""
    p = np.sort(np.asarray(probabilities, dtype=np.float64), axis=1)
    return 1.0 - (p[:, -1] - p[:, -2])


BLOCK_BYTES = 64 * 2**20  # distance blocks of at most this size: bounded memory


class FarthestFirst:
    """Farthest-first traversal (Sener & Savarese 2018, "core set") that can be continued.

    Holds, per point, its distance to the nearest *placed* point (labelled, picked or
    otherwise put in order). ``place`` adds points; ``pick`` chooses the next ones. Cost:
    O(N x d) per placed or picked point, memory O(N) plus one block of at most
    ``BLOCK_BYTES``; never an N x N matrix. ``weights`` (>= 0) multiply the distances, so an
    uncertain point wins over an equally distant certain one.
    """

    def __init__(self, embeddings: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.x = np.asarray(embeddings, dtype=np.float64)
        n = len(self.x)
        self.weight = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        self.squared = (self.x ** 2).sum(1)
        self.nearest = np.full(n, np.inf)
        self.taken = np.zeros(n, dtype=bool)

    def place(self, indices: np.ndarray) -> None:
        """Mark these points as placed: distances start from them (in bounded blocks)."""
        indices = np.asarray(indices, dtype=np.int64)
        indices = indices[~self.taken[indices]]
        if not len(indices):
            return
        self.taken[indices] = True
        step = max(1, BLOCK_BYTES // (8 * max(1, len(self.x))))
        for start in range(0, len(indices), step):
            block = indices[start:start + step]
            d2 = (self.squared[:, None] + self.squared[block][None]
                  - 2 * self.x @ self.x[block].T)
            self.nearest = np.minimum(self.nearest, np.sqrt(np.maximum(d2, 0)).min(1))

    def _take(self, index: int) -> None:
        self.taken[index] = True
        self.nearest = np.minimum(self.nearest,
                                  np.sqrt(((self.x - self.x[index]) ** 2).sum(1)))

    def pick(self, count: int) -> list[int]:
        """The next ``count`` points (fewer if fewer are left), each the farthest from every
        point placed or picked before it; with nothing placed, the first is nearest the
        mean."""
        picks: list[int] = []
        count = min(count, int((~self.taken).sum()))
        if count > 0 and not self.taken.any():
            first = int(np.argmin(((self.x - self.x.mean(0)) ** 2).sum(1)))
            picks.append(first)
            self._take(first)
        while len(picks) < count:
            score = np.where(self.taken, -np.inf, self.nearest * self.weight)
            pick = int(np.argmax(score))
            picks.append(pick)
            self._take(pick)
        return picks


def k_center_greedy(embeddings: np.ndarray, count: int, *, labelled: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> list[int]:
    """Farthest-first traversal: ``count`` indices, each the point farthest (Euclidean) from
    everything labelled or picked before it (see :class:`FarthestFirst`).

    ``labelled``: indices already labelled (never picked; distances start from them). With
    none, the first pick is the point nearest the mean. Cost O((labelled + count) x N x d).
    """
    traversal = FarthestFirst(embeddings, weights)
    if labelled is not None and len(labelled):
        traversal.place(labelled)
    return traversal.pick(count)


def uncertainty_weights(probabilities: np.ndarray | None) -> np.ndarray | None:
    """Diversity weights from the margin uncertainty: 0.25 for a sure crop .. 1.25 for a tie."""
    return None if probabilities is None else 0.25 + margin(probabilities)


def active_order(embeddings: np.ndarray, probabilities: np.ndarray | None = None, *,
                 labelled: np.ndarray | None = None, count: int | None = None) -> list[int]:
    """The order to label in: diversity alone without a model; with one, diversity weighted by
    the margin uncertainty (weight 0.25 for a sure crop .. 1.25 for a tie), so both count."""
    weights = uncertainty_weights(probabilities)
    n = len(embeddings) - (0 if labelled is None else len(labelled))
    return k_center_greedy(embeddings, n if count is None else count, labelled=labelled,
                           weights=weights)
