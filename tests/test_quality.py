"""The image-quality gate: an empty window, a defocused crop and a saturated flare are named
as such; real crystals pass; the limits hold their share on the crops they were fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from crystalscope.model.spec import ModelSpec, decode
from crystalscope.unknown.quality import (
    EMPTY_EDGES_SHARE,
    EMPTY_STANDOUT_QUANTILE,
    GATE_QUANTILES,
    MEASURES,
    REASONS,
    QualityGate,
    line_strength,
    measure,
)

SPEC = ModelSpec(64, ("cex", "pg"))


@pytest.fixture(scope="module")
def probe_crops(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """1,000 synthetic crops at a probe's crop side (151 px), decoded as a 64-px model sees
    them: enough for the gate's limits ((1000 + 1) * 0.001 >= 1)."""
    from crystalscope.synth.crops import SynthSettings, synthesize

    out = tmp_path_factory.mktemp("probe-crops")
    synthesize(out, SynthSettings(per_class=500, size=151, seed=11), workers=2)
    return np.stack([decode(p, SPEC)[0] for p in sorted(out.rglob("*.png"))])


@pytest.fixture(scope="module")
def gate(probe_crops: np.ndarray) -> QualityGate:
    return QualityGate.fit_images(probe_crops)


def _decoded(*images: Image.Image) -> np.ndarray:
    return np.stack([decode(image, SPEC)[0] for image in images])


def test_a_blank_a_blurred_and_a_saturated_crop_get_their_reasons(gate: QualityGate,
                                                                  samples: Path) -> None:
    crystal = Image.open(samples / "CEX (1).png")
    blank = Image.new("L", (151, 151), 60)  # nothing in front of the probe
    blurred = crystal.filter(ImageFilter.GaussianBlur(6))  # the same field, out of focus
    flare = np.asarray(crystal.convert("L")).copy()
    flare[:, :120] = 255  # four fifths of the window at the sensor's ceiling
    reasons = gate.reasons(measure(_decoded(blank, blurred, Image.fromarray(flare), crystal)))
    assert reasons == ["empty", "blurred", "saturated", None]


def test_the_real_crystals_pass_the_gate(gate: QualityGate, samples: Path) -> None:
    real = _decoded(*(Image.open(p) for p in sorted(samples.glob("*.png"))))
    assert len(real) == 14
    assert gate.reasons(measure(real)).count(None) >= 12  # the bound: <= 2 of 14


def test_the_limits_reject_their_share_of_the_fitted_crops(probe_crops: np.ndarray) -> None:
    crops = probe_crops
    measures = measure(crops)
    n = len(crops)
    for quantile in (0.01, 0.05):
        failed = QualityGate.fit(measures, quantile).failed(measures)
        # each limit is the k-th order statistic, k = floor((n+1) q): fewer than k fitted
        # crops fail it (strictly beyond it), and the gate as a whole fewer than the sum
        k = int(np.floor((n + 1) * quantile))
        edgeless = int((measures[:, 0] == 0).sum())  # empty by definition, whatever the limit
        assert (failed.sum(axis=0) < k + edgeless * np.array([1, 0, 0])).all()
        assert failed.any(axis=1).sum() < len(REASONS) * k + edgeless
    assert sum(GATE_QUANTILES.values()) <= 0.005  # the gate's share of the 1% budget
    few = QualityGate.fit(measures[:100])  # (100 + 1) * 0.002 < 1: no limit is guessed
    assert set(few.limits.values()) == {None}
    assert few.failed(measures).sum() == (measures[:, 0] == 0).sum()


def test_the_gate_is_written_and_read_back_whole(gate: QualityGate) -> None:
    again = QualityGate.from_description(gate.describe())
    assert again == gate
    assert set(gate.describe()["limits"]) == set(REASONS)


# ----------------------------------------------------- through export, predict, serve, monitor


def _gated_predictor(exported_run: Path, probe_crops: np.ndarray):
    """The exported test model with a gate fitted on 1,000 probe crops at its own input side
    (the run's training split is too small for limits at 0.1%)."""
    from crystalscope.infer.predictor import load_predictor

    predictor = load_predictor(exported_run)
    assert predictor.unknown_detector is not None
    spec = predictor.spec
    small = np.stack([decode(Image.fromarray(crop.transpose(1, 2, 0)), spec)[0]
                      for crop in probe_crops])
    predictor.unknown_detector.gate = QualityGate.fit(measure(small))
    return predictor


