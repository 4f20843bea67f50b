"""The pieces an unknown-image score is made of.

- :class:`GaussianDistance`: the Mahalanobis distance of a feature vector to the nearest class
  of the training set (class means, one shared covariance — Lee et al., 2018), measured in the
  leading principal components so that it stays well-conditioned and small to store; and the
  residual, the part of the vector outside those components (where the training set never
  varied — with fewer images than features, many directions).
- :func:`max_softmax_score`: 1 − the largest class probability (Hendrycks & Gimpel, 2017).
- :func:`knn_distance`: cosine distance to the k-th nearest training embedding (Sun et al.,
  2022) — measured as an alternative in ``benchmarks/unknown.py``, not used by the detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_COMPONENTS = 256


@dataclass
class GaussianDistance:
    """Class-conditional Gaussians with a shared covariance, in a principal subspace."""

    origin: np.ndarray  # (D,) the mean of the class-centred training features
    components: np.ndarray  # (K, D) principal directions of the class-centred features
    variances: np.ndarray  # (K,) variance along each direction
    class_means: np.ndarray  # (C, K) class means, in the subspace

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray,
            max_components: int = MAX_COMPONENTS) -> GaussianDistance:
        """Fit on training features (N, D) with class indices (N,)."""
        features = np.asarray(features, np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        origin = centred.mean(axis=0)
        _, singular, vt = np.linalg.svd(centred - origin, full_matrices=False)
        keep = min(max_components, len(features) - len(classes), vt.shape[0])
        variances = singular[:keep] ** 2 / max(len(features) - len(classes), 1)
        floor = max(float(variances.max(initial=0.0)) * 1e-6, 1e-12)
        kept = variances > floor  # directions with (numerically) no spread carry no evidence
        components = vt[:keep][kept]
        return cls(origin=origin, components=components, variances=variances[kept],
                   class_means=(means - origin) @ components.T)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Distance of each row of ``features`` (N, D) to the nearest class mean."""
        projected = (np.asarray(features, np.float64) - self.origin) @ self.components.T
        squared = [np.sum((projected - mean) ** 2 / self.variances, axis=1)
                   for mean in self.class_means]
        return np.sqrt(np.min(squared, axis=0))

    def residual(self, features: np.ndarray) -> np.ndarray:
        """Length of the part of each row outside the principal subspace: how far it lies
        from every direction in which the training features varied."""
        centred = np.asarray(features, np.float64) - self.origin
        inside = (centred @ self.components.T) @ self.components
        return np.linalg.norm(centred - inside, axis=1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{name}": np.asarray(getattr(self, name), np.float32)
                for name in ("origin", "components", "variances", "class_means")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> GaussianDistance:
        return cls(**{name: np.asarray(arrays[f"{prefix}.{name}"], np.float64)
                      for name in ("origin", "components", "variances", "class_means")})


def max_softmax_score(probabilities: np.ndarray) -> np.ndarray:
    """1 − the largest class probability: high when the model cannot decide."""
    return 1.0 - np.asarray(probabilities, np.float64).max(axis=1)


def knn_distance(bank: np.ndarray, queries: np.ndarray, k: int = 5) -> np.ndarray:
    """Cosine distance from each query to its k-th nearest row of ``bank`` (both L2-normalised
    here), computed exactly."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    similarity = unit(queries) @ unit(bank).T
    k = min(k, similarity.shape[1])
    return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]
