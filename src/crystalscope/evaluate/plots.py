"""The evaluation plots, as PNG files: confusion matrix, training curves, misclassified
gallery, ROC curves with the operating point, reliability diagram.

Class names always come from the model. Each function saves its figure and returns it
(closed), so tests can read the axes as well as the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from crystalscope.data.images import ImageLoadError, load_image
from crystalscope.evaluate.predictions import Predictions
from crystalscope.evaluate.report import format_value

DPI = 110
MAX_GALLERY = 36


def _save(figure: Figure, path: Path) -> Figure:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, metadata={"Software": "crystalscope"})
    plt.close(figure)
    return figure


def _percent(count: int, total: int) -> str:
    """A row percentage that shows 100% or 0% only when it is exactly that."""
    if total == 0:
        return "n/a"
    if count in (0, total):
        return f"{100 * count // total}%"
    text = f"{100 * count / total:.1f}"
    return {"100.0": "99.9", "0.0": "0.1"}.get(text, text) + "%"


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> Figure:
    """Counts and row percentages; rows are true classes, columns predicted ones."""
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 1.2 + 1.1 * len(classes)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(j, i, f"{counts[i, j]}\n{_percent(counts[i, j], int(rows[i, 0]))}",
                      ha="center", va="center",
                      color="white" if share[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(classes)), classes)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("confusion matrix (count, row %)")
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    return _save(figure, path)


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {})}


def plot_curves(metrics_csv: Path, path: Path) -> Figure:
    """Loss, accuracy and macro F1 per epoch, train vs validation."""
    columns = read_metrics_csv(metrics_csv)
    epochs = columns.get("epoch", [])
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (metric, label) in zip(axes, (("loss", "loss"), ("acc", "accuracy"),
                                          ("f1_macro", "macro F1")), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            if key in columns:
                ax.plot(epochs, columns[key], style, markersize=3,
                        label="valid" if split == "val" else split)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(figure, path)


def plot_errors(predictions: Predictions, path: Path) -> Figure:
    """A gallery of misclassified images with truth, prediction and its probability."""
    wrong = np.flatnonzero(predictions.labels != predictions.predicted)
    classes = predictions.classes
    if len(wrong) == 0:
        figure, axes = plt.subplots(figsize=(5, 1.5))
        axes.axis("off")
        axes.text(0.5, 0.5, f"no misclassified images (of {len(predictions.labels)})",
                  ha="center", va="center")
        return _save(figure, path)
    # Most confident mistakes first: the ones worth a look.
    wrong = wrong[np.argsort(-predictions.probabilities[wrong].max(axis=1))][:MAX_GALLERY]
    columns = min(6, len(wrong))
    rows = int(np.ceil(len(wrong) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows),
                                squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong, strict=False):
        try:
            ax.imshow(load_image(predictions.paths[index], warn_on_mismatch=False)
                      .convert("RGB"))
        except ImageLoadError:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        truth, guess = classes[predictions.labels[index]], classes[predictions.predicted[index]]
        probability = predictions.probabilities[index, predictions.predicted[index]]
        ax.set_title(f"true {truth}\npred {guess} P={format_value(probability, 3)}",
                     fontsize=8)
    figure.suptitle(f"{int((predictions.labels != predictions.predicted).sum())} misclassified "
                    f"of {len(predictions.labels)}" +
                    (f" (showing {MAX_GALLERY})" if len(wrong) == MAX_GALLERY else ""))
    return _save(figure, path)


def plot_roc(predictions: Predictions, path: Path) -> Figure:
    """ROC curves (binary: the second class; more: one-vs-rest) with the operating point.

    The operating point is the model's decision rule (the most probable class; for two
    classes, P >= 0.5; or the exported threshold), marked on each curve.
    """
    point = predictions.operating_point
    classes, truth = predictions.classes, predictions.labels
    shown = [1] if len(classes) == 2 else list(range(len(classes)))
    figure, axes = plt.subplots(figsize=(5.2, 5))
    axes.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for c in shown:
        positive = truth == c
        if positive.all() or not positive.any():
            continue  # no curve without both positives and negatives
        fpr, tpr, _ = roc_curve(positive, predictions.probabilities[:, c])
        called = predictions.predicted == c
        op_tpr = called[positive].mean()
        op_fpr = called[~positive].mean()
        line = axes.plot(fpr, tpr, label=f"{classes[c]} vs rest")[0]
        rule = (f"P >= {point.threshold:.3g}, " if point is not None
                and point.class_index == c else "")
        axes.plot([op_fpr], [op_tpr], "o", color=line.get_color(), markersize=8,
                  label=f"operating point ({classes[c]}): {rule}TPR {format_value(op_tpr)}, "
                        f"FPR {format_value(op_fpr)}")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC" + (f": {classes[1]} as positive" if len(classes) == 2 else
                            " (one-vs-rest)"))
    axes.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def plot_reliability(calibration: dict, path: Path) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, with the ECE."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / calibration["bins"]
    table = calibration["table"]
    centres = [(row["low"] + row["high"]) / 2 for row in table]
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    top.bar(centres, [row["accuracy"] for row in table], width=width * 0.9,
            edgecolor="black", label="accuracy")
    top.plot(centres, [row["confidence"] for row in table], "r.", label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (ECE {format_value(calibration['ece'])})")
    top.legend(fontsize=8)
    bottom.bar(centres, [row["count"] for row in table], width=width * 0.9, color="grey")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return _save(figure, path)
