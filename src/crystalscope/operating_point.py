"""Where a model decides, and how honest its probabilities are: the plant's operating point.

Two choices, both fitted on the validation split at export and stored with the model:

- **Temperature scaling** (:func:`fit_temperature`): one number T that divides the logits
  before the softmax, chosen to minimise the validation log-loss (Guo et al., 2017). It leaves
  each single-view decision as it was and makes "0.9" mean about 9 in 10.
- **A threshold for one class** (:class:`OperatingPoint`): "catch at least 99% of PG crops"
  (``pg=recall:0.99``) or "at most 1% false PG calls" (``pg=precision:0.99``). The class is
  called when its probability reaches the threshold; otherwise the most probable other class.

Costs: choosing a threshold sorts the validation scores once, O(N log N) time and O(N) memory;
deciding is O(N C); fitting T evaluates the log-loss about 30 times, O(30 V N C) time and
O(V N C) memory for V test-time views. Measured at N = 10^6, C = 2, one view (one core): a
threshold in 0.2 s with a 76 MiB peak, T in 1.9 s with a 217 MiB peak;
``tests/test_operating_point.py`` bounds both memories per image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from crystalscope.evaluate.statistics import expected_calibration_error, wilson_interval
from crystalscope.settings import SettingsError

Metric = Literal["recall", "precision"]
METRICS = ("recall", "precision")
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class ThresholdTarget:
    """What the plant asks of one class: its recall or its precision at least ``value``."""

    class_name: str
    metric: Metric
    value: float

    @classmethod
    def parse(cls, text: str, classes: list[str]) -> ThresholdTarget:
        """``CLASS=recall:0.99`` or ``CLASS=precision:0.99`` (a share, or a percentage)."""
        example = f"e.g. {classes[-1]}=recall:0.99 or {classes[-1]}=precision:0.99"
        name, _, rest = text.partition("=")
        metric, _, number = rest.partition(":")
        name, metric = name.strip(), metric.strip().lower()
        if not name or metric not in METRICS or not number:
            raise SettingsError("threshold", f"write CLASS=recall:R or CLASS=precision:P, "
                                f"{example}", text)
        if name not in classes:
            raise SettingsError("threshold", f"{name!r} is not a class of the model "
                                f"({', '.join(classes)})", text)
        try:
            value = float(number.strip().rstrip("%")) / (100 if number.strip().endswith("%")
                                                          else 1)
        except ValueError:
            value = math.nan
        if not 0 < value < 1:
            raise SettingsError("threshold", f"the {metric} must be between 0 and 1 (not "
                                f"included), {example}", text)
        return cls(name, metric, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.class_name}={self.metric}:{self.value:g}"


@dataclass(frozen=True)
class OperatingPoint:
    """Call ``class_name`` when its probability is at least ``threshold``; else the most
    probable other class. ``validation``: the rates it was chosen with (see :func:`rates`)."""

    class_name: str
    class_index: int
    threshold: float
    metric: Metric
    target: float
    validation: dict[str, Any]

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """The called class index of each row of (N, C) probabilities. O(N C)."""
        probabilities = np.asarray(probabilities)
        others = probabilities.copy()
        others[:, self.class_index] = -np.inf
        best_other = others.argmax(axis=1)
        return np.where(probabilities[:, self.class_index] >= self.threshold,
                        self.class_index, best_other)

    def describe(self) -> str:
        """One line: the rule and what it achieved where it was chosen."""
        achieved = self.validation[self.metric]
        low, high = achieved["ci95"]
        return (f"operating point: {self.class_name} when P({self.class_name}) >= "
                f"{self.threshold:.4g} (asked {self.metric} >= {self.target:g}; on "
                f"{self.validation['images']} validation images {self.metric} "
                f"{achieved['value']:.4f}, 95% interval {low:.4f}-{high:.4f})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], classes: list[str]) -> OperatingPoint:
        """Read back :meth:`to_dict`; the class must be one of ``classes`` at its index."""
        point = cls(**{k: data[k] for k in ("class_name", "class_index", "threshold", "metric",
                                            "target", "validation")})
        if not (0 <= point.class_index < len(classes)
                and classes[point.class_index] == point.class_name):
            raise ValueError(f"operating point for {point.class_name!r} does not fit the "
                             f"classes {classes}")
        return point


def _wilson(successes: int, trials: int) -> dict[str, Any]:
    return {"value": successes / trials if trials else None, "ci95": wilson_interval(
        successes, trials), "successes": successes, "trials": trials}


def rates(called: np.ndarray, truth: np.ndarray, class_index: int) -> dict[str, Any]:
    """Recall and precision of calling ``class_index``, with 95% Wilson intervals."""
    positive, said = truth == class_index, called == class_index
    hits = int((positive & said).sum())
    return {"images": len(truth), "recall": _wilson(hits, int(positive.sum())),
            "precision": _wilson(hits, int(said.sum()))}


def choose_operating_point(probabilities: np.ndarray, truth: np.ndarray, classes: list[str],
                           target: ThresholdTarget) -> OperatingPoint:
    """The threshold that meets ``target`` on these (validation) images and calls the class
    as rarely as that allows (recall) or as often as that allows (precision). O(N log N)."""
    c = classes.index(target.class_name)
    scores = np.asarray(probabilities, dtype=np.float64)[:, c]
    positive = np.asarray(truth) == c
    if not positive.any():
        raise SettingsError("threshold", f"the validation split has no {target.class_name} "
                            "images to choose a threshold on", str(target))
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(positive[order])
    # a cut can only fall after the last of tied scores: t = ranked[i] calls all of them
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    cuts = np.flatnonzero(last_of_tie)
    if target.metric == "recall":
        needed = math.ceil(target.value * positive.sum() - 1e-9)
        cut = cuts[np.searchsorted(hits[cuts], needed)]  # the first (highest) cut that has it
    else:
        precision = hits[cuts] / (cuts + 1)
        meeting = cuts[precision >= target.value]
        if not len(meeting):
            raise SettingsError("threshold", f"no threshold reaches {target.class_name} "
                                f"precision {target.value:g} on the validation split (the best "
                                f"is {precision.max():.4f}); ask for less", str(target))
        cut = meeting[-1]  # the lowest threshold that keeps the precision: the most recall
    threshold = float(ranked[cut])
    point = OperatingPoint(target.class_name, c, threshold, target.metric, target.value, {})
    validation = rates(point.decide(probabilities), np.asarray(truth), c)
    return OperatingPoint(target.class_name, c, threshold, target.metric, target.value,
                          validation)


def probabilities_at(view_logits: np.ndarray, temperature: float) -> np.ndarray:
    """(V, N, C) logits of V test-time views -> (N, C) mean over views of softmax(z / T)."""
    logged = log_softmax(np.asarray(view_logits, np.float64) / temperature, axis=2)
    return np.exp(logsumexp(logged, axis=0) - math.log(len(logged)))


def log_loss_at(view_logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``truth`` under :func:`probabilities_at`, computed in
    log space (no underflow for an over-confident model)."""
    logged = log_softmax(np.asarray(view_logits, np.float64) / temperature, axis=2)
    mean_log = logsumexp(logged, axis=0) - math.log(len(logged))
    return float(-mean_log[np.arange(len(truth)), truth].mean())


def fit_temperature(view_logits: np.ndarray, truth: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the log-loss of ``truth`` (bounded Brent search on
    log T). ``view_logits``: (V, N, C); (N, C) is taken as one view."""
    logits = np.asarray(view_logits, np.float64)
    logits = logits[None] if logits.ndim == 2 else logits
    truth = np.asarray(truth)
    if not len(truth):
        raise ValueError("no images to fit the temperature on")
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: log_loss_at(logits, truth, math.exp(log_t)),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def temperature_effect(view_logits: np.ndarray, truth: np.ndarray,
                       temperature: float) -> dict[str, Any]:
    """ECE and log-loss before (T = 1) and after scaling, on these images."""
    logits = np.asarray(view_logits, np.float64)
    logits = logits[None] if logits.ndim == 2 else logits
    truth = np.asarray(truth)
    ece = {t: expected_calibration_error(truth, probabilities_at(logits, t))["ece"]
           for t in (1.0, temperature)}
    return {"images": len(truth), "ece_before": ece[1.0], "ece_after": ece[temperature],
            "log_loss_before": log_loss_at(logits, truth, 1.0),
            "log_loss_after": log_loss_at(logits, truth, temperature)}
