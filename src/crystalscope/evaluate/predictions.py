"""Run a model over a labelled folder: one probability vector per readable image.

DATA is a split folder (its ``test/`` is used) or any folder of class sub-folders. Its class
names must be among the model's; a class the model does not know is an error, not a silent
relabelling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crystalscope.data.decoded import build_cache
from crystalscope.data.layout import is_image_name, read_class_folders, split_path
from crystalscope.errors import UserError
from crystalscope.model.inference import InferenceNet, run_batches

if TYPE_CHECKING:
    from crystalscope.operating_point import OperatingPoint


@dataclass
class Predictions:
    """Truth and predicted probabilities for the images of one labelled folder."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # (N,) true class indices
    probabilities: np.ndarray  # (N, C)
    skipped: list[str]
    operating_point: OperatingPoint | None = None  # the model's threshold, if it has one

    @property
    def predicted(self) -> np.ndarray:
        """The called classes: the most probable, or as the operating point decides."""
        if self.operating_point is not None:
            return self.operating_point.decide(self.probabilities)
        return self.probabilities.argmax(axis=1)


def labelled_images(data: Path, classes: list[str]) -> tuple[Path, list[tuple[Path, int]]]:
    """The (path, class index) pairs of ``data`` (``data/test`` when it is a split folder)."""
    data = Path(data)
    if split_path(data, "test").is_dir():
        data = split_path(data, "test")
    folders = read_class_folders(data, min_classes=1)
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise UserError(f"{data}: class folder(s) {', '.join(unknown)} are not classes of the "
                        f"model ({', '.join(classes)})")
    items = [(path, classes.index(f.name)) for f in folders for path in f.files
             if is_image_name(path)]
    if not items:
        raise UserError(f"{data}: holds no images to evaluate")
    return data, items


def predict_items(net: InferenceNet, classes: list[str], items: list[tuple[Path, int]],
                  progress: Callable[[int], None] | None = None) -> Predictions:
    """Decode ``items`` as the network's spec says and run the network over them."""
    decoded = build_cache(items, net.spec, progress)
    if not decoded.paths:
        raise UserError("none of the images could be read: " + "; ".join(decoded.skipped[:3]))
    probabilities, _, _ = run_batches(net, decoded.images)
    return Predictions(classes=list(classes), paths=decoded.paths,
                       labels=decoded.labels.numpy(),
                       probabilities=probabilities.double().numpy(), skipped=decoded.skipped)
