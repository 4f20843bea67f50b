"""`crystalscope export`: a run's best checkpoint as model.safetensors + model.json + model.onnx,
and its unknown-detector (unknown.safetensors, described in model.json).

After writing, the model is rebuilt from safetensors + json and run against the checkpoint,
and ONNX Runtime is run against torch; either disagreement fails the export.

An export is written whole into a hidden staging folder beside its destination and only then
moved into place, file by file (``os.replace``, atomic per file); a failed parity check leaves
the previous export untouched. Every file carries one export id (a fresh UUID) and the
checkpoint's SHA-256 — ONNX metadata, model.json, the detector's safetensors metadata — and
the readers refuse files of two different exports side by side.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from crystalscope.data.decoded import build_cache
from crystalscope.data.dedupe import file_sha256
from crystalscope.data.layout import split_path
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluate.plots import read_metrics_csv
from crystalscope.evaluate.report import add_unknown_section
from crystalscope.export.card import check_card_replaceable, data_licence, model_card
from crystalscope.export.onnx import PARITY_TOLERANCE, export_onnx, quantize_int8
from crystalscope.export.weights import load_model, model_description, save_model
from crystalscope.model.inference import LoadedRun, load_run, view_logits_batches
from crystalscope.model.spec import RunLayout
from crystalscope.operating_point import (
    OperatingPoint,
    ThresholdTarget,
    choose_operating_point,
    fit_temperature,
    probabilities_at,
    rates,
    temperature_effect,
)
from crystalscope.settings import Settings
from crystalscope.unknown.detector import (
    DEFAULT_FALSE_REJECT,
    FILE_NAME,
    FalseRejectRate,
    save_detector,
)
from crystalscope.unknown.fitting import NoTrainingData, fit_run_detector

PARITY_IMAGES = 16


@dataclass
class Export:
    """What export wrote and how closely the copies agree with the checkpoint."""

    files: dict[str, Path]
    onnx_max_difference: float
    rebuilt_max_difference: float
    int8: dict[str, Any] | None = None
    unknown_detector: dict[str, Any] | None = None  # its entry in model.json
    temperature_scaling: dict[str, Any] | None = None  # its entry in model.json
    operating_point: OperatingPoint | None = None
    notes: list[str] = field(default_factory=list)
    export_id: str = ""


def data_summary(run: LoadedRun) -> dict[str, Any]:
    """Images per split and class of the training data (as far as it is still there)."""
    return {"path": str(run.config.data), "images": run.data.counts()}


def run_metrics(run: LoadedRun) -> dict[str, Any]:
    """The best validation epoch (the checkpoint's) and, when evaluated, the test report."""
    metrics: dict[str, Any] = {}
    metrics_csv = RunLayout(run.run_dir).metrics
    if metrics_csv.is_file():
        columns = read_metrics_csv(metrics_csv)
        if columns.get("val_f1_macro"):
            best = max(range(len(columns["epoch"])), key=lambda i: columns["val_f1_macro"][i])
            metrics["validation"] = {k[4:]: v[best] for k, v in columns.items()
                                     if k.startswith("val_")}
            metrics["validation"]["epoch"] = int(columns["epoch"][best])
    report = RunLayout(run.run_dir).report
    if report.is_file():
        test = json.loads(report.read_text(encoding="utf-8"))
        point = test.get("operating_point")
        metrics["test"] = {"decision": (f"{point['class_name']} when P({point['class_name']})"
                                        f" >= {point['threshold']:.4g}" if point else
                                        "the most probable class"),
                           "data": test.get("data"), "images": test["images"],
                           "misclassified": test["misclassified"],
                           "accuracy": test["accuracy"], "macro_f1": test["macro"]["f1"],
                           "roc_auc": test["roc_auc"]}
    return metrics


def parity_images(run: LoadedRun) -> torch.Tensor:
    """Real images for the parity checks (test, then valid), else seeded random ones."""
    for split in ("test", "valid"):
        decoded = build_cache(run.data.split(split)[:PARITY_IMAGES], run.spec)
        if len(decoded.paths):
            return decoded.images
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (PARITY_IMAGES, 3, run.image_size, run.image_size),
                         dtype=torch.uint8, generator=generator)


