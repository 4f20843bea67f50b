"""The unknown-image detector: is this image like the crystals the model was trained on?

How the score is made (chosen by measuring, see ``benchmarks/unknown.py``):

1. For each stage of the backbone, the channel means and standard deviations of its feature
   maps (:func:`crystalscope.model.inference.stage_statistics`) — early stages see blur,
   texture and brightness, late ones shapes;
2. per stage, the Mahalanobis distance to the nearest class of the training split and the
   part outside the directions the training split varied in
   (:class:`~crystalscope.unknown.scores.GaussianDistance`); plus 1 − the top softmax probability;
3. each of these put on one scale with half of the validation split (0 = its median, 1 = its
   standard deviation), and the largest taken;
4. the threshold: the conformal quantile of the other half's scores for the chosen
   false-reject rate (default 1%): with n such images, an in-distribution image scores above
   it with probability at most ``bound`` = 1 − k/(n+1), k the rank used.

``unknown_score`` is that score divided by the threshold: above 1 means "unknown".
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from safetensors.numpy import load_file, save_file

from crystalscope.errors import CrystalscopeError, UserError
from crystalscope.model.spec import RunLayout
from crystalscope.settings import SettingsError
from crystalscope.unknown.quality import REASONS, QualityGate
from crystalscope.unknown.scores import GaussianDistance, max_softmax_score

METHOD = "stage-mahalanobis+max-softmax"
FILE_NAME = RunLayout(Path()).detector.name  # beside model.json
UNKNOWN_ABOVE = 1.0  # unknown_score is scaled so that the calibrated threshold is 1
NOVEL = "novel"  # the reason for a crystal unlike the training ones (the score's decision)
UNKNOWN_REASONS = (*REASONS, NOVEL)  # every reason, in the order they are decided

DEFAULT_FALSE_REJECT = 0.01
SCALING_IMAGES = 200  # validation images that set the parts' scale; the rest set the threshold
# The detector's calibrated false-reject rate, as every settings model that sets it takes it.
FalseRejectRate = Annotated[float, Field(
    gt=0, lt=1, description="Share of validation crystals the unknown-detector may call "
                            "unknown: its threshold (set at export).")]


def conformal_threshold(scores: np.ndarray, rate: float) -> tuple[float, float]:
    """(threshold, bound): the ⌈(n+1)(1−rate)⌉-th smallest score (the largest when n is too
    small for ``rate``) and the false-reject rate it guarantees for exchangeable images."""
    if not 0 < rate < 1:
        raise SettingsError("false_reject", "give a rate between 0 and 1, e.g. 0.01", rate)
    ordered = np.sort(np.asarray(scores, np.float64))
    n = len(ordered)
    if n == 0:
        raise UserError("no validation images to calibrate the unknown-detector on")
    rank = min(n, math.ceil((n + 1) * (1 - rate)))
    return float(ordered[rank - 1]), 1.0 - rank / (n + 1)


@dataclass
class UnknownDetector:
    """Scores images from the model's outputs (stage statistics and probabilities)."""

    stage_sizes: list[int]
    distances: list[GaussianDistance]
    center: np.ndarray  # per component: the validation median
    scale: np.ndarray  # per component: the validation standard deviation
    threshold: float
    target_false_reject: float
    calibration: dict[str, Any] = field(default_factory=dict)
    gate: QualityGate | None = None  # no usable crystal: empty, blurred, saturated

    def components(self, statistics: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(N, 2 stages + 1): each stage's distance and residual, then the max-softmax score."""
        statistics = np.asarray(statistics)
        if statistics.shape[1] != sum(self.stage_sizes):
            raise UserError(f"the model gives {statistics.shape[1]} feature statistics but its "
                            f"unknown-detector expects {sum(self.stage_sizes)}; export the "
                            "model again")
        edges = np.cumsum([0, *self.stage_sizes])
        parts = []
        for distance, a, b in zip(self.distances, edges[:-1], edges[1:], strict=True):
            parts += [distance(statistics[:, a:b]), distance.residual(statistics[:, a:b])]
        return np.stack([*parts, max_softmax_score(probabilities)], axis=1)

    def raw_score(self, statistics: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        parts = (self.components(statistics, probabilities) - self.center) / self.scale
        return np.nan_to_num(parts.max(axis=1), nan=np.inf)  # broken features: unknown

    def score(self, statistics: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """``unknown_score`` per image: 1 is the threshold, above it the image is unknown
        (:meth:`is_unknown`)."""
        return self.raw_score(statistics, probabilities) / self.threshold

    def reasons(self, scores: np.ndarray, measures: np.ndarray | None) -> list[str | None]:
        """Why each image is unknown, None when it is not: first the quality gate's reason
        (``empty``, ``blurred``, ``saturated``: no usable crystal), then ``novel`` (a crystal
        unlike the training ones: :meth:`is_unknown` of its score). The one place the
        unknown decision is made."""
        gated = (self.gate.reasons(measures) if self.gate is not None and measures is not None
                 else [None] * len(scores))
        return [reason or (NOVEL if self.is_unknown(float(score)) else None)
                for reason, score in zip(gated, scores, strict=True)]

    @staticmethod
    def is_unknown(score: float | np.ndarray) -> bool | np.ndarray:
        """The unknown decision, the one place it is made: a score above the calibrated
        threshold (:meth:`score` divides by it, so the threshold is 1). A static method: a
        stored ``unknown_score`` is decided without the detector at hand."""
        decision = np.asarray(score) > UNKNOWN_ABOVE
        return bool(decision) if decision.ndim == 0 else decision

    def describe(self) -> dict[str, Any]:
        """The detector's entry in model.json."""
        gate = {"quality_gate": self.gate.describe()} if self.gate is not None else {}
        return {**gate, "method": METHOD, "file": FILE_NAME, "stage_sizes": self.stage_sizes,
                "center": self.center.tolist(), "scale": self.scale.tolist(),
                "threshold": self.threshold, "target_false_reject": self.target_false_reject,
                "calibration": self.calibration}


def fit_detector(train_statistics: np.ndarray, train_labels: np.ndarray,
                 valid_statistics: np.ndarray, valid_probabilities: np.ndarray,
                 stage_sizes: list[int], false_reject: float = DEFAULT_FALSE_REJECT
                 ) -> UnknownDetector:
    """Fit the per-stage Gaussians on the training split; put the parts on one scale with up
    to ``SCALING_IMAGES`` validation images (half of a small split, evenly spread so that every
    class is in it) and set the threshold with all the others — at least 500 wherever the
    split holds 700 — on images the score never saw, as the guarantee needs."""
    if len(train_statistics) < 3:
        raise UserError("too few training images to fit the unknown-detector (need 3)")
    if len(valid_statistics) < 2:
        raise UserError("too few validation images to calibrate the unknown-detector (need 2)")
    if not (np.isfinite(train_statistics).all() and np.isfinite(valid_statistics).all()):
        raise CrystalscopeError("the model gives non-finite feature statistics; the "
                                "unknown-detector cannot be fitted")
    edges = np.cumsum([0, *stage_sizes])
    distances = [GaussianDistance.fit(train_statistics[:, a:b], train_labels)
                 for a, b in itertools.pairwise(edges)]
    detector = UnknownDetector(stage_sizes=list(map(int, stage_sizes)), distances=distances,
                           center=np.zeros(2 * len(distances) + 1),
                           scale=np.ones(2 * len(distances) + 1), threshold=1.0,
                           target_false_reject=false_reject)
    n = len(valid_statistics)
    scaling = np.unique(np.linspace(0, n - 1, min(n // 2, SCALING_IMAGES)).round().astype(int))
    calibration = np.setdiff1d(np.arange(n), scaling)
    components = detector.components(valid_statistics[scaling], valid_probabilities[scaling])
    spread = components.std(axis=0)
    detector.center = np.median(components, axis=0)
    detector.scale = np.where(spread > 1e-9, spread, 1.0)  # a constant part: left as it is
    raw = detector.raw_score(valid_statistics[calibration], valid_probabilities[calibration])
    threshold, bound = conformal_threshold(raw, false_reject)
    if threshold <= 0:  # a degenerate validation split; keep the division meaningful
        threshold = float(np.abs(raw).max()) or 1.0
    detector.threshold = threshold
    detector.calibration = {
        "train_images": len(train_statistics), "scaling_images": len(scaling),
        "calibration_images": len(raw), "false_reject_bound": bound,
        "calibration_false_reject": float(np.mean(raw > threshold)),
    }
    return detector


def save_detector(detector: UnknownDetector, folder: Path, export_id: str = "") -> Path:
    """Write ``folder/unknown.safetensors`` (the fitted arrays, and the export id in its
    metadata); model.json holds the rest."""
    arrays: dict[str, np.ndarray] = {}
    for index, distance in enumerate(detector.distances):
        arrays.update(distance.arrays(f"stage{index}"))
    path = Path(folder) / FILE_NAME
    save_file(arrays, path, metadata={"method": METHOD, "export_id": export_id})
    return path


def detector_file_export_id(path: Path) -> str:
    """The export id in an unknown.safetensors' metadata ("" for early exports)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return (handle.metadata() or {}).get("export_id", "")


def load_detector(model_json: Path) -> UnknownDetector | None:
    """The detector described in ``model_json`` (its arrays beside it), or None if it has none."""
    model_json = Path(model_json)
    if not model_json.is_file():
        return None
    try:
        description = json.loads(model_json.read_text(encoding="utf-8"))
        info = description.get("unknown_detector") or description.get("ood")  # "ood": earlier runs
    except (OSError, json.JSONDecodeError):
        return None
    if not info:
        return None
    path = model_json.parent / info.get("file", FILE_NAME)
    expected = description.get("export_id", "")
    try:
        found = detector_file_export_id(path) if path.is_file() else expected
    except Exception:  # safetensors' own errors: load_file below says what is wrong
        found = expected
    if found != expected:
        raise UserError(f"{path}: from another export ({found or 'none'}) than {model_json} "
                        f"({expected or 'none'}); export the model again")
    try:
        arrays = load_file(path)
        distances = [GaussianDistance.from_arrays(arrays, f"stage{i}")
                     for i in range(len(info["stage_sizes"]))]
        return UnknownDetector(stage_sizes=list(info["stage_sizes"]), distances=distances,
                           center=np.asarray(info["center"], np.float64),
                           scale=np.asarray(info["scale"], np.float64),
                           threshold=float(info["threshold"]),
                           target_false_reject=float(info["target_false_reject"]),
                           calibration=dict(info.get("calibration", {})),
                           gate=(QualityGate.from_description(info["quality_gate"])
                                 if "quality_gate" in info else None))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: the unknown-detector of {model_json} cannot be read "
                        f"({type(exc).__name__}: {exc}); export the model again") from exc


def unknown_summary(info: dict[str, Any]) -> str:
    """One plain sentence about a fitted detector (its model.json entry)."""
    calibration = info.get("calibration", {})
    n, bound = calibration.get("calibration_images", 0), calibration.get("false_reject_bound")
    target = info.get("target_false_reject", DEFAULT_FALSE_REJECT)
    gate = info.get("quality_gate")
    text = (f"unknown-detector: fitted on {calibration.get('train_images', '?')} training "
            f"images; threshold from {n} validation images (the other "
            f"{calibration.get('scaling_images', '?')} set its scale) for a {100 * target:g}% "
            f"false-reject rate (bound for new in-distribution images: "
            f"{100 * (bound or 0):.2f}%)")
    if bound is not None and bound > target:
        text += (f"; {n} are too few to hold {100 * target:g}% — a validation split of "
                 f"{2 * (math.ceil(1 / target) - 1)} or more images is needed")
    measured = calibration.get("test_false_reject")
    if measured:
        low, high = measured["interval"]
        text += (f". Measured on {measured['images']} test crystals: {measured['rejected']} "
                 f"called unknown ({100 * measured['rate']:.2f}%, 95% interval "
                 f"{100 * low:.2f}-{100 * high:.2f}%)")
    if gate and all(v is None for v in gate["limits"].values()):
        needed = math.ceil(1 / gate["quantile"]) - 1
        text += (f". Quality gate: no limits from {gate['fitted_on']} training crops ({needed} "
                 f"or more set them at {100 * gate['quantile']:g}%); a crop without a single "
                 "edge is called empty")
    elif gate:
        limits = {k: "-" if v is None else f"{v:.4f}" for k, v in gate["limits"].items()}
        text += (f". Quality gate (limits at {100 * gate['quantile']:g}% of "
                 f"{gate['fitted_on']} training crops): empty below {limits['empty']} of "
                 f"pixels on an edge, blurred below focus {limits['blurred']}, saturated "
                 f"above {limits['saturated']} of pixels at {gate['saturated']}+")
    return text
