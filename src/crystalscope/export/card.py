"""The model card: ``README.md`` in every export — what the model tells apart, from which data,
how well (with intervals), how to feed it, and where it must not be trusted.

Written from model.json's description alone (so a card never disagrees with the model it sits
beside), in the Hugging Face hub's format: YAML front matter, then Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crystalscope.errors import UserError

CARD_MARK = "library_name: crystalscope"  # in the front matter of every card written here
LICENCE_FILES = ("LICENSE", "LICENCE", "LICENSE.txt", "LICENCE.txt", "LICENSE.md", "LICENCE.md")


def check_card_replaceable(card: Path) -> None:
    """Refuse to replace a README.md that is not a card written by an earlier export (the
    user's own notes in the folder export writes to)."""
    if card.is_file() and CARD_MARK not in card.read_text(encoding="utf-8", errors="replace"):
        raise UserError(f"{card}: exists and is not a crystalscope model card; export writes "
                        "its card there: move that file, or export into another folder (--out)")


def data_licence(data: Path, given: str | None = None) -> str:
    """The training data's licence: ``given``, else the first line of a LICENSE file in the
    data folder or its parent, else a sentence saying it was not stated."""
    if given:
        return given
    for folder in (Path(data), Path(data).parent):
        for name in LICENCE_FILES:
            path = folder / name
            if path.is_file():
                lines = [line.strip() for line in path.read_text(encoding="utf-8",
                                                                  errors="replace").splitlines()]
                first = next((line for line in lines if line), "")
                if first:
                    return f"{first} (from {path})"
    return "not stated (give it with `crystalscope export RUN --data-licence …`)"


def _interval(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "–"
    text = f"{metric['value']:.4f}"
    if metric.get("ci95"):
        low, high = metric["ci95"]
        text += f" (95% interval {low:.4f}–{high:.4f})"
    return text


def _metrics_lines(description: dict[str, Any]) -> list[str]:
    metrics = description.get("metrics") or {}
    lines = []
    test = metrics.get("test")
    if test:
        lines += [f"On the held-out test split ({test['images']} images, "
                  f"{test['misclassified']} misclassified; decision: "
                  f"{test.get('decision', 'the most probable class')}):",
                  "", "| metric | value |", "| --- | --- |",
                  f"| accuracy | {_interval(test.get('accuracy'))} |",
                  f"| macro F1 | {_interval(test.get('macro_f1'))} |",
                  f"| ROC AUC ({(test.get('roc_auc') or {}).get('average', '')}) | "
                  f"{_interval(test.get('roc_auc'))} |", ""]
    else:
        lines += ["No test-split evaluation was found when this model was exported: its accuracy "
                  "on new crops is unmeasured. Evaluate before use "
                  "(`crystalscope evaluate RUN`).", ""]
    validation = metrics.get("validation")
    if validation:
        lines += [f"Best validation epoch {validation.get('epoch')}: macro F1 "
                  f"{validation.get('f1_macro', float('nan')):.4f} (the checkpoint's choice; "
                  "not an estimate of new-data performance).", ""]
    point = description.get("operating_point")
    if point:
        name = point["class_name"]
        lines += [f"**Operating point**: `{name}` is called when P({name}) ≥ "
                  f"{point['threshold']:.4g}, chosen on the validation split for "
                  f"{point['metric']} ≥ {point['target']:g} (there "
                  f"{_interval(point['validation'][point['metric']])})."]
        if point.get("test"):
            lines.append(f"On the test split: {name} recall "
                         f"{_interval(point['test']['recall'])}, precision "
                         f"{_interval(point['test']['precision'])}.")
        lines.append("")
    scaling = description.get("temperature_scaling")
    if scaling:
        fitted = scaling["validation"]
        lines += [f"Probabilities are temperature-scaled (T = {scaling['temperature']:.4g}, "
                  f"fitted on {fitted['images']} validation images; ECE "
                  f"{fitted['ece_before']:.4f} → {fitted['ece_after']:.4f})."
                  + (f" On the test split ECE {scaling['test']['ece_before']:.4f} → "
                     f"{scaling['test']['ece_after']:.4f}." if scaling.get("test") else ""), ""]
    return lines


def model_card(description: dict[str, Any], licence: str) -> str:
    """The README.md of an export described by ``description`` (model.json's content)."""
    architecture, spec = description["architecture"], description["preprocessing"]
    classes = description["classes"]
    data = description.get("data") or {}
    source = architecture.get("source")
    backbone = architecture["backbone"]
    front = {"library_name": "crystalscope", "pipeline_tag": "image-classification",
             "tags": ["image-classification", "crystallization", "onnx", "timm",
                      "process-analytical-technology"],
             "base_model": backbone[len("hf-hub:"):] if backbone.startswith("hf-hub:") else None}
    front = {k: v for k, v in front.items() if v is not None}
    counts = data.get("images") or {}
    count_rows = [f"| {split} | " + " | ".join(str(counts[split].get(c, 0)) for c in classes)
                  + " |" for split in ("train", "valid", "test") if split in counts]
    detector = description.get("unknown_detector")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# crystalscope model: {', '.join(classes)} ({backbone})", "",
        "An image classifier for crystal crops from an in-situ microscope probe (a "
        "particle-vision probe in a crystallizer), trained and exported with "
        "crystalscope. "
        f"Export `{description.get('export_id', '')}`, made {description.get('created', '')}.",
        "",
        "## Classes", "", *(f"- `{name}` (output {i})" for i, name in enumerate(classes)), "",
        "## Data", "",
        f"Trained on the split folder `{data.get('path', 'unknown')}`:", "",
        "| split | " + " | ".join(classes) + " |",
        "| --- | " + " | ".join("---" for _ in classes) + " |", *count_rows, "",
        f"Licence of the data: {licence}.", "",
        "## Metrics", "", *_metrics_lines(description),
        "## Input and output (the model's spec)", "",
        f"- input `images`: float32 N×3×{spec['input_size']}×{spec['input_size']}, "
        f"{spec.get('channels', 'RGB')}, values 0–255, the crop resized "
        f"({spec.get('resize', 'bilinear')}, squashed, no crop) to {spec['input_size']} px; "
        f"the network normalises inside (mean {spec.get('mean')}, std {spec.get('std')});",
        "- outputs: `probabilities` (softmax, in the order of the classes), `embedding` "
        "(pooled features), `statistics` (what the unknown-image detector reads);",
        f"- backbone `{backbone}` (timm{', from ' + source['architecture'] if source else ''}),"
        f" head `{architecture['head']}`, test-time averaging `{architecture.get('tta', 'none')}`.",
        "",
        "```bash",
        "crystalscope predict . crops/ --output predictions.csv   # in this folder",
        "```", "",
        "## Intended use and limits", "",
        "- Use: telling these classes apart in crops cut from the same kind of probe, optics and "
        "process as the training data, e.g. to stop a batch when the impurity appears.",
        "- Not validated on other instruments, magnifications, solvents or particle kinds; "
        "re-evaluate on labelled crops of a new setting before relying on it.",
        "- It always answers with one of its classes. Crops unlike its training data (empty, "
        "blurred, saturated frames, bubbles, other particles) are flagged by its unknown-image "
        "detector" + (f", calibrated to call at most {100 * detector['target_false_reject']:.1f}% "
                      "of validation crystals unknown" if detector and detector.get(
                          "target_false_reject") is not None else "")
        + "; use `predict --reject-unknown`.",
        "- Test metrics above come from few images when the split is small: read the interval, "
        "not only the value.", "",
        "## Files", "",
        "`model.onnx` (ONNX Runtime, no torch needed), `model.safetensors` + `model.json` (the "
        "torch model and everything that rebuilds it), `unknown.safetensors` (the unknown-image "
        "detector). Library versions: "
        + ", ".join(f"{k} {v}" for k, v in (description.get("versions") or {}).items()) + ".",
    ]
    return "\n".join(lines) + "\n"
