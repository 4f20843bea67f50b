"""What the labelling order is computed from: a model's probabilities and embeddings, or,
without a model, the crops' own pixels (works offline, no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from crystalscope.data.images import load_image

if TYPE_CHECKING:
    from crystalscope.infer.predictor import Predictor

@dataclass
class Scores:
    """What ordering and the page know about each crop (rows follow the session's crops)."""

    embeddings: np.ndarray
    probabilities: np.ndarray | None = None  # columns: ``classes``, the model's own order
    note: str = ""
    classes: list[str] = field(default_factory=list)


ORDER_DIMENSIONS = 32  # principal components the distances are measured in
THUMBNAIL = 16


def pixel_row(image: Image.Image) -> np.ndarray:
    """One crop's pixel features: a 16x16 grey thumbnail and a 16-bin brightness histogram."""
    gray = image.convert("L")
    small = np.asarray(gray.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX),
                       np.float32).ravel() / 255
    histogram = np.histogram(np.asarray(gray), bins=16, range=(0, 256))[0]
    return np.concatenate([small, 4 * histogram / max(histogram.sum(), 1)]).astype(np.float32)


def standardise(rows: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Columns to mean 0 and standard deviation 1."""
    x = np.asarray(rows, np.float64)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def pixel_embeddings(paths: list[Path]) -> np.ndarray:
    """Per crop: :func:`pixel_row`, standardised over the crops."""
    return standardise([pixel_row(load_image(p, warn_on_mismatch=False)) for p in paths])


@dataclass
class CropScan:
    """One file read once for labelling: its hash and pixel features, or why it is unreadable."""

    sha256: str = ""
    pixels: np.ndarray | None = None
    error: str | None = None


def scan_crop(path: Path) -> CropScan:
    """Read one crop (module-level: runs in worker processes)."""
    from crystalscope.data.dedupe import file_sha256
    from crystalscope.data.images import ImageLoadError

    try:
        image = load_image(path, warn_on_mismatch=False)
    except ImageLoadError as exc:
        return CropScan(error=str(exc))
    return CropScan(sha256=file_sha256(path), pixels=pixel_row(image))


def principal_components(x: np.ndarray, dimensions: int = ORDER_DIMENSIONS) -> np.ndarray:
    """``x`` centred and projected on its first principal components (fewer when fewer rows)."""
    from sklearn.decomposition import PCA

    if min(x.shape) <= dimensions:
        return x - x.mean(0)
    return PCA(n_components=dimensions, svd_solver="full").fit_transform(x)


def score_crops(paths: list[Path], predictor: Predictor | None,
                pixels: np.ndarray | None = None) -> Scores:
    """Embeddings (reduced for distances) and, with a model, its class probabilities.

    ``pixels``: the crops' :func:`pixel_row` features when already read (one pass per file).
    """
    if pixels is None and (predictor is None):
        pixels = pixel_embeddings(paths)
    if predictor is None:
        return Scores(principal_components(standardise(pixels)),
                      note="no --model: ordered by diversity of the crops' own pixels "
                           "(thumbnails and brightness); give --model RUN to put first what "
                           "a model is unsure of")
    from crystalscope.infer.stream import Failure, predict_stream

    probabilities, embeddings = [], []
    for item in predict_stream(predictor, paths):
        if isinstance(item, Failure):  # unreadable after all: neutral scores
            probabilities.append(np.full(len(predictor.classes), 1 / len(predictor.classes)))
            embeddings.append(None)
            continue
        probabilities.append(item.probabilities)
        embeddings.append(item.embedding)
    if any(e is None for e in embeddings):
        x = pixel_embeddings(paths) if pixels is None else standardise(pixels)
        note = "model guesses shown; ordered by its uncertainty and the crops' pixels"
    else:
        x = np.asarray(embeddings, np.float64)
        note = ("ordered by what the model is unsure of (margin) and by diversity of its "
                "embeddings")
    return Scores(principal_components(x), np.asarray(probabilities, np.float64), note,
                  list(predictor.classes))
