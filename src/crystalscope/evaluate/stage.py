"""`crystalscope evaluate`: a run's best checkpoint on its test split (or any labelled folder).

Writes report.txt, report.json, confusion_matrix.png, curves.png, errors.png, roc.png and
reliability.png — into the run directory for its own test split, or into
``RUN/evaluations/<folder name>/`` for another folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystalscope.data.layout import split_path
from crystalscope.errors import UserError
from crystalscope.evaluate import plots
from crystalscope.evaluate.predictions import Predictions, labelled_images, predict_items
from crystalscope.evaluate.report import compute_report, write_report
from crystalscope.model.inference import LoadedRun, exported_choices, load_run
from crystalscope.model.spec import RunLayout
from crystalscope.operating_point import rates


@dataclass
class Evaluation:
    """Where the evaluation went and what it found."""

    out_dir: Path
    data: Path
    report: dict[str, Any]
    predictions: Predictions
    files: dict[str, Path]


def _out_dir_for(run_dir: Path, data: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data.resolve().name).strip("-") or "data"
    if data.name == "test":
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data.resolve().parent.name) + "-test"
    return run_dir / "evaluations" / slug


def evaluate_run(run_dir: Path, data: Path | None = None, *, out_dir: Path | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 tta: str | None = None) -> Evaluation:
    """Evaluate ``run_dir``'s best checkpoint on ``data`` (default: the run's test split).

    ``progress(done, total)`` is called as images are decoded; ``tta`` (none, dihedral)
    overrides the run's test-time averaging.
    """
    run = load_run(run_dir, tta=tta)
    if data is None:
        data = split_path(run.config.data, "test")
        if not data.is_dir():
            raise UserError(f"{run.config.data}: has no test/ split to evaluate on; give a "
                            "labelled folder: crystalscope evaluate RUN DATA")
        default_out = run.run_dir
    else:
        default_out = None
    folder, items = labelled_images(Path(data), run.classes)
    out_dir = Path(out_dir or default_out or _out_dir_for(run.run_dir, folder))
    out_dir.mkdir(parents=True, exist_ok=True)

    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(items))

    exported = exported_choices(run)
    predictions = predict_items(run.net, run.classes, items, advance)
    predictions.operating_point = exported.get("operating_point")
    report = compute_report(predictions, seed=run.config.seed)
    if "temperature_scaling" in exported:
        report["temperature_scaling"] = exported["temperature_scaling"]
    if predictions.operating_point is not None:
        point = predictions.operating_point
        report["operating_point"] = {**point.to_dict(), "here": rates(
            predictions.predicted, predictions.labels, point.class_index)}
    measured = unknown_on(run, items)
    if measured is not None:
        report["unknown_detector"] = measured
    title = (f"crystalscope evaluation of {run.run_dir} ({run.checkpoint.name}, "
             f"{run.config.model} at {run.image_size} px, test-time averaging "
             f"{run.net.tta}) on {folder}")
    text_path, json_path = write_report(
        report, predictions, out_dir, title=title,
        extra={"run": str(run.run_dir), "checkpoint": str(run.checkpoint), "data": str(folder),
               "tta": run.net.tta})
    files = {text_path.name: text_path, json_path.name: json_path}
    files["confusion_matrix.png"] = out_dir / "confusion_matrix.png"
    plots.plot_confusion_matrix(report["confusion_matrix"], run.classes,
                                files["confusion_matrix.png"])
    metrics_csv = RunLayout(run.run_dir).metrics
    if metrics_csv.is_file():
        files["curves.png"] = out_dir / "curves.png"
        plots.plot_curves(metrics_csv, files["curves.png"])
    for name, draw in (("errors.png", plots.plot_errors), ("roc.png", plots.plot_roc)):
        files[name] = out_dir / name
        draw(predictions, files[name])
    files["reliability.png"] = out_dir / "reliability.png"
    plots.plot_reliability(report["calibration"], files["reliability.png"])
    return Evaluation(out_dir=out_dir, data=folder, report=report, predictions=predictions,
                      files=files)


def unknown_on(run: LoadedRun, items: list[tuple[Path, int]]) -> dict | None:
    """What the run's exported unknown-detector (if it has one) calls unknown among ``items``;
    None without one, or when the network's test-time averaging differs from the one the
    network-feature detector of an earlier export was calibrated with."""
    from crystalscope.unknown.detector import APPEARANCE, load_detector
    from crystalscope.unknown.fitting import measure_unknown

    model_json = RunLayout(run.run_dir).model_json
    detector = load_detector(model_json)
    if detector is None:
        return None
    description = json.loads(model_json.read_text(encoding="utf-8"))
    exported_tta = description.get("architecture", {}).get("tta", "none")
    if detector.method != APPEARANCE and exported_tta != run.net.tta:
        return None
    return measure_unknown(run, detector, items)
