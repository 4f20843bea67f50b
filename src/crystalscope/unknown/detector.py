"""The unknown-image detector: is this image like the crystals the model was trained on?

Two questions, in this order (:meth:`UnknownDetector.assess`, the one place they are decided):

1. the image-quality gate (:mod:`crystalscope.unknown.quality`): is there a usable crystal in
   the crop at all? Its reasons: ``empty``, ``blurred``, ``saturated``;
2. the novelty score: is the crystal unlike the training ones? Reason ``novel``.

The novelty score, by method (chosen by measuring, see ``benchmarks/unknown.py``):

- ``appearance-knn`` (the default since the benchmark's 3 seeds): the distance to the
  nearest crop of the training and validation splits in a whitened, rotation-invariant
  descriptor of the picture (:mod:`crystalscope.unknown.appearance`; exports before the
  whitening: the 5th nearest training crop, standardised only);
- ``stage-mahalanobis+max-softmax`` (exports before it; still read): per backbone stage, the
  Mahalanobis distance of the channel statistics to the nearest class and the residual
  outside their principal subspace (:class:`~crystalscope.unknown.scores.GaussianDistance`),
  plus 1 − the top softmax probability, each put on one scale with up to ``SCALING_IMAGES``
  validation images (0 = its median, 1 = its standard deviation), the largest taken.

The threshold: the conformal quantile of the score with every image the gate rejects counted
as rejected, for the chosen false-reject rate (default 1%): with n calibration images, an
in-distribution image is called unknown — for any reason — with probability at most
``bound`` = 1 − k/(n+1), k the rank used. The calibration images: for ``appearance-knn`` every
crop of the bank (training and validation) scored against the others, leave-one-out
(:meth:`~crystalscope.unknown.appearance.AppearanceNeighbours.leave_one_out`), plus the
validation crops a full bank left out, with the gate's limits counted inclusive for the
training crops that set them (:func:`appearance_calibration`); for the earlier method the
validation images the score never saw.

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
from crystalscope.unknown.appearance import (
    DESCRIPTOR_SIZE,
    AppearanceNeighbours,
    appearance,
    bank_rows,
)
from crystalscope.unknown.calibration import (
    appearance_calibration,
    copy_fingerprints,
    copy_groups,
    crops_at,
    gated_threshold,
    of_rows,
)
from crystalscope.unknown.quality import MEASURES, REASONS, QualityGate, described_quantiles
from crystalscope.unknown.scores import GaussianDistance, max_softmax_score

APPEARANCE = "appearance-knn"
STAGES = "stage-mahalanobis+max-softmax"
METHODS = (APPEARANCE, STAGES)
METHOD = APPEARANCE  # what export fits
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


@dataclass
class UnknownDetector:
    """Scores images from the model's outputs and the pictures themselves (see the module)."""

    stage_sizes: list[int]
    distances: list[GaussianDistance]
    center: np.ndarray  # per component: the validation median (0 for one component)
    scale: np.ndarray  # per component: the validation standard deviation (1 for one)
    threshold: float
    target_false_reject: float
    calibration: dict[str, Any] = field(default_factory=dict)
    gate: QualityGate | None = None  # no usable crystal: empty, blurred, saturated
    method: str = STAGES
    appearance: AppearanceNeighbours | None = None  # the appearance-knn method's bank

    def components(self, statistics: np.ndarray, probabilities: np.ndarray,
                   descriptors: np.ndarray | None = None) -> np.ndarray:
        """(N, parts): the appearance distance (``appearance-knn``), or each stage's distance
        and residual, then the max-softmax score (``stage-mahalanobis+max-softmax``)."""
        if self.method == APPEARANCE:
            if descriptors is None or self.appearance is None:
                raise CrystalscopeError("the appearance score needs the crops' descriptors")
            return self.appearance(descriptors)[:, None]
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

    def raw_score(self, statistics: np.ndarray, probabilities: np.ndarray,
                  descriptors: np.ndarray | None = None) -> np.ndarray:
        parts = (self.components(statistics, probabilities, descriptors) - self.center) \
            / self.scale
        return np.nan_to_num(parts.max(axis=1), nan=np.inf)  # broken features: unknown

    def score(self, statistics: np.ndarray, probabilities: np.ndarray,
              descriptors: np.ndarray | None = None) -> np.ndarray:
        """``unknown_score`` per image: 1 is the threshold, above it the image is unknown
        (:meth:`is_unknown`)."""
        return self.raw_score(statistics, probabilities, descriptors) / self.threshold

    def assess(self, images: np.ndarray, statistics: np.ndarray, probabilities: np.ndarray
               ) -> tuple[np.ndarray, list[str | None]]:
        """(``unknown_score``, reason or None) per image, from the decoded crops (N, 3, S, S)
        uint8 as the network sees them and the network's outputs for them. O(N · S^2) for the
        measures plus the score's own cost (see :mod:`crystalscope.unknown.appearance`)."""
        descriptors = (appearance(images, self.appearance.width)
                       if self.method == APPEARANCE and self.appearance is not None else None)
        scores = self.score(statistics, probabilities, descriptors)
        measures = self.gate.measure(images) if self.gate is not None else None
        return scores, self.reasons(scores, measures)

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
        bank = ({"k": self.appearance.k, "bank_images": len(self.appearance.bank),
                 "descriptor_size": self.appearance.width}
                if self.appearance is not None else {})
        return {**gate, "method": self.method, **bank, "file": FILE_NAME,
                "stage_sizes": self.stage_sizes,
                "center": self.center.tolist(), "scale": self.scale.tolist(),
                "threshold": self.threshold, "target_false_reject": self.target_false_reject,
                "calibration": self.calibration}