def test_the_gate_is_exported_with_the_detector(exported_run: Path) -> None:
    import json

    from crystalscope.infer.predictor import load_predictor

    described = json.loads((exported_run / "model.json").read_text())["unknown_detector"]
    gate = described["quality_gate"]
    assert set(gate["limits"]) == set(REASONS)
    assert gate["fitted_on"] == described["calibration"]["train_images"]
    loaded = load_predictor(exported_run).unknown_detector
    assert loaded is not None and loaded.gate == QualityGate.from_description(gate)


def test_predict_gives_the_gates_reasons(exported_run: Path, probe_crops: np.ndarray,
                                         tmp_path: Path) -> None:
    from crystalscope.infer.stream import predict_stream

    predictor = _gated_predictor(exported_run, probe_crops)
    # a window with nothing in it, and one at the sensor's ceiling
    Image.new("L", (151, 151), 60).save(tmp_path / "blank.png")
    Image.new("L", (151, 151), 255).save(tmp_path / "white.png")
    results = list(predict_stream(predictor, [tmp_path / "blank.png", tmp_path / "white.png"]))
    assert [r.unknown_reason for r in results] == ["empty", "empty"]  # no edge in either
    assert all(r.unknown for r in results)


def test_the_monitor_counts_each_reason_apart(exported_run: Path, probe_crops: np.ndarray,
                                              tmp_path: Path) -> None:
    import csv
    import shutil
    from collections import Counter

    from crystalscope.infer.stream import predict_stream
    from crystalscope.monitor.run import Monitor, replay
    from crystalscope.monitor.trend import UNKNOWN_REASONS, AlarmRule

    crystals = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))[:6]
    for window, blanks in (("t0001", 0), ("t0002", 3)):
        folder = tmp_path / "stream" / window
        folder.mkdir(parents=True)
        for crystal in crystals:
            shutil.copy(crystal, folder / f"{crystal.parent.name}-{crystal.name}")
        for number in range(blanks):
            Image.new("L", (151, 151), 40 + 20 * number).save(folder / f"blank{number}.png")
    predictor = _gated_predictor(exported_run, probe_crops)
    rule = AlarmRule("pg", 0.2, unknown_rate=0.01)
    replay(Monitor(predictor, rule, tmp_path / "out", say=lambda _: None), tmp_path / "stream")
    rows = list(csv.DictReader((tmp_path / "out" / "trend.csv").open(newline="")))
    assert len(rows) == 2
    for row in rows:
        files = sorted((tmp_path / "stream" / row["time"]).glob("*.png"))
        expected = Counter(r.unknown_reason for r in predict_stream(predictor, files)
                           if r.unknown)
        assert {reason: int(row[f"unknown_{reason}"]) for reason in UNKNOWN_REASONS} == \
            {reason: expected.get(reason, 0) for reason in UNKNOWN_REASONS}
        assert int(row["count_unknown"]) == sum(expected.values())
    assert sum(int(rows[1][f"unknown_{reason}"]) for reason in REASONS) >= 3  # the blanks


