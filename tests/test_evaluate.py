"""Evaluate: every reported number against scikit-learn (and scipy, torchmetrics), the
formatting rule that hides no error, real PNG plots with the model's class names, and the
command on a trained run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import bootstrap
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from torchmetrics.classification import MulticlassCalibrationError

from crystalscope.cli import main
from crystalscope.evaluate import plots
from crystalscope.evaluate.predictions import Predictions
from crystalscope.evaluate.report import compute_report, format_value, render_text
from crystalscope.evaluate.stage import evaluate_run
from crystalscope.model.inference import load_run


def _predictions(num_classes: int, n: int, accuracy: float, seed: int,
                 classes: list[str] | None = None) -> Predictions:
    """Random, imperfect predictions: the true class gets a boost on about ``accuracy``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    boost = rng.random(n) < accuracy
    logits[np.arange(n), labels] += np.where(boost, 3.0, 0.0)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = classes or [f"class{c}" for c in range(num_classes)]
    return Predictions(classes=names, paths=[Path(f"img{i}.png") for i in range(n)],
                       labels=labels, probabilities=probabilities, skipped=[])


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (an independent reference)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("num_classes", "seed"), [(2, 0), (3, 1), (5, 2)])
def test_every_metric_equals_scikit_learn(num_classes: int, seed: int) -> None:
    predictions = _predictions(num_classes, 300, 0.8, seed)
    report = compute_report(predictions)
    y, p, proba = predictions.labels, predictions.predicted, predictions.probabilities
    precision, recall, f1, support = precision_recall_fscore_support(y, p, zero_division=0)
    for c, name in enumerate(predictions.classes):
        row = report["per_class"][name]
        assert row["precision"]["value"] == pytest.approx(precision[c], abs=1e-12)
        assert row["recall"]["value"] == pytest.approx(recall[c], abs=1e-12)
        assert row["f1"]["value"] == pytest.approx(f1[c], abs=1e-12)
        assert row["support"] == support[c]
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y, p, average=average, zero_division=0)
        for index, metric in enumerate(("precision", "recall", "f1")):
            assert report[average][metric]["value"] == pytest.approx(expected[index], abs=1e-12)
    assert report["accuracy"]["value"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert report["misclassified"] == int((y != p).sum()) > 0
    assert report["confusion_matrix"] == confusion_matrix(y, p).tolist()
    auc = (roc_auc_score(y, proba[:, 1]) if num_classes == 2
           else roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert report["roc_auc"]["value"] == pytest.approx(auc, abs=1e-12)


def test_wilson_intervals_match_the_formula() -> None:
    predictions = _predictions(2, 250, 0.85, 4)
    report = compute_report(predictions)
    matrix = np.array(report["confusion_matrix"])
    for c, name in enumerate(predictions.classes):
        row = report["per_class"][name]
        assert row["precision"]["ci95"] == pytest.approx(
            _wilson(matrix[c, c], matrix[:, c].sum()), abs=1e-9)
        assert row["recall"]["ci95"] == pytest.approx(
            _wilson(matrix[c, c], matrix[c].sum()), abs=1e-9)
    correct = int(np.trace(matrix))
    assert report["accuracy"]["ci95"] == pytest.approx(_wilson(correct, 250), abs=1e-9)


def test_bootstrap_f1_interval_agrees_with_scipy() -> None:
    predictions = _predictions(2, 400, 0.8, 5)
    report = compute_report(predictions)
    y, p = predictions.labels, predictions.predicted
    reference = bootstrap((y, p), lambda a, b: f1_score(a, b, average="macro"), paired=True,
                          vectorized=False, n_resamples=2000, method="percentile",
                          random_state=1).confidence_interval
    low, high = report["macro"]["f1"]["ci95"]
    assert low < report["macro"]["f1"]["value"] < high
    assert low == pytest.approx(reference.low, abs=0.015)
    assert high == pytest.approx(reference.high, abs=0.015)


def test_expected_calibration_error_equals_torchmetrics() -> None:
    predictions = _predictions(3, 500, 0.7, 6)
    report = compute_report(predictions)
    reference = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(
        torch.tensor(predictions.probabilities, dtype=torch.float64),
        torch.tensor(predictions.labels))
    assert report["calibration"]["ece"] == pytest.approx(float(reference), abs=1e-6)


def test_no_value_below_one_is_printed_as_one() -> None:
    assert format_value(0.99996) == "0.9999"
    assert format_value(1.0) == "1.0000"
    assert format_value(0.00004) == "0.0001"
    assert format_value(0.0) == "0.0000"
    assert format_value(0.12345) in ("0.1234", "0.1235")
    assert format_value(None) == "n/a"
    # 1 error in 20,000 images: the original project would print 100%.
    n = 20_000
    labels = np.zeros(n, dtype=int)
    labels[: n // 2] = 1
    probabilities = np.zeros((n, 2))
    probabilities[np.arange(n), labels] = 0.9
    probabilities[np.arange(n), 1 - labels] = 0.1
    probabilities[0] = [0.9, 0.1]  # image 0 is class 1, predicted 0
    predictions = Predictions(["cex", "pg"], [Path(f"{i}.png") for i in range(n)], labels,
                              probabilities, [])
    report = compute_report(predictions)
    text = render_text(report, title="t")
    assert report["misclassified"] == 1
    accuracy_line = next(line for line in text.splitlines() if line.startswith("accuracy"))
    assert accuracy_line.split()[1] == "0.9999"
    assert "1 misclassified" in text


def test_plots_are_png_files_with_the_models_class_names(tmp_path: Path) -> None:
    classes = ["needle", "blob", "plate"]  # never hard-coded names
    predictions = _predictions(3, 60, 0.7, 7, classes)
    report = compute_report(predictions)
    figure = plots.plot_confusion_matrix(report["confusion_matrix"], classes,
                                         tmp_path / "cm.png")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == classes
    assert [t.get_text() for t in axes.get_yticklabels()] == classes
    cells = [t.get_text() for t in axes.texts]
    matrix = np.array(report["confusion_matrix"])
    assert cells[0].split("\n")[0] == str(matrix[0, 0])
    assert all(not c.endswith("\n100.0%") for c in cells)
    roc = plots.plot_roc(predictions, tmp_path / "roc.png")
    legend = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert all(any(name in entry for entry in legend) for name in classes)
    plots.plot_reliability(report["calibration"], tmp_path / "rel.png")
    for name in ("cm.png", "roc.png", "rel.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 200
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_evaluate_run_writes_the_report_and_plots(trained_run: Path) -> None:
    evaluation = evaluate_run(trained_run)
    assert evaluation.out_dir == trained_run
    for name in ("report.txt", "report.json", "confusion_matrix.png", "curves.png",
                 "errors.png", "roc.png", "reliability.png"):
        path = trained_run / name
        assert path.is_file(), name
        if name.endswith(".png"):
            with Image.open(path) as image:
                assert image.format == "PNG"
    document = json.loads((trained_run / "report.json").read_text())
    test_files = sorted((trained_run.parent.parent / "splits" / "test").rglob("*.png"))
    assert len(document["predictions"]) == len(test_files) == document["images"]
    # The per-image probabilities are the checkpoint's on those files.
    run = load_run(trained_run)
    first = document["predictions"][0]
    from crystalscope.model.spec import decode

    image = torch.from_numpy(decode(Path(first["path"]), run.spec)[0])[None]
    with torch.inference_mode():
        probabilities = run.net(image)[0][0].tolist()
    assert [first["probabilities"][c] for c in run.classes] == pytest.approx(probabilities,
                                                                           abs=1e-5)
    text = (trained_run / "report.txt").read_text()
    assert "cex" in text and "pg" in text and "95%" in text


def test_evaluate_another_labelled_folder(trained_run: Path, sample_classes: Path) -> None:
    evaluation = evaluate_run(trained_run, sample_classes)
    assert evaluation.out_dir == trained_run / "evaluations" / "samples"
    assert evaluation.report["images"] == 14  # the real public crops
    assert (evaluation.out_dir / "report.json").is_file()


def test_evaluate_bad_input_is_one_line(trained_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other" / "mystery").mkdir(parents=True)
    shutil.copy(next(trained_run.parent.parent.joinpath("splits", "test").rglob("*.png")),
                tmp_path / "other" / "mystery" / "a.png")
    for argv, expected in (
        (["evaluate", str(tmp_path)], "not a run directory"),
        (["evaluate", str(trained_run), str(tmp_path / "other")], "not classes of the model"),
        (["evaluate", str(trained_run), str(tmp_path / "missing")], "no such folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert expected in error and "Traceback" not in error
