"""The appearance novelty score: its descriptor does not turn with the crop, its neighbours are
the exact ones, its bank and memory are bounded, and gate and score together hold the
calibrated false-reject rate."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from crystalscope.model.spec import ModelSpec, decode
from crystalscope.unknown import appearance as appearance_module
from crystalscope.unknown.appearance import DESCRIPTOR_SIZE, AppearanceNeighbours, appearance
from crystalscope.unknown.detector import (
    APPEARANCE,
    STAGES,
    fit_detector,
    load_detector,
    save_detector,
)

SPEC = ModelSpec(64, ("cex", "pg"))


def _real(samples: Path) -> np.ndarray:
    return np.stack([decode(p, SPEC)[0] for p in sorted(samples.glob("*.png"))])


def test_the_descriptor_is_the_same_for_a_crop_turned_or_mirrored(samples: Path) -> None:
    crops = _real(samples)
    described = appearance(crops)
    assert described.shape == (len(crops), DESCRIPTOR_SIZE) and np.isfinite(described).all()
    for turned in (np.rot90(crops, 1, axes=(2, 3)), crops[..., ::-1]):
        np.testing.assert_allclose(appearance(np.ascontiguousarray(turned)), described,
                                   atol=0.02)
    # and it tells a real CEX needle field from a PG agglomerate
    assert np.abs(described[0] - described[-1]).max() > 0.1


def test_the_neighbour_distance_is_the_exact_kth_nearest(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    rng = np.random.default_rng(3)
    bank, queries = rng.gamma(2.0, size=(700, 9)), rng.gamma(2.0, size=(300, 9))
    monkeypatch.setattr(appearance_module, "CHUNK", 64)  # several chunks
    neighbours = AppearanceNeighbours.fit(bank, k=5, whiten=False)  # as earlier banks

    def standardise(x: np.ndarray) -> np.ndarray:
        return (x - bank.mean(axis=0)) / bank.std(axis=0)

    exact = NearestNeighbors(n_neighbors=5).fit(standardise(bank))
    expected = exact.kneighbors(standardise(queries))[0][:, -1]
    np.testing.assert_allclose(neighbours(queries), expected, rtol=1e-4)


def test_the_whitened_distance_is_the_mahalanobis_distance_of_the_shrunk_covariance(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whitened, the k-th neighbour is scikit-learn's exact one under the Mahalanobis metric
    of the standardised bank's Ledoit-Wolf covariance — correlated numbers count once."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(7)
    mixing = rng.normal(size=(6, 6))
    bank, queries = rng.gamma(2.0, size=(700, 6)) @ mixing, rng.gamma(2.0, size=(300, 6)) @ mixing
    monkeypatch.setattr(appearance_module, "CHUNK", 64)
    neighbours = AppearanceNeighbours.fit(bank, k=2)
    assert neighbours.whitening is not None and neighbours.k == 2
    standardised = (bank - bank.mean(axis=0)) / bank.std(axis=0)
    precision = LedoitWolf().fit(standardised).precision_
    exact = NearestNeighbors(n_neighbors=2, metric="mahalanobis", metric_params={"VI": precision},
                             algorithm="brute").fit(standardised)
    expected = exact.kneighbors((queries - bank.mean(axis=0)) / bank.std(axis=0))[0][:, -1]
    np.testing.assert_allclose(neighbours(queries), expected, rtol=1e-4)


def test_leave_one_out_is_the_kth_nearest_other_crop_copies_left_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bank crop's calibration score is its distance to the k-th nearest *other* crop
    (scikit-learn's exact neighbours of the bank without it), and a copy of it (the same
    descriptor: a turned or mirrored crop) is no neighbour."""
    rng = np.random.default_rng(9)
    monkeypatch.setattr(appearance_module, "CHUNK", 50)
    distinct = rng.gamma(2.0, size=(300, 5))
    descriptors = np.concatenate([distinct, distinct[:40]])  # 40 crops twice
    neighbours = AppearanceNeighbours.fit(descriptors, k=3)
    loo = neighbours.leave_one_out()
    bank = neighbours.bank.astype(np.float64)
    for row in (0, 39, 40, 299, 300, 339):
        copies = np.flatnonzero(np.abs(bank - bank[row]).max(axis=1) < 1e-9)
        others = np.delete(bank, copies, axis=0)
        exact = NearestNeighbors(n_neighbors=3).fit(others).kneighbors(bank[row:row + 1])
        assert loo[row] == pytest.approx(exact[0][0, -1], rel=1e-4)
    # a calibration crop's copies never make it look close; a new crop that is a copy of a
    # bank crop is as close as can be
    assert loo.min() > 0.1
    nearest = AppearanceNeighbours.fit(descriptors, k=1)
    assert nearest(descriptors[:1])[0] == pytest.approx(0.0, abs=1e-3)
    assert nearest.leave_one_out()[0] > 0.1


