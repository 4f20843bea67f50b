"""Fit a run's unknown-detector: stage statistics and the quality gate's limits from its
training split, calibrated on its validation split, its false-reject rate measured on its test
split. Export calls this and stores the result with the model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

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


# Test crystals scored at export for the measured false-reject rate: enough for a 95% interval
# of about +-0.5 points at 1%, in a bounded time whatever the split's size.
MEASURE_LIMIT = 2000
BATCH = 512  # images decoded at once while measuring: 512 x 3 x 224^2 bytes = 77 MB at most


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
    """The share of the run's test crystals (up to ``limit``) the detector calls unknown
    (:func:`measure_unknown`); None without a test split. Nothing is fitted on them."""
    measured = measure_unknown(run, detector, run.data.split("test")[:limit])
    return None if measured is None else {"split": "test", **measured}


def measure_unknown(run: LoadedRun, detector: UnknownDetector,
                    items: list[tuple[Path, int]]) -> dict | None:
    """How many of ``items`` (crystals the model should answer for) the detector calls
    unknown — gate and score together, as predict decides — with the exact 95%
    (Clopper-Pearson) interval of the rate and the count per reason; None when none of them
    can be read. One forward pass and one descriptor per image, ``BATCH`` images decoded at
    once: O(N) time, memory bounded by the batch."""
    rejected: list[str] = []
    n = 0
    for start in range(0, len(items), BATCH):
        decoded = build_cache(items[start:start + BATCH], run.spec)
        if not len(decoded.paths):
            continue
        statistics, probabilities, _ = stage_outputs(run.net, decoded.images)
        _, reasons = detector.assess(decoded.images.numpy(), statistics, probabilities)
        rejected += [r for r in reasons if r is not None]
        n += len(reasons)
    if n == 0:
        return None
    interval = binomtest(len(rejected), n).proportion_ci(0.95, method="exact")
    return {"images": n, "rejected": len(rejected), "rate": len(rejected) / n,
            "interval": [float(interval.low), float(interval.high)],
            "by_reason": dict(Counter(rejected))}
