"""Operating points: temperature scaling and a class threshold chosen on validation — against
scikit-learn's metrics, on an over-confident model, and used by predict, serve and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import precision_score, recall_score
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.evaluate.statistics import expected_calibration_error
from crystalscope.operating_point import (
    ThresholdTarget,
    choose_operating_point,
    fit_temperature,
    probabilities_at,
    temperature_effect,
)
from crystalscope.settings import SettingsError

CLASSES = ["cex", "pg"]


def _honest_logits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution (truth drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = softmax(logits, axis=1)
    truth = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, truth


def test_temperature_undoes_over_confidence() -> None:
    logits, truth = _honest_logits(6000, 3, seed=0)
    over = 4.0 * logits  # a deliberately over-confident model
    temperature = fit_temperature(over, truth)
    assert temperature == pytest.approx(4.0, rel=0.15)
    effect = temperature_effect(over, truth, temperature)
    assert effect["ece_after"] < 0.5 * effect["ece_before"]
    assert effect["log_loss_after"] < effect["log_loss_before"]
    scaled = probabilities_at(over[None], temperature)
    assert effect["ece_after"] == pytest.approx(
        expected_calibration_error(truth, scaled)["ece"])
    assert (scaled.argmax(1) == over.argmax(1)).all()  # one view: no decision changes


def test_temperature_of_dihedral_views_is_fitted_on_their_mean() -> None:
    logits, truth = _honest_logits(3000, 2, seed=1)
    views = np.stack([3.0 * logits + noise for noise in
                      np.random.default_rng(2).normal(0, 0.3, (8, *logits.shape))])
    temperature = fit_temperature(views, truth)
    mean = probabilities_at(views, temperature)
    by_hand = softmax(views / temperature, axis=2).mean(axis=0)
    assert np.allclose(mean, by_hand)
    assert 2.0 < temperature < 4.5


@pytest.mark.parametrize("metric,target", [("recall", 0.9), ("recall", 0.99),
                                           ("precision", 0.8), ("precision", 0.95)])
def test_threshold_meets_its_target_and_no_more_than_needed(metric: str, target: float) -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 800)
    score = np.clip(0.5 + 0.25 * (2 * truth - 1) + rng.normal(0, 0.2, 800), 0, 1).round(3)
    probabilities = np.stack([1 - score, score], axis=1)  # rounded: many ties
    point = choose_operating_point(probabilities, truth, CLASSES,
                                   ThresholdTarget("pg", metric, target))  # type: ignore[arg-type]
    measure = recall_score if metric == "recall" else precision_score
    called = point.decide(probabilities)
    achieved = measure(truth == 1, called == 1)
    assert achieved >= target
    assert point.validation[metric]["value"] == pytest.approx(achieved)
    low, high = point.validation[metric]["ci95"]
    assert low <= achieved <= high
    # the next threshold in the direction the rule would move no longer meets the target
    scores = np.unique(score)
    at = np.searchsorted(scores, point.threshold)
    neighbour = scores[at + 1] if metric == "recall" else scores[at - 1]
    assert measure(truth == 1, score >= neighbour) < target


def test_choosing_and_fitting_stay_linear_in_memory() -> None:
    # O(N) arrays only: at 10^6 images a threshold peaked at 76 MiB and T at 217 MiB; a pairwise
    # (N x N) step would need gigabytes at 2 x 10^5 images.
    import tracemalloc

    logits, truth = _honest_logits(200_000, 2, seed=5)
    probabilities = softmax(logits, axis=1)
    for work, per_image in (
            (lambda: choose_operating_point(probabilities, truth, CLASSES,
                                            ThresholdTarget("pg", "precision", 0.8)), 150),
            (lambda: fit_temperature(3 * logits, truth), 400)):
        tracemalloc.start()
        work()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < per_image * len(truth), peak


def test_decide_calls_the_class_at_its_threshold_else_the_best_other() -> None:
    point = choose_operating_point(np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7]]),
                                   np.array([0, 2]), ["a", "b", "c"],
                                   ThresholdTarget("c", "recall", 0.5))
    assert point.threshold == pytest.approx(0.7)
    rows = np.array([[0.2, 0.1, 0.7], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.05, 0.7]])
    assert point.decide(rows).tolist() == [2, 0, 1, 2]


@pytest.mark.parametrize("text,message", [
    ("pg", "write CLASS=recall:R or CLASS=precision:P"),
    ("pg=f1:0.9", "write CLASS=recall:R"),
    ("xx=recall:0.9", "'xx' is not a class of the model"),
    ("pg=recall:1.5", "between 0 and 1"),
    ("pg=recall:abc", "between 0 and 1"),
])
def test_threshold_text_is_checked(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ThresholdTarget.parse(text, CLASSES)
    assert ThresholdTarget.parse("pg=recall:99%", CLASSES).value == pytest.approx(0.99)


def test_unreachable_precision_is_refused() -> None:
    truth = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    with pytest.raises(SettingsError, match=r"no threshold reaches pg precision 0\.99"):
        choose_operating_point(probabilities, truth, CLASSES,
                               ThresholdTarget("pg", "precision", 0.99))


def _over_confident_copy(trained_run: Path, where: Path) -> Path:
    """The tiny run made wrong and sure of it: its last layer half its own direction, half a
    random one, scaled so that the logits' spread is about 12 (the tiny model alone makes no
    validation errors, so it cannot be over-confident)."""
    from crystalscope.data.decoded import build_cache
    from crystalscope.model.inference import load_run, view_logits_batches

    run = Path(shutil.copytree(trained_run, where / "run", ignore=shutil.ignore_patterns(
        "model.*", "unknown.*", "report.*", "*.png")))
    path = run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    weight = max((k for k in state if k.startswith("net.head.") and k.endswith(".weight")
                  and state[k].shape[0] == len(CLASSES)), key=lambda k: int(k.split(".")[2]))
    bias = weight.replace(".weight", ".bias")
    noise = torch.randn(state[weight].shape, generator=torch.Generator().manual_seed(0))
    state[weight] = state[weight] / state[weight].norm() + noise / noise.norm()
    state[bias] = torch.zeros_like(state[bias])
    torch.save(checkpoint, path)
    loaded = load_run(run)
    valid = build_cache(loaded.data.split("valid"), loaded.spec)
    spread = float(view_logits_batches(loaded.net, valid.images).std())
    state[weight] = state[weight] * 12.0 / spread
    torch.save(checkpoint, path)
    return run


def test_export_calibrates_an_over_confident_model_and_its_threshold_is_used(
        trained_run: Path, tmp_path: Path) -> None:
    from crystalscope.evaluate.stage import evaluate_run
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.model.spec import ModelSpec, decode

    run = _over_confident_copy(trained_run, tmp_path)
    evaluate_run(run)  # the test report export will write again
    before = json.loads((run / "report.json").read_text())["calibration"]["ece"]
    result = CliRunner().invoke(app, ["export", str(run), "--calibrate", "temperature",
                                      "--threshold", "pg=recall:0.9"])
    assert result.exit_code == 0, result.output
    assert "temperature scaling: T =" in result.output and "operating point: pg" in result.output
    description = json.loads((run / "model.json").read_text())
    scaling = description["temperature_scaling"]
    assert description["architecture"]["temperature"] == scaling["temperature"]
    assert scaling["temperature"] > 2
    assert scaling["validation"]["ece_after"] < scaling["validation"]["ece_before"]

    report = json.loads((run / "report.json").read_text())  # evaluated again, calibrated
    assert report["calibration"]["ece"] < before
    assert report["temperature_scaling"]["temperature"] == scaling["temperature"]
    assert report["operating_point"]["threshold"] == description["operating_point"]["threshold"]
    text = (run / "report.txt").read_text()
    assert "probabilities temperature-scaled" in text and "operating point: pg when" in text

    # the ONNX model (as predict and serve load it) carries the threshold; on validation its
    # calls meet the asked recall, by scikit-learn
    predictor = load_predictor(run)
    assert predictor.operating_point is not None
    threshold = predictor.operating_point.threshold
    valid = sorted((Path(description["data"]["path"]) / "valid").rglob("*.png"))
    spec = ModelSpec(32, tuple(CLASSES))
    pixels = np.stack([decode(p, spec)[0] for p in valid])
    probabilities = predictor.predict(pixels).probabilities
    truth = np.array([CLASSES.index(p.parent.name) for p in valid])
    called = predictor.decide(probabilities)
    assert recall_score(truth == 1, called == 1) >= 0.9
    assert (called == np.where(probabilities[:, 1] >= threshold, 1, 0)).all()
    assert json.loads((run / "model.json").read_text())["operating_point"]["validation"][
        "recall"]["value"] == pytest.approx(recall_score(truth == 1, called == 1))

    # predict writes what the threshold calls
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(run), *map(str, valid), "--output",
                                      str(out)])
    assert result.exit_code == 0, result.output
    import csv

    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["predicted_class"] for r in rows] == [CLASSES[i] for i in called]

    # serve answers with the same calls
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import running
    from test_serve import _get, _post  # tests/ is on sys.path (pytest's rootdir import)

    with running(create_app(ServeSettings(predictor=predictor))) as url:
        code, body = _post(f"{url}/predict", [("files", p.name, p.read_bytes())
                                              for p in valid[:8]])
        model_code, model = _get(f"{url}/model")
    assert code == 200
    assert [r["predicted_class"] for r in body["results"]] == [CLASSES[i] for i in called[:8]]
    assert model_code == 200 and model["operating_point"]["threshold"] == threshold
    card = (run / "README.md").read_text()
    assert f"decision: pg when P(pg) >= {threshold:.4g}" in card and "Operating point" in card

    # exported again without them: the report and the card are the plain model's once more
    result = CliRunner().invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert "operating_point" not in report and "temperature_scaling" not in report
    assert report["calibration"]["ece"] == pytest.approx(before)
    assert "decision: the most probable class" in (run / "README.md").read_text()
    assert load_predictor(run).operating_point is None