def test_copies_named_by_their_group_are_no_neighbours_in_leave_one_out() -> None:
    """A turned or re-saved copy's descriptor differs a little, so distance alone does not
    know it for a copy; its group (as check and split find copies) does."""
    rng = np.random.default_rng(10)
    distinct = rng.gamma(2.0, size=(200, 10))
    near_copies = distinct[:30] + rng.normal(0, 0.1, (30, 10))
    descriptors = np.concatenate([distinct, near_copies])
    groups = np.r_[np.arange(200), np.arange(30)]  # row 200 + i is a copy of row i
    neighbours = AppearanceNeighbours.fit(descriptors, k=1)
    assert neighbours.leave_one_out()[:30].max() < 0.5  # each other's nearest, by distance
    loo = neighbours.leave_one_out(groups)
    bank = neighbours.bank.astype(np.float64)
    for row in (0, 29, 30, 199, 200, 229):
        others = bank[groups != groups[row]]
        exact = NearestNeighbors(n_neighbors=1).fit(others).kneighbors(bank[row:row + 1])
        assert loo[row] == pytest.approx(exact[0][0, -1], rel=1e-4)
    assert loo[:30].min() > 0.8


def test_copy_groups_find_turned_and_mirrored_crops(samples: Path) -> None:
    """copy_groups names a real crop and its turned and mirrored copies as one group (as
    ``crystalscope check`` would), and different crops apart."""
    from crystalscope.unknown.calibration import copy_fingerprints, copy_groups

    crops = _real(samples)[:5]
    copies = np.concatenate([crops, np.ascontiguousarray(np.rot90(crops, 1, axes=(2, 3))),
                             np.ascontiguousarray(crops[..., ::-1])])
    groups = copy_groups(copy_fingerprints(copies))
    assert len(set(groups.tolist())) == 5
    assert (groups[:5] == groups[5:10]).all() and (groups[:5] == groups[10:]).all()


def test_the_bank_and_the_memory_of_a_score_are_bounded() -> None:
    rng = np.random.default_rng(5)
    neighbours = AppearanceNeighbours.fit(rng.normal(size=(5000, 8)), limit=1000)
    assert neighbours.bank.shape == (1000, 8) and neighbours.bank.dtype == np.float32
    queries = rng.normal(size=(20_000, 8))
    tracemalloc.start()
    neighbours(queries)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # CHUNK x bank distances (2 MB) and the standardised queries (1.3 MB), never 20,000 x bank
    assert peak < 12e6, peak


def test_the_memory_of_the_leave_one_out_is_bounded() -> None:
    # The calibration scores every bank row against all others, O(B^2) time, but one CHUNK of
    # rows at a time: the peak is O(CHUNK x B), not the B x B matrix (8,000^2 x 8 B = 512 MB).
    rng = np.random.default_rng(6)
    peaks = []
    for n in (2000, 8000):
        neighbours = AppearanceNeighbours.fit(rng.normal(size=(n, 8)))
        groups = np.arange(n) // 2  # pairs of copies
        tracemalloc.start()
        scores = neighbours.leave_one_out(groups)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert scores.shape == (n,) and np.isfinite(scores).all()
    chunk_rows = appearance_module.CHUNK * 8000 * 8  # one float64 block of distances
    assert peaks[1] < 6 * chunk_rows, peaks  # a few such blocks (the mask, the partition)
    assert peaks[1] < 6 * peaks[0], peaks  # 4x the bank, about 4x the memory, not 16x