def _split_images(run: LoadedRun, split: str, limit: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images and labels of one split of the run's data (empty when it is absent)."""
    decoded = build_cache(run.data.split(split)[:limit], run.spec)
    return decoded.images, decoded.labels


def int8_comparison(fp32_path: Path, int8_path: Path, images: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, Any]:
    """How the int8 model's predictions differ from the fp32 model's on the same images."""
    import onnxruntime as ort

    outputs = []
    for path in (fp32_path, int8_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(np.concatenate([
            session.run(["probabilities"], {"images": images[i:i + 32].float().numpy()})[0]
            for i in range(0, len(images), 32)]))
    fp32, int8 = outputs
    truth = labels.numpy()
    changed = fp32.argmax(1) != int8.argmax(1)
    return {"images": len(truth),
            "same_class": float(1 - changed.mean()),
            "class_changes": int(changed.sum()),
            # how sure fp32 was of the surest image whose class changed (0 when none did)
            "most_confident_change": float(fp32.max(1)[changed].max()) if changed.any() else 0.0,
            "max_abs_probability_difference": float(np.abs(fp32 - int8).max()),
            "mean_abs_probability_difference": float(np.abs(fp32 - int8).mean()),
            "accuracy_fp32": float((fp32.argmax(1) == truth).mean()),
            "accuracy_int8": float((int8.argmax(1) == truth).mean())}


class ExportSettings(Settings):
    """What an export writes besides the fp32 model."""

    int8: bool = Field(False, description="Also write model.int8.onnx (static int8, "
                       "calibrated on validation images) and report how its predictions differ "
                       "on the test split.")
    false_reject: FalseRejectRate = DEFAULT_FALSE_REJECT
    tta: Literal["none", "dihedral"] | None = Field(None, description="Test-time averaging in "
                                                    "the exported network (None: the run's).")
    calibrate: Literal["none", "temperature"] = Field(
        "none", description="temperature: divide the logits by one number fitted on the "
        "validation split (lowest log-loss), so the probabilities mean what they say.")
    data_licence: str | None = Field(None, description="The training data's licence, for the "
                                     "model card (default: a LICENSE file in the data folder "
                                     "or its parent).")
    threshold: str | None = Field(None, description="An operating point chosen on the "
                                  "validation split: CLASS=recall:R (catch at least R of that "
                                  "class) or CLASS=precision:P (at least P of its calls right).")


def export_run(run_dir: Path, out_dir: Path | None = None,
               settings: ExportSettings | None = None) -> Export:
    """Write model.safetensors, model.json and model.onnx for ``run_dir``'s best checkpoint,
    and unknown.safetensors: the unknown-detector, fitted on the training split and calibrated on
    the validation split to ``settings.false_reject``.

    With ``int8``, also model.int8.onnx, calibrated on validation images and compared with
    the fp32 model on the test split. Written into a staging folder and moved into ``out_dir``
    only once every check has passed. ``tta`` (none, dihedral; None: the run's own choice):
    whether the network — ONNX graph, rebuilt model and the detector's statistics — averages
    each crop's 8 rotations and flips.
    """
    settings = settings or ExportSettings()
    run = load_run(run_dir, tta=settings.tta)
    target = (ThresholdTarget.parse(settings.threshold, run.classes)
              if settings.threshold else None)
    out_dir = Path(out_dir or run.run_dir)
    check_card_replaceable(RunLayout(out_dir).card)
    had_choices = _report_choices(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {"export_id": uuid.uuid4().hex, "checkpoint_sha256": file_sha256(run.checkpoint)}
    staging = Path(tempfile.mkdtemp(prefix=".export-", suffix=".partial", dir=out_dir))
    try:
        result = _write_export(run, staging, identity, settings, target)
        for path in RunLayout(out_dir).exported:  # not written again: must not stay beside it
            if not (staging / path.name).exists():
                path.unlink(missing_ok=True)
        for name in sorted(p.name for p in staging.iterdir()):
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files = {name: out_dir / path.name for name, path in result.files.items()}
    result.export_id = identity["export_id"]
    if (result.temperature_scaling or result.operating_point or had_choices) and \
            _evaluate_again(run, out_dir, settings.tta):
        _refresh_metrics(run, out_dir, settings.data_licence)
    else:
        _report_unknown_rate(run, out_dir, result)
    return result


def _report_choices(run: LoadedRun) -> bool:
    """Whether the run's test report was made with an earlier export's temperature or
    operating point (then a new export must evaluate again, with or without its own)."""
    report = RunLayout(run.run_dir).report
    if not report.is_file():
        return False
    document = json.loads(report.read_text(encoding="utf-8"))
    return "operating_point" in document or "temperature_scaling" in document


def _evaluate_again(run: LoadedRun, out_dir: Path, tta: str | None) -> bool:
    """Evaluate the run's test split again when the export changed its probabilities or its
    decisions: the report (and its ROC) then shows what the exported model does. Whether it
    did (only for an export into the run folder whose test split was evaluated there)."""
    report = RunLayout(run.run_dir).report
    if out_dir.resolve() != run.run_dir.resolve() or not report.is_file():
        return False
    evaluated = json.loads(report.read_text(encoding="utf-8")).get("data")
    test = split_path(run.config.data, "test")
    if evaluated and test.is_dir() and Path(evaluated).resolve() == test.resolve():
        from crystalscope.evaluate.stage import evaluate_run

        evaluate_run(run.run_dir, tta=tta)
        return True
    return False


def _card(run: LoadedRun, description: dict[str, Any], licence: str | None) -> str:
    """The model card of ``description``, with the licence of the run's training data."""
    return model_card(description, data_licence(Path(run.config.data), licence))


def _refresh_metrics(run: LoadedRun, out_dir: Path, licence: str | None) -> None:
    """model.json's test metrics and the card, from the evaluation that just ran."""
    layout = RunLayout(out_dir)
    description = json.loads(layout.model_json.read_text(encoding="utf-8"))
    description["metrics"] = run_metrics(run)
    for path, text in ((layout.model_json, json.dumps(description, indent=2)),
                       (layout.card, _card(run, description, licence))):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)  # atomic: a reader never sees half a file


def _report_unknown_rate(run: LoadedRun, out_dir: Path, result: Export) -> None:
    """The detector's measured rate on the test split into the run's own evaluation of that
    split (report.txt and report.json), which ran before the detector existed."""
    measured = ((result.unknown_detector or {}).get("calibration", {})
                .get("test_false_reject"))
    report = RunLayout(run.run_dir).report
    if measured is None or out_dir.resolve() != run.run_dir.resolve() or not report.is_file():
        return
    evaluated = json.loads(report.read_text(encoding="utf-8")).get("data")
    if evaluated and Path(evaluated).resolve() == split_path(run.config.data, "test").resolve():
        add_unknown_section(run.run_dir, measured)


def _operating_choices(run: LoadedRun, settings: ExportSettings,
                       target: ThresholdTarget | None) -> dict[str, Any]:
    """Temperature scaling and the operating point, fitted on the validation split (and
    measured on the test split when there is one); sets the run's network's temperature.
    Cost: one forward pass over each of the two splits, O(N)."""
    if settings.calibrate == "none" and target is None:
        return {}
    images, labels = _split_images(run, "valid")
    if not len(images):
        raise CrystalscopeError(f"{run.config.data}: has no valid/ (or val/) split: "
                                "--calibrate and --threshold are fitted on it")
    truth = labels.numpy()
    logits = view_logits_batches(run.net, images).double().numpy()
    test_images, test_labels = _split_images(run, "test")
    test_logits = (view_logits_batches(run.net, test_images).double().numpy()
                   if len(test_images) else None)
    choices: dict[str, Any] = {}
    temperature = 1.0
    if settings.calibrate == "temperature":
        temperature = fit_temperature(logits, truth)
        run.net.temperature = temperature
        choices["temperature_scaling"] = {
            "method": "temperature", "temperature": temperature, "fitted_on": "validation",
            "validation": temperature_effect(logits, truth, temperature),
            "test": (temperature_effect(test_logits, test_labels.numpy(), temperature)
                     if test_logits is not None else None)}
    if target is not None:
        point = choose_operating_point(probabilities_at(logits, temperature), truth,
                                       run.classes, target)
        test = None
        if test_logits is not None:
            test = rates(point.decide(probabilities_at(test_logits, temperature)),
                         test_labels.numpy(), point.class_index)
        choices["operating_point"] = {**point.to_dict(), "test": test}
    return choices


def _write_export(run: LoadedRun, out_dir: Path, identity: dict[str, str],
                  settings: ExportSettings, target: ThresholdTarget | None) -> Export:
    """Every export file of ``run`` into ``out_dir`` (the staging folder), stamped with
    ``identity``; raises if a copy disagrees with the checkpoint."""
    int8, false_reject = settings.int8, settings.false_reject
    choices = _operating_choices(run, settings, target)  # before the detector: it sees them
    config = run.config.model_dump(mode="json")
    description = model_description(
        backbone=run.config.model, head=run.config.head, spec=run.spec,
        embedding_size=run.net.classifier.backbone.num_features,
        recipe={k: v for k, v in config.items() if k not in ("data", "runs_dir")},
        metrics=run_metrics(run), data=data_summary(run),
        tta=run.net.tta, temperature=run.net.temperature, source=run.source)
    description.update(identity)
    description.update(choices)
    notes = []
    try:
        detector = fit_run_detector(run, false_reject)
    except NoTrainingData as exc:
        notes.append(str(exc))
    else:
        description["unknown_detector"] = {**detector.describe(), **identity}
        save_detector(detector, out_dir, identity["export_id"])
    weights_path, json_path = save_model(run.net, description, out_dir)

    images = parity_images(run).float()
    rebuilt, _ = load_model(json_path)
    with torch.inference_mode():
        rebuilt_difference = float((rebuilt(images)[0] - run.net(images)[0]).abs().max())
    if not rebuilt_difference <= PARITY_TOLERANCE:
        raise CrystalscopeError(f"{weights_path.name}: the rebuilt model differs from the "
                                f"checkpoint (max |Δ probability| {rebuilt_difference:.2e})")
    card = RunLayout(out_dir).card
    card.write_text(_card(run, description, settings.data_licence), encoding="utf-8")
    onnx_path = RunLayout(out_dir).onnx
    metadata = {"classes": run.classes, "preprocessing": description["preprocessing"],
                "outputs": "probabilities",
                "architecture": description["architecture"], "format": description["format"],
                "format_version": description["format_version"], **identity}
    if "operating_point" in choices:
        metadata["operating_point"] = choices["operating_point"]
    onnx_difference = export_onnx(run.net, onnx_path, run.image_size, metadata, images)
    result = Export(files={p.name: p for p in (weights_path, json_path, onnx_path, card)},
                    onnx_max_difference=onnx_difference,
                    rebuilt_max_difference=rebuilt_difference,
                    unknown_detector=description.get("unknown_detector"), notes=notes,
                    temperature_scaling=choices.get("temperature_scaling"))
    if "operating_point" in choices:
        result.operating_point = OperatingPoint.from_dict(choices["operating_point"],
                                                          run.classes)
    if "unknown_detector" in description:
        result.files[FILE_NAME] = RunLayout(out_dir).detector
    if int8:
        calibration, _ = _split_images(run, "valid", limit=64)
        if not len(calibration):
            calibration = images  # no validation split left: the parity images
        int8_path = RunLayout(out_dir).int8_onnx
        quantize_int8(onnx_path, int8_path, calibration)
        result.files[int8_path.name] = int8_path
        test_images, test_labels = _split_images(run, "test")
        if len(test_images):
            result.int8 = int8_comparison(onnx_path, int8_path, test_images, test_labels)
    return result
