"""Calibration of the unknown-detector: the conformal threshold, and the appearance score's
calibration crops — its bank scored leave-one-out with each crop's copies left out.

Why leave-one-out: the threshold is the 1% tail of the calibration scores, and a validation
split of 500 puts five crops in it; every bank crop scored against the others puts all of
the training and validation crops there. A new crop's score against the bank and a bank
crop's score against the other crops are exchangeable, so the conformal bound holds — as
long as no crop meets its own copy, which is why the copies (turned, mirrored, re-saved; as
``crystalscope check`` finds them) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from crystalscope.errors import UserError
from crystalscope.settings import SettingsError
from crystalscope.unknown.appearance import CHUNK, AppearanceNeighbours
from crystalscope.unknown.quality import QualityGate


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


def gated_threshold(raw: np.ndarray, gated: np.ndarray, rate: float) -> tuple[float, float]:
    """(threshold, bound) for the whole decision: the conformal threshold of the scores with
    every image the gate rejects counted as rejected (+inf). When the gate alone takes more
    than ``rate`` of them the score gets none of the budget: its threshold is the largest
    score of the images the gate passes (the gate's share is then reported, not hidden)."""
    threshold, bound = conformal_threshold(np.where(gated, np.inf, raw), rate)
    if not np.isfinite(threshold):
        threshold = float(np.asarray(raw)[~np.asarray(gated)].max(initial=0.0))
    return threshold, bound


def copy_fingerprints(images: np.ndarray) -> list:
    """``crystalscope check``'s fingerprints of (N, 3, S, S) uint8 crops, for
    :func:`copy_groups`: the pixels in their 8 rotations/flips and the perceptual hashes."""
    from PIL import Image

    from crystalscope.data.dedupe import (
        Fingerprint,
        dihedral_phashes,
        is_low_texture,
        pixel_digest,
    )

    fingerprints = []
    for image in np.asarray(images):
        gray = image.mean(axis=0).round().astype(np.uint8)
        picture = Image.fromarray(gray)
        fingerprints.append(Fingerprint(
            sha256="", pixel_digest=pixel_digest(gray),
            phashes=None if is_low_texture(picture) else dihedral_phashes(picture)))
    return fingerprints


def copy_groups(fingerprints: list) -> np.ndarray:
    """(N,) group ids: crops that are copies of each other — pixel for pixel in one of the 8
    rotations/flips, or within ``check``'s perceptual-hash distance of one (a turned,
    mirrored or re-saved copy) — share one, as ``check`` and ``split`` group them
    (:func:`crystalscope.data.dedupe.group_duplicates`). O(N) (the near search as
    ``check``'s)."""
    from dataclasses import replace

    from crystalscope.data.dedupe import group_duplicates

    unique = [replace(f, sha256=str(index)) for index, f in enumerate(fingerprints)]
    return np.asarray(group_duplicates(unique), np.int64)


def appearance_calibration(neighbours: AppearanceNeighbours, gate: QualityGate,
                           bank_measures: np.ndarray, bank_from_training: np.ndarray,
                           bank_groups: np.ndarray | None, other_descriptors: np.ndarray,
                           other_measures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, gated) of the calibration crops: the bank's crops leave-one-out, their copies
    (``bank_groups``, :func:`copy_groups`) left out too (their gate ``bank_measures`` in the
    bank's row order; ``bank_from_training`` marks those of the training split, whose gate
    limits count inclusive, see :meth:`QualityGate.failed`), then the validation crops a full
    bank left out (``other_*``) against the bank. O((B + V) · B · D)."""
    gated = np.where(bank_from_training,
                     gate.failed(bank_measures, inclusive=True).any(axis=1),
                     gate.failed(bank_measures).any(axis=1))
    scores = np.r_[neighbours.leave_one_out(bank_groups), neighbours(other_descriptors)]
    gated = np.r_[gated, gate.failed(other_measures).any(axis=1)]
    return scores, gated


def crops_at(train_images: np.ndarray, valid_images: np.ndarray, rows: np.ndarray
              ) -> Iterator[np.ndarray]:
    """The crops at the sorted ``rows`` of training + validation, ``CHUNK`` at a time (memory
    O(``CHUNK`` · S^2), never a copy of all of them)."""
    n_train = len(train_images)
    for start in range(0, len(rows), CHUNK):
        part = rows[start:start + CHUNK]
        yield np.concatenate([train_images[part[part < n_train]],
                              valid_images[part[part >= n_train] - n_train]])


def of_rows(train_images: np.ndarray, valid_images: np.ndarray, rows: np.ndarray,
             measure: Callable[[np.ndarray], np.ndarray], width: int) -> np.ndarray:
    """``measure`` (N, width) of the crops at the sorted ``rows``, a chunk at a time."""
    parts = [measure(crops) for crops in crops_at(train_images, valid_images, rows)]
    return np.concatenate(parts) if parts else np.zeros((0, width))
