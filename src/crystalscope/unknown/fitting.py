"""Fit a run's unknown-detector: stage statistics and the quality gate's limits from its
training split, calibrated on its validation split, its false-reject rate measured on its test
split. Export calls this and stores the result with the model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy.stats import binomtest

from crystalscope.data.decoded import build_cache
from crystalscope.errors import CrystalscopeError
from crystalscope.model.inference import InferenceNet, LoadedRun
from crystalscope.unknown.detector import DEFAULT_FALSE_REJECT, UnknownDetector, fit_detector


@torch.inference_mode()
def stage_outputs(net: InferenceNet, images: torch.Tensor, batch_size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(statistics (N, D), probabilities (N, C), width of each stage's statistics)."""
    statistics, probabilities, sizes = [], [], []
    batch_size = max(1, batch_size // net.views)  # test-time views multiply the batch
    for start in range(0, len(images), batch_size):
        p, _, stages = net.stages(images[start:start + batch_size].float())
        sizes = [s.shape[1] for s in stages]
        statistics.append(torch.cat(stages, dim=1).double().numpy())
        probabilities.append(p.double().numpy())
    return np.concatenate(statistics), np.concatenate(probabilities), sizes


# Test crystals scored for the measured false-reject rate: enough for a 95% interval of about
# +-0.5 points at 1%, and held decoded at once (2,000 x 3 x 224^2 bytes: 300 MB at most).
MEASURE_LIMIT = 2000


class NoTrainingData(CrystalscopeError):
    """The run's train/ and valid/ images are gone, so no detector can be fitted."""


def fit_run_detector(run: LoadedRun, false_reject: float = DEFAULT_FALSE_REJECT
                     ) -> UnknownDetector:
    """The detector fitted on the run's training split and calibrated on its validation
    split; :class:`NoTrainingData` when those images are no longer there."""
    train_items, valid_items = run.data.split("train"), run.data.split("valid")
    if not train_items or not valid_items:
        raise NoTrainingData(f"no unknown-detector: {run.config.data} no longer has the "
                             "train/ and valid/ images it needs")
    train = build_cache(train_items, run.spec)
    valid = build_cache(valid_items, run.spec)
    train_statistics, _, sizes = stage_outputs(run.net, train.images)
    valid_statistics, valid_probabilities, _ = stage_outputs(run.net, valid.images)
    detector = fit_detector(train_statistics, train.labels.numpy(), valid_statistics,
                            valid_probabilities, sizes, false_reject,
                            train_images=train.images.numpy(), valid_images=valid.images.numpy())
    measured = measure_false_reject(run, detector)
    if measured is not None:
        detector.calibration["test_false_reject"] = measured
    return detector


def measure_false_reject(run: LoadedRun, detector: UnknownDetector,
                         limit: int = MEASURE_LIMIT) -> dict | None:
    """The share of the run's test crystals (up to ``limit``) the detector calls unknown —
    gate and score together, as predict decides — with its exact 95% (Clopper-Pearson)
    interval and the count per reason; None without a test split. Nothing is fitted on
    them. O(min(test images, limit)): one forward pass, whatever the split's size."""
    items = run.data.split("test")[:limit]
    if not items:
        return None
    test = build_cache(items, run.spec)
    if not len(test.paths):
        return None
    statistics, probabilities, _ = stage_outputs(run.net, test.images)
    scores, decided = detector.assess(test.images.numpy(), statistics, probabilities)
    reasons = [r for r in decided if r is not None]
    n = len(scores)
    interval = binomtest(len(reasons), n).proportion_ci(0.95, method="exact")
    return {"split": "test", "images": n, "rejected": len(reasons),
            "rate": len(reasons) / n, "interval": [float(interval.low), float(interval.high)],
            "by_reason": dict(Counter(reasons))}