def test_measuring_holds_one_crop_in_flight() -> None:
    """measure's working memory is a few arrays of one crop, not of the batch: the peak for
    400 crops is about the peak for 50 (both far below 400 crops' float copies)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    peaks = {}
    for n in (50, 400):
        images = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        tracemalloc.start()
        measure(images)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one_float_crop = 64 * 64 * 8
    assert peaks[400] < 1.5 * peaks[50] + 400 * 5 * 8  # + the (N, 5) result itself
    # one crop's working set (the eight line filters' FFTs: ~1.7 MB), not 400 crops' copies
    assert peaks[400] < 400 * one_float_crop / 4


def _window(rng: np.random.Generator, faint_line: float = 0.0, side: int = 151) -> Image.Image:
    """A probe window: uneven background, sensor noise and, when ``faint_line`` > 0, one
    needle that many gray levels brighter — too faint for a single edge."""
    from scipy import ndimage

    background = 90 + 60 * ndimage.gaussian_filter(rng.normal(size=(side, side)), 12)
    yy, xx = np.mgrid[0:side, 0:side]
    distance = np.abs((yy - side / 2) * np.cos(0.6) - (xx - side / 2) * np.sin(0.6))
    along = np.abs((yy - side / 2) * np.sin(0.6) + (xx - side / 2) * np.cos(0.6))
    needle = faint_line * np.exp(-distance ** 2 / (2 * 2.5 ** 2)) * (along < side / 3)
    image = background + needle + rng.normal(0, 1.0, (side, side))
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), mode="L")


def test_a_faint_needle_without_an_edge_is_not_empty_but_its_window_is(
        gate: QualityGate) -> None:
    rng = np.random.default_rng(3)
    windows = [_window(rng) for _ in range(5)]
    needles = [_window(rng, faint_line=8.0) for _ in range(5)]
    measures = gate.measure(_decoded(*windows, *needles))
    edges = measures[:, MEASURES.index("edges")]
    standout = measures[:, MEASURES.index("lines")] * measures[:, MEASURES.index("rim")]
    assert (edges == 0).all()  # no edge in any of them: edges alone cannot tell them apart
    assert gate.empty_standout is not None
    assert (standout[:5] < gate.empty_standout).all()
    assert (standout[5:] > gate.empty_standout).all()
    assert gate.reasons(measures) == ["empty"] * 5 + [None] * 5


def _disc(rng: np.random.Generator, contrast: float, side: int = 151) -> Image.Image:
    """A probe window with one faint round particle ``contrast`` gray levels brighter, its
    rim soft (a translucent PG agglomerate) — too faint for a single edge."""
    from scipy import ndimage

    window = np.asarray(_window(rng), np.float64)
    yy, xx = np.mgrid[0:side, 0:side]
    disc = (np.hypot(yy - side / 2, xx - side / 2) < side / 4).astype(np.float64)
    return Image.fromarray(np.clip(window + contrast * ndimage.gaussian_filter(disc, 1.5),
                                   0, 255).round().astype(np.uint8), mode="L")


def test_a_faint_disc_stands_out_by_its_rim(gate: QualityGate) -> None:
    """rim sees a faint particle's outline that lines alone (no line in a disc) scores
    like an empty window."""
    rng = np.random.default_rng(5)
    measures = gate.measure(_decoded(*(_disc(rng, 10.0) for _ in range(5))))
    windows = gate.measure(_decoded(*(_window(rng) for _ in range(5))))
    rim = MEASURES.index("rim")
    assert (measures[:, MEASURES.index("edges")] == 0).all()
    assert measures[:, rim].min() > 1.5 * windows[:, rim].max()
    assert gate.reasons(measures) == [None] * 5


def test_sharpness_sees_defocus_through_pixel_noise() -> None:
    """A 96-px crop blurred over 6 px with fresh sensor noise on top (as a defocused probe
    image, and ``synth unknown``'s defocus kind): the noise lifts focus (the raw gradient) by
    a third, sharpness (the gradient after 1 px smoothing) by less than a tenth."""
    from scipy import ndimage

    rng = np.random.default_rng(6)
    sharp = np.asarray(_window(rng, faint_line=60.0, side=96), np.float64)
    blurred = ndimage.gaussian_filter(sharp, 6)
    noisy = blurred + rng.normal(0, 2, blurred.shape)
    rows = measure(np.stack([np.repeat(np.clip(x, 0, 255).round().astype(np.uint8)[None], 3, 0)
                             for x in (sharp, blurred, noisy)]))
    focus, sharpness = rows[:, MEASURES.index("focus")], rows[:, MEASURES.index("sharpness")]
    assert focus[2] > 1.3 * focus[1]
    assert sharpness[2] < 1.1 * sharpness[1]
    assert sharpness[2] < 0.5 * sharpness[0]  # and the blur halves it


def test_line_strength_ignores_brightness_and_contrast() -> None:
    gray = np.asarray(_window(np.random.default_rng(4), faint_line=8.0), np.float64)
    strength = line_strength(gray)
    assert line_strength(3.0 * gray + 40) == pytest.approx(strength, rel=1e-9)
    assert line_strength(np.full((64, 64), 80.0)) == 0.0  # nothing stands out of a flat crop


def test_the_empty_rule_rejects_its_share_of_the_few_edge_crops(
        probe_crops: np.ndarray) -> None:
    """Few edges (the 5% quantile) and lines x rim below the 5% conformal bound of those
    crops: fewer than k of the m few-edge fitted crops fail it, k = floor((m + 1) 0.05), and
    k of them when counted inclusive (as calibration counts the training crops)."""
    measures = measure(probe_crops)
    gate = QualityGate.fit(measures)
    edges = measures[:, MEASURES.index("edges")]
    few = edges <= np.quantile(edges, EMPTY_EDGES_SHARE, method="lower")
    k = int(np.floor((few.sum() + 1) * EMPTY_STANDOUT_QUANTILE))
    assert k >= 1
    column = list(REASONS).index("empty")
    empty = gate.failed(measures)[:, column]
    assert not (empty & ~few).any()  # a crop with more edges is never empty
    assert empty.sum() < k
    assert gate.failed(measures, inclusive=True)[:, column].sum() == k
    # fit_images measures lines only where the rule reads them, and fits the same gate
    assert QualityGate.fit_images(probe_crops) == gate
    skipped = gate.measure(probe_crops)
    assert np.isnan(skipped[~few, MEASURES.index("lines")]).all()
    assert np.array_equal(gate.failed(skipped), gate.failed(measures))
    # fit_measured hands back the training crops' measures exactly as the gate measures them
    fitted, measured = QualityGate.fit_measured(probe_crops)
    assert fitted == gate
    np.testing.assert_array_equal(measured, skipped)  # NaN where lines are skipped, too


def test_inclusive_counts_the_crops_at_each_limit(probe_crops: np.ndarray) -> None:
    """Counted inclusive, exactly k = floor((n + 1) q) fitted crops fail blurred and
    saturated (ties aside), one more each than strictly beyond."""
    measures = measure(probe_crops)
    gate = QualityGate.fit(measures)
    strict, inclusive = gate.failed(measures), gate.failed(measures, inclusive=True)
    for reason, quantile in GATE_QUANTILES.items():
        k = int(np.floor((len(measures) + 1) * quantile))
        column = list(REASONS).index(reason)
        assert strict[:, column].sum() == k - 1
        assert inclusive[:, column].sum() == k


def _as_version_1(gate: QualityGate, lines: float | None) -> QualityGate:
    """The gate as version 1 stored it: blurred on focus, empty by lines (or, before lines,
    no edge at all)."""
    described = gate.describe()
    described.update(version=1, empty_lines=lines)
    del described["empty_standout"]
    return QualityGate.from_description(described)


def test_a_gate_stored_before_lines_keeps_its_edge_rule(gate: QualityGate) -> None:
    older = _as_version_1(gate, None)
    assert older.empty_lines is None and older.version == 1
    rows = np.zeros((2, len(MEASURES)))
    rows[:, MEASURES.index("focus")] = rows[:, MEASURES.index("sharpness")] = 1.0
    rows[:, MEASURES.index("lines")] = (99.0, 0.0)
    rows[1, MEASURES.index("edges")] = 0.5
    assert older.reasons(rows) == ["empty", None]  # no edge at all is empty, whatever lines


def test_a_version_1_gate_keeps_its_rules(gate: QualityGate) -> None:
    """blurred read on focus, empty on lines alone: a stored model decides as before."""
    older = _as_version_1(gate, 6.0)
    rows = np.zeros((3, len(MEASURES)))
    rows[:, MEASURES.index("focus")] = (1.0, 0.0, 1.0)  # the second: blurred by focus
    rows[:, MEASURES.index("sharpness")] = (1.0, 1.0, 1.0)  # ... though sharp by sharpness
    rows[:, MEASURES.index("lines")] = (5.0, 99.0, 99.0)  # the first: no line standing out
    rows[:, MEASURES.index("rim")] = 100.0  # which lines x rim would not call empty
    rows[2, MEASURES.index("edges")] = 0.5
    assert older.reasons(rows) == ["empty", "blurred", None]
    assert gate.reasons(rows) == [None, None, None]  # version 2 reads sharpness and rim
