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


def k_center_greedy(embeddings: np.ndarray, count: int, *, labelled: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> list[int]:
    """Farthest-first traversal: ``count`` indices, each the point farthest (Euclidean) from
    everything labelled or picked before it (Sener & Savarese 2018, "core set").

    ``labelled``: indices already labelled (never picked; distances start from them). With
    none, the first pick is the point nearest the mean. ``weights`` (>= 0) multiply the
    distances, so an uncertain point wins over an equally distant certain one.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    count = min(count, n - (0 if labelled is None else len(labelled)))
    if count <= 0:
        return []
    weight = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    nearest = np.full(n, np.inf)
    taken = np.zeros(n, dtype=bool)
    if labelled is not None and len(labelled):
        taken[labelled] = True
        squared = (x ** 2).sum(1)
        for start in range(0, len(labelled), 256):  # in chunks: bounded memory
            block = x[labelled[start:start + 256]]
            d2 = squared[:, None] + (block ** 2).sum(1)[None] - 2 * x @ block.T
            nearest = np.minimum(nearest, np.sqrt(np.maximum(d2, 0)).min(1))
    picks: list[int] = []
    if not taken.any():
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
        picks.append(first)
        taken[first] = True
        nearest = np.minimum(nearest, np.sqrt(((x - x[first]) ** 2).sum(1)))
    while len(picks) < count:
        score = np.where(taken, -np.inf, nearest * weight)
        pick = int(np.argmax(score))
        picks.append(pick)
        taken[pick] = True
        nearest = np.minimum(nearest, np.sqrt(((x - x[pick]) ** 2).sum(1)))
    return picks


def active_order(embeddings: np.ndarray, probabilities: np.ndarray | None = None, *,
                 labelled: np.ndarray | None = None, count: int | None = None) -> list[int]:
    """The order to label in: diversity alone without a model; with one, diversity weighted by
    the margin uncertainty (weight 0.25 for a sure crop .. 1.25 for a tie), so both count."""
    weights = None if probabilities is None else 0.25 + margin(probabilities)
    n = len(embeddings) - (0 if labelled is None else len(labelled))
    return k_center_greedy(embeddings, n if count is None else count, labelled=labelled,
                           weights=weights)
