"""Embeddings -> a 2-D map (PCA) -> clusters (k-means), and what each cluster holds.

Embeddings are L2-normalised first, so distances on the map follow the cosine geometry that
`similar` uses. k-means runs on the 2-D map the user sees; ``k="auto"`` picks the k with the
best silhouette. Everything is seeded: the same input and seed give the same map.

Cost: randomised PCA, O(N x d) time and one float32 copy of the embeddings; k-means on the
2-D map, O(N x k) per iteration (MiniBatch k-means from ``MINIBATCH_FROM`` points on); the
silhouette on a sample of at most ``SILHOUETTE_SAMPLE`` points. ``benchmarks/scale.py``
measures it at 10^4 and 10^5 embeddings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from crystalscope.errors import UserError
from crystalscope.infer.predictor import Predictor
from crystalscope.infer.stream import Failure, predict_stream
from crystalscope.vectors.store import VectorStore

AUTO_K_RANGE = range(2, 9)
SILHOUETTE_SAMPLE = 5000  # silhouette costs N^2: above this, a seeded sample of points
MINIBATCH_FROM = 20_000  # points: from here on, MiniBatch k-means (same clusters, far less time)


@dataclass
class Points:
    """Images with their embeddings and what the model (and the folders) say of them."""

    paths: list[str]
    embeddings: np.ndarray
    classes: list[str]
    predicted: list[str]
    probability: np.ndarray  # of the predicted class
    true: list[str | None]

    def label(self, index: int) -> str:
        """The true class when known, else the predicted one (for colours and purity)."""
        return self.true[index] or self.predicted[index]


def points_from_images(predictor: Predictor, files: list[Path],
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[Points, list[Failure]]:
    """Embed image files with the model (unreadable ones are returned as failures)."""
    if not predictor.has_embedding:
        raise UserError(f"{predictor.source}: gives no embedding output; explore needs a "
                        "crystalscope model")
    rows, failures = [], []
    for item in predict_stream(predictor, files, progress=progress):
        if isinstance(item, Failure):
            failures.append(item)
        else:
            rows.append(item)
    classes = predictor.classes
    best = [int(r.probabilities.argmax()) for r in rows]
    return Points(
        paths=[str(r.path) for r in rows],
        embeddings=np.stack([r.embedding for r in rows]) if rows else np.zeros((0, 1)),
        classes=list(classes), predicted=[classes[b] for b in best],
        probability=np.array([r.probabilities[b] for r, b in zip(rows, best, strict=True)]),
        true=[r.path.parent.name if r.path.parent.name in classes else None for r in rows],
    ), failures


def points_from_store(store: VectorStore) -> Points:
    """Every record of a vector store."""
    records = list(store.records())
    if not records:
        raise UserError("the store is empty; fill it first: crystalscope index MODEL IMAGES")
    classes = sorted({c for r in records for c in r.probabilities})
    return Points(paths=[r.path for r in records],
                  embeddings=np.stack([r.vector for r in records]), classes=classes,
                  predicted=[r.predicted for r in records],
                  probability=np.array([r.probabilities.get(r.predicted, np.nan)
                                        for r in records]),
                  true=[r.true_class for r in records])


@dataclass
class Projection:
    """The 2-D map and its clusters."""

    coords: np.ndarray  # (N, 2)
    explained: np.ndarray  # share of variance on each axis
    labels: np.ndarray  # cluster per point
    centroids: np.ndarray  # (k, 2)
    silhouette: float | None

    @property
    def k(self) -> int:
        return len(self.centroids)


def _kmeans(coords: np.ndarray, k: int, seed: int) -> KMeans | MiniBatchKMeans:
    if len(coords) >= MINIBATCH_FROM:
        return MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=4096,
                               random_state=seed).fit(coords)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(coords)


def _silhouette(coords: np.ndarray, labels: np.ndarray, seed: int) -> float:
    sample = SILHOUETTE_SAMPLE if len(coords) > SILHOUETTE_SAMPLE else None
    return float(silhouette_score(coords, labels, sample_size=sample, random_state=seed))


def project(embeddings: np.ndarray, *, k: int | str = 4, seed: int = 0) -> Projection:
    """PCA to 2-D, then k-means (``k`` clusters, or ``"auto"`` by silhouette)."""
    n = len(embeddings)
    if n < 3:
        raise UserError(f"explore needs at least 3 images, got {n}")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    solver = "randomized" if min(unit.shape) > 10 else "full"
    pca = PCA(n_components=2, svd_solver=solver, random_state=seed)
    coords = pca.fit_transform(unit)
    if k == "auto":
        candidates = [c for c in AUTO_K_RANGE if c < n]
        scores = {c: _silhouette(coords, _kmeans(coords, c, seed).labels_, seed)
                  for c in candidates}
        k = max(scores, key=lambda c: scores[c])
    if not isinstance(k, int) or not 1 <= k < n:
        raise UserError(f"--k {k}: give a number of clusters from 1 to {n - 1}, or auto")
    model = _kmeans(coords, k, seed)
    silhouette = (_silhouette(coords, model.labels_, seed)
                  if k > 1 and len(set(model.labels_)) > 1 else None)
    return Projection(coords=coords, explained=pca.explained_variance_ratio_,
                      labels=model.labels_, centroids=model.cluster_centers_,
                      silhouette=silhouette)


def summarize_clusters(points: Points, projection: Projection, nearest: int = 3
                       ) -> list[dict]:
    """Per cluster: size, class composition, purity, and the images nearest its centroid."""
    summary = []
    for cluster in range(projection.k):
        members = np.flatnonzero(projection.labels == cluster)
        counts = Counter(points.label(i) for i in members)
        distance = np.linalg.norm(projection.coords[members] - projection.centroids[cluster],
                                  axis=1)
        summary.append({
            "cluster": cluster, "size": len(members),
            "composition": dict(sorted(counts.items())),
            "purity": max(counts.values()) / len(members) if len(members) else 0.0,
            "majority": counts.most_common(1)[0][0] if counts else None,
            "nearest_to_centroid": [points.paths[i] for i in members[np.argsort(distance)]
                                    [:nearest]],
        })
    return summary
