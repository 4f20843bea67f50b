"""The proportions' intervals and the calibration error: the statistics that the report, the
monitor and the operating points share (numpy and scipy only, no model code)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

CALIBRATION_BINS = 15


def wilson_interval(successes: int, trials: int) -> tuple[float, float] | None:
    """95% Wilson score interval of successes / trials (None when there are no trials)."""
    if trials == 0:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def expected_calibration_error(truth: np.ndarray, probabilities: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """ECE over equal-width confidence bins (confidence = the top probability)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap = abs(correct[mask].mean() - confidence[mask].mean())
            ece += mask.mean() * gap
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                          "count": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                          "confidence": float(confidence[mask].mean())})
    return {"ece": float(ece), "bins": bins, "table": table}