def fit_detector(train_statistics: np.ndarray, train_labels: np.ndarray,
                 valid_statistics: np.ndarray, valid_probabilities: np.ndarray,
                 stage_sizes: list[int], false_reject: float = DEFAULT_FALSE_REJECT, *,
                 method: str = METHOD, train_images: np.ndarray | None = None,
                 valid_images: np.ndarray | None = None) -> UnknownDetector:
    """Fit the detector on the training split and calibrate it on the validation split.

    With the crops (``train_images``, ``valid_images``: (N, 3, S, S) uint8 as the network sees
    them) the quality gate's limits are fitted on the training crops, and the threshold counts
    every calibration crop the gate rejects as rejected, so that the rate holds for the whole
    decision; ``appearance-knn`` needs them, and calibrates on its bank's leave-one-out scores
    (:func:`appearance_calibration`). ``stage-mahalanobis+max-softmax`` puts its parts on one
    scale with up to ``SCALING_IMAGES`` validation images (half of a small split, evenly spread
    so every class is in it) and sets the threshold with all the others. Cost for
    ``appearance-knn``: O(N_train · S^2) for the gate, O(B · S^2) for the descriptors of the
    bank's B <= ``BANK_LIMIT`` crops, O(B^2 · D) for its leave-one-out scores."""
    if method not in METHODS:
        raise SettingsError("method", f"use one of {', '.join(METHODS)}", method)
    if len(train_statistics) < 3:
        raise UserError("too few training images to fit the unknown-detector (need 3)")
    if len(valid_statistics) < 2:
        raise UserError("too few validation images to calibrate the unknown-detector (need 2)")
    if not (np.isfinite(train_statistics).all() and np.isfinite(valid_statistics).all()):
        raise CrystalscopeError("the model gives non-finite feature statistics; the "
                                "unknown-detector cannot be fitted")
    if method == APPEARANCE:
        if train_images is None or valid_images is None:
            raise CrystalscopeError(f"{APPEARANCE} is fitted on the crops: give train_images "
                                    "and valid_images")
        return _fit_appearance(train_images, valid_images, len(train_statistics),
                               false_reject)
    with_images = train_images is not None and valid_images is not None
    n = len(valid_statistics)
    edges = np.cumsum([0, *stage_sizes])
    distances = [GaussianDistance.fit(train_statistics[:, a:b], train_labels)
                 for a, b in itertools.pairwise(edges)]
    detector = UnknownDetector(stage_sizes=list(map(int, stage_sizes)),
                               distances=distances, center=np.zeros(2 * len(distances) + 1),
                               scale=np.ones(2 * len(distances) + 1), threshold=1.0,
                               target_false_reject=false_reject, method=STAGES)
    scaling = np.unique(np.linspace(0, n - 1, min(n // 2, SCALING_IMAGES)).round()
                        .astype(int))
    components = detector.components(valid_statistics[scaling], valid_probabilities[scaling])
    spread = components.std(axis=0)
    detector.center = np.median(components, axis=0)
    detector.scale = np.where(spread > 1e-9, spread, 1.0)  # a constant part: as it is
    calibration = np.setdiff1d(np.arange(n), scaling)
    raw = detector.raw_score(valid_statistics[calibration], valid_probabilities[calibration])
    gated = np.zeros(len(raw), bool)
    if with_images:
        detector.gate = QualityGate.fit_images(train_images)
        held = valid_images[calibration]
        gated = detector.gate.failed(detector.gate.measure(held)).any(axis=1)
    _set_threshold(detector, raw, gated, false_reject)
    detector.calibration.update(train_images=len(train_statistics),
                                scaling_images=len(scaling))
    return detector


def _set_threshold(detector: UnknownDetector, raw: np.ndarray, gated: np.ndarray,
                   false_reject: float) -> None:
    """The threshold for ``false_reject`` from calibration scores and gate decisions, and the
    calibration record."""
    threshold, bound = gated_threshold(raw, gated, false_reject)
    if threshold <= 0:  # a degenerate validation split; keep the division meaningful
        threshold = float(np.abs(raw).max()) or 1.0
    detector.threshold = threshold
    detector.calibration = {
        "calibration_images": len(raw), "false_reject_bound": bound,
        "calibration_false_reject": float(np.mean(gated | (raw > threshold))),
        "gate_false_reject": float(np.mean(gated)),
    }


def _fit_appearance(train_images: np.ndarray, valid_images: np.ndarray, n_train: int,
                    false_reject: float) -> UnknownDetector:
    """``appearance-knn``: the gate on the training crops, the bank on training and
    validation crops (up to ``BANK_LIMIT``, evenly spread), the threshold on the bank's
    leave-one-out scores and the validation crops left out of it."""
    crops = len(train_images) + len(valid_images)
    rows = bank_rows(crops)
    left_out = np.setdiff1d(np.arange(len(train_images), crops), rows)
    neighbours = AppearanceNeighbours.fit(
        of_rows(train_images, valid_images, rows, appearance, DESCRIPTOR_SIZE))
    gate, train_measures = QualityGate.fit_measured(train_images)
    width = len(MEASURES)
    groups = copy_groups([fingerprint
                          for crops in crops_at(train_images, valid_images, rows)
                          for fingerprint in copy_fingerprints(crops)])
    in_train = rows < len(train_images)  # rows are sorted: the training crops come first
    bank_measures = np.concatenate([
        train_measures[rows[in_train]],
        of_rows(train_images, valid_images, rows[~in_train], gate.measure, width)])
    scores, gated = appearance_calibration(
        neighbours, gate, bank_measures, in_train, groups,
        of_rows(train_images, valid_images, left_out, appearance, DESCRIPTOR_SIZE),
        of_rows(train_images, valid_images, left_out, gate.measure, width))
    detector = UnknownDetector(stage_sizes=[], distances=[], center=np.zeros(1),
                               scale=np.ones(1), threshold=1.0,
                               target_false_reject=false_reject, gate=gate,
                               method=APPEARANCE, appearance=neighbours)
    _set_threshold(detector, scores, gated, false_reject)
    detector.calibration.update(
        train_images=n_train, scaling_images=0, bank_images=len(rows),
        scored="leave-one-out: every bank crop (training and validation) against the "
               "others, copies left out; validation crops outside the bank against it")
    return detector


def save_detector(detector: UnknownDetector, folder: Path, export_id: str = "") -> Path:
    """Write ``folder/unknown.safetensors`` (the fitted arrays, and the export id in its
    metadata); model.json holds the rest."""
    arrays: dict[str, np.ndarray] = {}
    for index, distance in enumerate(detector.distances):
        arrays.update(distance.arrays(f"stage{index}"))
    if detector.appearance is not None:
        arrays.update(detector.appearance.arrays("appearance"))
    path = Path(folder) / FILE_NAME
    save_file(arrays, path, metadata={"method": detector.method, "export_id": export_id})
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
        method = info.get("method", STAGES)
        if method not in METHODS:
            raise UserError(f"{model_json}: its unknown-detector ({method}) is from a newer "
                            "crystalscope; upgrade, or export the model again")
        distances = [GaussianDistance.from_arrays(arrays, f"stage{i}")
                     for i in range(len(info["stage_sizes"]))]
        bank = (AppearanceNeighbours.from_arrays(arrays, "appearance", int(info["k"]))
                if method == APPEARANCE else None)
        return UnknownDetector(stage_sizes=list(info["stage_sizes"]), distances=distances,
                           center=np.asarray(info["center"], np.float64),
                           scale=np.asarray(info["scale"], np.float64),
                           threshold=float(info["threshold"]),
                           target_false_reject=float(info["target_false_reject"]),
                           calibration=dict(info.get("calibration", {})),
                           gate=(QualityGate.from_description(info["quality_gate"])
                                 if "quality_gate" in info else None),
                           method=method, appearance=bank)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: the unknown-detector of {model_json} cannot be read "
                        f"({type(exc).__name__}: {exc}); export the model again") from exc


def unknown_summary(info: dict[str, Any]) -> str:
    """One plain sentence about a fitted detector (its model.json entry)."""
    calibration = info.get("calibration", {})
    n, bound = calibration.get("calibration_images", 0), calibration.get("false_reject_bound")
    target = info.get("target_false_reject", DEFAULT_FALSE_REJECT)
    gate = info.get("quality_gate")
    scaling = calibration.get("scaling_images", 0)
    source = ("crops, each scored leave-one-out against the bank of training and "
              "validation crops" if "bank_images" in calibration else "validation images")
    text = (f"unknown-detector ({info.get('method', STAGES)}): fitted on "
            f"{calibration.get('train_images', '?')} training images; threshold from {n} "
            f"{source}" + (f" (the other {scaling} set its scale)" if scaling else "")
            + f" for a {100 * target:g}% false-reject rate, gate and score together (bound "
            f"for new in-distribution images: {100 * (bound or 0):.2f}%)")
    if bound is not None and bound > target:
        text += (f"; {n} are too few to hold {100 * target:g}% — a validation split of "
                 f"{(2 if scaling else 1) * (math.ceil(1 / target) - 1)} or more images is "
                 "needed")
    gate_share = calibration.get("gate_false_reject")
    if gate_share is not None and gate_share >= target:
        text += (f". The quality gate alone rejects {100 * gate_share:.2f}% of the calibration "
                 f"crystals, so the novelty score got none of the {100 * target:g}%: raise "
                 "--false-reject to let it flag novel crystals")
    measured = calibration.get("test_false_reject")
    if measured:
        low, high = measured["interval"]
        text += (f". Measured on {measured['images']} test crystals: {measured['rejected']} "
                 f"called unknown ({100 * measured['rate']:.2f}%, 95% interval "
                 f"{100 * low:.2f}-{100 * high:.2f}%)")
    quantiles = described_quantiles(gate) if gate else {}
    at = " / ".join(f"{100 * q:g}% ({reason})" for reason, q in quantiles.items())
    if gate and all(v is None for v in gate["limits"].values()):
        needed = ", ".join(f"{math.ceil(1 / q) - 1} or more the {reason} limit at {100 * q:g}%"
                           for reason, q in quantiles.items())
        text += (f". Quality gate: no limits from {gate['fitted_on']} training crops ({needed}); "
                 "a crop without a single edge is called empty")
    elif gate:
        limits = {k: "-" if v is None else f"{v:.4f}" for k, v in gate["limits"].items()}
        lines, standout = gate.get("empty_lines"), gate.get("empty_standout")
        empty = (f"empty at or below {limits['empty']} of pixels on an edge with lines x rim "
                 f"below {standout:.2f}" if standout is not None else
                 f"empty at or below {limits['empty']} of pixels on an edge with no line "
                 f"above {lines:.2f}" if lines is not None else
                 f"empty below {limits['empty']} of pixels on an edge")
        text += (f". Quality gate (limits at {at} of "
                 f"{gate['fitted_on']} training crops): {empty}, blurred below "
                 f"{gate.get('blurred_measure', 'focus')} {limits['blurred']}, saturated above "
                 f"{limits['saturated']} of pixels at {gate['saturated']}+")
    return text
