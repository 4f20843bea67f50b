"""Predict over any number of images in fixed-size batches: memory stays bounded.

Images are decoded a batch at a time (in threads: PIL releases the GIL while decoding),
squashed to the model's input size, run, and handed on; unreadable files come out as
:class:`Failure` in their place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalscope.data.images import ImageLoadError
from crystalscope.infer.predictor import Predictor
from crystalscope.model.spec import ModelSpec, decode


@dataclass
class ImageResult:
    """One image's prediction (and embedding and unknown score, when the model gives them)."""

    path: Path
    probabilities: np.ndarray
    embedding: np.ndarray | None
    width: int
    height: int
    unknown_score: float | None = None
    # empty, blurred, saturated or novel: why unknown (UnknownDetector.reasons decides)
    unknown_reason: str | None = None
    called: int | None = None  # the class index the model's decision rule calls

    @property
    def best(self) -> int:
        """The called class index: the operating point's call, else the most probable."""
        return int(self.probabilities.argmax()) if self.called is None else self.called

    @property
    def unknown(self) -> bool | None:
        """True when the image holds no usable crystal or one unlike the training ones (None:
        no detector)."""
        return None if self.unknown_score is None else self.unknown_reason is not None


@dataclass
class Failure:
    """An image that could not be read, and why."""

    path: Path
    reason: str


def _decode(job: tuple[Path, ModelSpec]) -> tuple[np.ndarray, int, int] | str:
    path, spec = job
    try:
        return decode(path, spec)
    except ImageLoadError as exc:
        return str(exc)


def predict_stream(predictor: Predictor, paths: Sequence[Path], *, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None
                   ) -> Iterator[ImageResult | Failure]:
    """Results in the order of ``paths``; at most two batches in memory at a time."""
    spec = predictor.spec
    chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        # The next batch decodes while this one runs through the model (one batch ahead, so
        # memory stays bounded).
        ahead = [pool.submit(_decode, (p, spec)) for p in chunks[0]] if chunks else []
        for number, chunk in enumerate(chunks):
            decoded = [future.result() for future in ahead]
            ahead = ([pool.submit(_decode, (p, spec)) for p in chunks[number + 1]]
                     if number + 1 < len(chunks) else [])
            good = [d for d in decoded if not isinstance(d, str)]
            if good:
                outputs = predictor.predict(np.stack([d[0] for d in good]))
                called = predictor.decide(outputs.probabilities)
            row = 0
            for path, item in zip(chunk, decoded, strict=True):
                if isinstance(item, str):
                    yield Failure(path, item)
                    continue
                yield ImageResult(
                    path, outputs.probabilities[row],
                    None if outputs.embeddings is None else outputs.embeddings[row],
                    item[1], item[2],
                    None if outputs.unknown_scores is None else float(outputs.unknown_scores[row]),
                    None if outputs.unknown_reasons is None else outputs.unknown_reasons[row],
                    int(called[row]))
                row += 1
            if progress:
                progress(len(chunk))
