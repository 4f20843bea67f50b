"""The evaluation report: metrics with 95% intervals, as text and JSON.

Point estimates come from scikit-learn. Intervals: Wilson score intervals (scipy) for the
proportions — precision, recall, accuracy — and percentile bootstrap intervals (images
resampled with replacement) for F1, the averages and ROC AUC. Numbers are printed with 4
decimals, and a value below 1 is never printed as 1.0000.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from crystalscope.evaluate.statistics import expected_calibration_error, wilson_interval
from crystalscope.model.spec import RunLayout

if TYPE_CHECKING:  # predictions decode with torch; the monitor's intervals do not
    from crystalscope.evaluate.predictions import Predictions

BOOTSTRAP_RESAMPLES = 2000
AUC_BOOTSTRAP_RESAMPLES = 500


def format_value(value: float | None, decimals: int = 4) -> str:
    """``value`` with ``decimals`` decimals; never 1.0000 below 1, never 0.0000 above 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{decimals}f}"
    step = 10.0 ** -decimals
    if value < 1 and float(text) >= 1:
        text = f"{1 - step:.{decimals}f}"
    elif value > 0 and float(text) <= 0:
        text = f"{step:.{decimals}f}"
    return text


def _counts(truth: np.ndarray, predicted: np.ndarray, num_classes: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, predicted counts and true counts per class, for (B, N) resamples."""
    classes = np.arange(num_classes)[:, None, None]  # (C, 1, 1) against (B, N)
    is_true, is_pred = truth[None] == classes, predicted[None] == classes
    return ((is_true & is_pred).sum(-1).T, is_pred.sum(-1).T, is_true.sum(-1).T)  # each (B, C)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0: an undefined ratio counts as 0.
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def bootstrap_scores(truth: np.ndarray, predicted: np.ndarray, num_classes: int, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Per-resample scores: per-class F1 (B, C); macro and weighted P/R/F1 (B,)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, resamples, 100):  # chunks keep memory flat for large test sets
        index = rng.integers(0, len(truth), size=(min(100, resamples - start), len(truth)))
        chunks.append(_counts(truth[index], predicted[index], num_classes))
    tp, n_pred, n_true = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
    precision, recall = _safe_ratio(tp, n_pred), _safe_ratio(tp, n_true)
    f1 = _safe_ratio(2 * tp, n_pred + n_true)
    weights = n_true / n_true.sum(axis=1, keepdims=True)
    return {
        "f1": f1,
        "precision_macro": precision.mean(1), "recall_macro": recall.mean(1),
        "f1_macro": f1.mean(1),
        "precision_weighted": (precision * weights).sum(1),
        "recall_weighted": (recall * weights).sum(1), "f1_weighted": (f1 * weights).sum(1),
    }


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def roc_auc(truth: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Binary: AUC of P(second class); more classes: macro one-vs-rest. None if undefined."""
    num_classes = probabilities.shape[1]
    if len(np.unique(truth)) < num_classes:
        return None  # a class without images has no ROC curve
    if num_classes == 2:
        return float(roc_auc_score(truth, probabilities[:, 1]))
    return float(roc_auc_score(truth, probabilities, multi_class="ovr", average="macro",
                               labels=list(range(num_classes))))


def bootstrap_auc(truth: np.ndarray, probabilities: np.ndarray, *,
                  resamples: int = AUC_BOOTSTRAP_RESAMPLES, seed: int = 0
                  ) -> tuple[float, float] | None:
    """Percentile interval of the AUC over resamples in which every class occurs."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(truth), size=len(truth))
        value = roc_auc(truth[index], probabilities[index])
        if value is not None:
            values.append(value)
    return _percentiles(np.array(values)) if len(values) >= resamples // 2 else None


def _metric(value: float | None, interval: tuple[float, float] | None, method: str) -> dict:
    return {"value": value, "ci95": list(interval) if interval else None, "method": method}


def compute_report(predictions: Predictions, *, seed: int = 0) -> dict[str, Any]:
    """Every number of the report, from one set of predictions."""
    truth, predicted = predictions.labels, predictions.predicted
    probabilities, classes = predictions.probabilities, predictions.classes
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0)
    matrix = confusion_matrix(truth, predicted, labels=labels)
    boot = bootstrap_scores(truth, predicted, len(classes), seed=seed)
    per_class = {}
    for c, name in enumerate(classes):
        tp, n_pred, n_true = int(matrix[c, c]), int(matrix[:, c].sum()), int(matrix[c].sum())
        per_class[name] = {
            "precision": _metric(float(precision[c]), wilson_interval(tp, n_pred), "wilson"),
            "recall": _metric(float(recall[c]), wilson_interval(tp, n_true), "wilson"),
            "f1": _metric(float(f1[c]), _percentiles(boot["f1"][:, c]), "bootstrap"),
            "support": int(support[c]),
        }
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=labels,
                                                     average=average, zero_division=0)
        averages[average] = {
            name: _metric(float(value), _percentiles(boot[f"{name}_{average}"]), "bootstrap")
            for name, value in (("precision", p), ("recall", r), ("f1", f))
        }
    correct = int((truth == predicted).sum())
    auc = roc_auc(truth, probabilities)
    auc_kind = (f"binary, P({classes[1]})" if len(classes) == 2 else "one-vs-rest, macro")
    return {
        "classes": classes,
        "images": len(truth),
        "misclassified": len(truth) - correct,
        "accuracy": _metric(float(accuracy_score(truth, predicted)),
                            wilson_interval(correct, len(truth)), "wilson"),
        "per_class": per_class,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "roc_auc": {**_metric(auc, bootstrap_auc(truth, probabilities, seed=seed)
                              if auc is not None else None, "bootstrap"), "average": auc_kind},
        "calibration": expected_calibration_error(truth, probabilities),
        "confusion_matrix": matrix.tolist(),
        "skipped": predictions.skipped,
        "bootstrap_resamples": {"scores": BOOTSTRAP_RESAMPLES, "auc": AUC_BOOTSTRAP_RESAMPLES,
                                "seed": seed},
    }


def per_image(predictions: Predictions) -> list[dict[str, Any]]:
    """One record per image: path, truth, prediction and every class's probability."""
    classes = predictions.classes
    return [{"path": str(path), "true": classes[t], "predicted": classes[p],
             "probabilities": {name: float(v) for name, v in zip(classes, row, strict=True)}}
            for path, t, p, row in zip(predictions.paths, predictions.labels,
                                       predictions.predicted, predictions.probabilities,
                                       strict=True)]


def _with_ci(metric: dict) -> str:
    text = format_value(metric["value"])
    if metric["ci95"]:
        low, high = metric["ci95"]
        text += f" [{format_value(low)}, {format_value(high)}]"
    return text


def render_text(report: dict[str, Any], *, title: str) -> str:
    """The human-readable report.txt."""
    width = max(12, *(len(c) for c in report["classes"])) + 2
    column = 26
    lines = [
        title,
        f"{report['images']} images, {report['misclassified']} misclassified",
        "95% intervals in brackets: Wilson for precision, recall and accuracy; percentile "
        f"bootstrap ({report['bootstrap_resamples']['scores']} resamples) for F1 and averages",
        "",
        f"{'':{width}}{'precision':{column}}{'recall':{column}}{'f1':{column}}support",
    ]
    for name, row in report["per_class"].items():
        lines.append(f"{name:{width}}{_with_ci(row['precision']):{column}}"
                     f"{_with_ci(row['recall']):{column}}{_with_ci(row['f1']):{column}}"
                     f"{row['support']}")
    lines.append("")
    for average in ("macro", "weighted"):
        row = report[average]
        lines.append(f"{average + ' avg':{width}}{_with_ci(row['precision']):{column}}"
                     f"{_with_ci(row['recall']):{column}}{_with_ci(row['f1']):{column}}"
                     f"{report['images']}")
    auc = report["roc_auc"]
    lines += [
        f"{'accuracy':{width}}{_with_ci(report['accuracy'])}",
        f"{'ROC AUC':{width}}{_with_ci(auc)}  ({auc['average']})",
        f"{'ECE':{width}}{format_value(report['calibration']['ece'])}  (expected calibration "
        f"error, {report['calibration']['bins']} confidence bins)",
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
        f"{'':{width}}" + "".join(f"{name:>{width}}" for name in report["classes"]),
    ]
    for name, counts in zip(report["classes"], report["confusion_matrix"], strict=True):
        lines.append(f"{name:{width}}" + "".join(f"{n:>{width}}" for n in counts))
    lines += operating_lines(report)
    if report.get("unknown_detector"):
        lines += ["", *unknown_lines(report["unknown_detector"])]
    if report["skipped"]:
        lines += ["", f"{len(report['skipped'])} unreadable image(s) skipped:",
                  *(f"  {s}" for s in report["skipped"])]
    return "\n".join(lines) + "\n"


def operating_lines(report: dict[str, Any]) -> list[str]:
    """The report's lines on the exported model's temperature and operating point."""
    lines: list[str] = []
    scaling = report.get("temperature_scaling")
    if scaling:
        fitted = scaling["validation"]
        lines += ["", f"probabilities temperature-scaled: T = {scaling['temperature']:.4g}, "
                      f"fitted on {fitted['images']} validation images (ECE "
                      f"{format_value(fitted['ece_before'])} -> "
                      f"{format_value(fitted['ece_after'])})"]
        if scaling.get("test"):
            test = scaling["test"]
            lines.append(f"  on the {test['images']} test images: ECE "
                         f"{format_value(test['ece_before'])} -> "
                         f"{format_value(test['ece_after'])}, log-loss "
                         f"{format_value(test['log_loss_before'])} -> "
                         f"{format_value(test['log_loss_after'])}")
    point = report.get("operating_point")
    if point:
        name, chosen, here = point["class_name"], point["validation"], point["here"]
        there = format_value(chosen[point["metric"]]["value"])
        lines += ["", f"operating point: {name} when P({name}) >= {point['threshold']:.4g}, "
                      f"chosen on {chosen['images']} validation images for {point['metric']} "
                      f">= {point['target']:g} (there {there}); the table above uses it"]
        for metric in ("recall", "precision"):
            if here[metric]["value"] is not None:
                lines.append(f"  {name} {metric} here: {_with_ci(here[metric])}")
    return lines


def unknown_lines(measured: dict[str, Any]) -> list[str]:
    """The report's lines on the unknown-detector: how many of the evaluated crystals it
    would have called unknown, with the interval and the reasons."""
    low, high = measured["interval"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in
                        sorted(measured["by_reason"].items())) or "none"
    return [f"unknown-detector: {measured['rejected']} of {measured['images']} crystals called "
            f"unknown ({100 * measured['rate']:.2f}%, 95% interval {100 * low:.2f}-"
            f"{100 * high:.2f}%; by reason: {reasons}); predict --reject-unknown would not "
            "answer for them"]


def add_unknown_section(out_dir: Path, measured: dict[str, Any]) -> None:
    """Put the unknown-detector's measurement into an existing report.json and report.txt
    (export does, after the evaluation that ran before the detector existed)."""
    layout = RunLayout(Path(out_dir))
    document = json.loads(layout.report.read_text(encoding="utf-8"))
    document["unknown_detector"] = measured
    layout.report.write_text(json.dumps(document, indent=2), encoding="utf-8")
    kept = [line for line in layout.report_text.read_text(encoding="utf-8").splitlines()
            if not line.startswith("unknown-detector:")]
    while kept and not kept[-1]:
        kept.pop()
    layout.report_text.write_text("\n".join([*kept, "", *unknown_lines(measured)]) + "\n",
                                  encoding="utf-8")


def write_report(report: dict[str, Any], predictions: Predictions, out_dir: Path, *,
                 title: str, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write report.txt and report.json (the latter with the per-image predictions)."""
    out_dir = Path(out_dir)
    text_path, json_path = RunLayout(out_dir).report_text, RunLayout(out_dir).report
    text_path.write_text(render_text(report, title=title), encoding="utf-8")
    document = {**(extra or {}), **report, "predictions": per_image(predictions)}
    json_path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return text_path, json_path