def test_the_descriptor_holds_one_crop_in_flight() -> None:
    # appearance() is O(S^2) memory per crop whatever N: 10x the crops, the same peak (beside
    # the (N, DESCRIPTOR_SIZE) result); the images themselves are the caller's.
    rng = np.random.default_rng(4)
    peaks = []
    for n in (20, 200):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        tracemalloc.start()
        appearance(images)
        peaks.append(tracemalloc.get_traced_memory()[1] - n * DESCRIPTOR_SIZE * 8)
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0] + 1e5, peaks


def _crops(rng: np.random.Generator, n: int, side: int = 24) -> np.ndarray:
    """Blurred noise 'crystals' with a share of blank frames the gate calls empty."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=(n, side, side)), (0, 1.2, 1.2))
    crops = np.clip(120 + 400 * noise, 0, 255).astype(np.uint8)
    crops[rng.random(n) < 0.004] = 90  # blank: not one edge
    return np.repeat(crops[:, None], 3, axis=1)


def test_gate_and_score_together_hold_the_calibrated_rate() -> None:
    # The threshold counts every calibration crop the gate rejects as rejected (a training
    # crop at a limit too), so the whole decision, not the score alone, keeps the rate on new
    # crops like the training ones.
    rng = np.random.default_rng(8)
    train, valid, new = _crops(rng, 600), _crops(rng, 700), _crops(rng, 4000)
    statistics = np.zeros((len(train), 1))
    detector = fit_detector(statistics, np.zeros(len(train)), np.zeros((len(valid), 1)),
                            np.full((len(valid), 2), 0.5), [1], 0.02, method=APPEARANCE,
                            train_images=train, valid_images=valid)
    # the bank is training and validation crops, every one of them scored leave-one-out
    assert detector.gate is not None and detector.calibration["calibration_images"] == 1300
    assert detector.calibration["bank_images"] == 1300
    _, reasons = detector.assess(new, np.zeros((len(new), 1)), np.zeros((len(new), 2)))
    rejected = sum(r is not None for r in reasons)
    assert "empty" in reasons  # the blank frames, whatever their score
    bound = detector.calibration["false_reject_bound"]
    from scipy.stats import binom
    assert binom.sf(rejected - 1, len(new), bound) > 1e-3, (rejected, bound)
    assert rejected > 0.3 * bound * len(new)  # and the threshold is not needlessly high


def test_a_saved_detector_of_either_method_scores_the_same_when_read(tmp_path: Path) -> None:
    import json

    rng = np.random.default_rng(2)
    train, valid = _crops(rng, 120), _crops(rng, 60)
    statistics, valid_statistics = rng.normal(size=(120, 4)), rng.normal(size=(60, 4))
    probabilities = np.full((60, 2), 0.5)
    for method in (APPEARANCE, STAGES):
        detector = fit_detector(statistics, np.arange(120) % 2, valid_statistics,
                                probabilities, [4], 0.05, method=method, train_images=train,
                                valid_images=valid)
        folder = tmp_path / method
        folder.mkdir()
        save_detector(detector, folder)
        (folder / "model.json").write_text(json.dumps({"unknown_detector": detector.describe()}))
        read = load_detector(folder / "model.json")
        assert read is not None and read.method == method
        np.testing.assert_allclose(read.assess(valid, valid_statistics, probabilities)[0],
                                   detector.assess(valid, valid_statistics, probabilities)[0],
                                   rtol=1e-5, atol=1e-6)


def test_a_rounded_shape_unlike_the_training_crystals_scores_above_them(samples: Path) -> None:
    # Bubbles (dark discs in a bright ring) against real crystals and their turned copies.
    crops = _real(samples)
    bank = np.concatenate([crops, *(np.rot90(crops, k, axes=(2, 3)) for k in (1, 2, 3))])
    neighbours = AppearanceNeighbours.fit(appearance(np.ascontiguousarray(bank)), k=3)
    yy, xx = np.mgrid[0:64, 0:64]
    distance = np.hypot(yy - 32, xx - 32)
    bubble = np.full((64, 64), 70.0) - 30 * (distance < 16) + 150 * np.exp(-(distance - 16) ** 2)
    image = np.repeat(np.asarray(Image.fromarray(bubble.astype(np.uint8)))[None], 3, axis=0)
    held_out = neighbours(appearance(crops[:1]))  # a crop in the bank: distance 0 up to k
    assert neighbours(appearance(image[None]))[0] > 2 * max(held_out[0], 1.0)
