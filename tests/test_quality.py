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
    EMPTY_LINES_QUANTILE,
    GATE_QUANTILE,
    MEASURES,
    REASONS,
    QualityGate,
    line_strength,
    measure,
)

SPEC = ModelSpec(64, ("cex", "pg"))


@pytest.fixture(scope="module")
def probe_crops(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """500 synthetic crops at a probe's crop side (151 px), decoded as a 64-px model sees
    them: enough for the gate's limits ((500 + 1) * 0.002 >= 1)."""
    from crystalscope.synth.crops import SynthSettings, synthesize

    out = tmp_path_factory.mktemp("probe-crops")
    synthesize(out, SynthSettings(per_class=250, size=151, seed=11), workers=1)
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
    assert GATE_QUANTILE * len(REASONS) <= 0.01  # the gate's share of the 1% budget
    few = QualityGate.fit(measures[:100])  # (100 + 1) * 0.002 < 1: no limit is guessed
    assert set(few.limits.values()) == {None}
    assert few.failed(measures).sum() == (measures[:, 0] == 0).sum()


def test_the_gate_is_written_and_read_back_whole(gate: QualityGate) -> None:
    again = QualityGate.from_description(gate.describe())
    assert again == gate
    assert set(gate.describe()["limits"]) == set(REASONS)


# ----------------------------------------------------- through export, predict, serve, monitor


def _gated_predictor(exported_run: Path, probe_crops: np.ndarray):
    """The exported test model with a gate fitted on 500 probe crops at its own input side
    (the run's training split is too small for limits at 0.2%)."""
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
    edges, lines = measures[:, MEASURES.index("edges")], measures[:, MEASURES.index("lines")]
    assert (edges == 0).all()  # no edge in any of them: edges alone cannot tell them apart
    assert gate.empty_lines is not None
    assert (lines[:5] < gate.empty_lines).all() and (lines[5:] > gate.empty_lines).all()
    assert gate.reasons(measures) == ["empty"] * 5 + [None] * 5


def test_line_strength_ignores_brightness_and_contrast() -> None:
    gray = np.asarray(_window(np.random.default_rng(4), faint_line=8.0), np.float64)
    strength = line_strength(gray)
    assert line_strength(3.0 * gray + 40) == pytest.approx(strength, rel=1e-9)
    assert line_strength(np.full((64, 64), 80.0)) == 0.0  # nothing stands out of a flat crop


def test_the_empty_rule_rejects_its_share_of_the_few_edge_crops(
        probe_crops: np.ndarray) -> None:
    """Few edges (the 5% quantile) and lines below the 10% conformal bound of those crops:
    fewer than k of the m few-edge fitted crops fail it, k = floor((m + 1) 0.1)."""
    measures = measure(probe_crops)
    gate = QualityGate.fit(measures)
    edges = measures[:, MEASURES.index("edges")]
    few = edges <= np.quantile(edges, EMPTY_EDGES_SHARE, method="lower")
    k = int(np.floor((few.sum() + 1) * EMPTY_LINES_QUANTILE))
    assert k >= 1
    empty = gate.failed(measures)[:, list(REASONS).index("empty")]
    assert not (empty & ~few).any()  # a crop with more edges is never empty
    assert empty.sum() < k
    # fit_images measures lines only where the rule reads them, and fits the same gate
    assert QualityGate.fit_images(probe_crops) == gate
    skipped = gate.measure(probe_crops)
    assert np.isnan(skipped[~few, MEASURES.index("lines")]).all()
    assert np.array_equal(gate.failed(skipped), gate.failed(measures))


def test_a_gate_stored_before_lines_keeps_its_edge_rule(gate: QualityGate) -> None:
    described = gate.describe()
    del described["empty_lines"]
    older = QualityGate.from_description(described)
    assert older.empty_lines is None
    rows = np.array([[0.0, 1.0, 0.0, 0.0, 99.0], [0.5, 1.0, 0.0, 0.0, 0.0]])
    assert older.reasons(rows) == ["empty", None]  # no edge at all is empty, whatever lines
